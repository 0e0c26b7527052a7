#!/usr/bin/env bash
# One task of a multi-node jaxllm server under SLURM (srun starts it; see slurm_serve.sbatch).
# JAX reads the job from SLURM's variables (--distributed): the coordinator is the first
# node of the step (port derived from SLURM_JOB_ID, or JAX_COORDINATOR_PORT), the process id
# is SLURM_PROCID, the process count SLURM_NTASKS, and each task sees GPU SLURM_LOCALID.
set -euo pipefail

for variable in SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
  if [[ -z ${!variable:-} ]]; then
    echo "slurm_task: \$$variable is not set; start this through srun (slurm_serve.sbatch)" >&2
    exit 2
  fi
done

command=${JAXLLM_COMMAND:-serve}
args=(--distributed)
if [[ $command == serve ]]; then
  # Only process 0 binds these; any node may be the first, so it listens on all interfaces.
  args+=(--host 0.0.0.0 --port "${JAXLLM_PORT:-50051}")
  args+=(--metrics-port "${JAXLLM_METRICS_PORT:-9090}")
  if [[ $SLURM_PROCID == 0 ]]; then
    echo "slurm_task: process 0 of $SLURM_NTASKS serves on $(hostname):${JAXLLM_PORT:-50051}"
  fi
fi

cd "${JAXLLM_DIR:-${SLURM_SUBMIT_DIR:-.}}"
exec "${JAXLLM_PYTHON:-python3}" -m serve.cli "$command" "${args[@]}" "$@"
