#!/usr/bin/env bash
# Serves one model on every host of a Cloud TPU pod slice (e.g. a v5e-16: 4 hosts x 4 chips),
# one jaxllm process per host. JAX detects the slice by itself (--distributed): worker 0 is
# process 0, which serves gRPC; the others follow it.
#
#   TPU_NAME=my-slice ZONE=us-west4-a scripts/launch_tpu_pod.sh --model /mnt/ckpt/llama3-8b \
#       --mesh data=2,tensor=8 --port 50051
#
# Expects: gcloud installed and authenticated; the TPU VM slice created; jaxllm installed on
# every worker in JAXLLM_DIR (default ~/jaxllm; JAXLLM_SETUP, if set, runs there first, e.g.
# "pip install -e ."); the model folder at the same path on every worker (a persistent disk,
# or a bucket mounted with gcsfuse). Optional: PROJECT. JAXLLM_DRY_RUN=1 prints the gcloud
# command instead of running it. Ctrl-C ends the ssh sessions and the servers with them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone}"

# The remote command, one shell word per argument, so flags with spaces survive the ssh hop.
remote="cd ${JAXLLM_DIR:-jaxllm} && "
if [[ -n ${JAXLLM_SETUP:-} ]]; then
  remote+="$JAXLLM_SETUP && "
fi
remote+="exec python3 -m serve.cli serve --distributed --host 0.0.0.0"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  command+=(--project "$PROJECT")
fi
command+=(--command "$remote")

if [[ -n ${JAXLLM_DRY_RUN:-} ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
exec "${command[@]}"
