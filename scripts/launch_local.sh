#!/usr/bin/env bash
# Runs one jaxllm server as N processes on this machine, over loopback: the development and
# test stand-in for a multi-host cluster. The CPU devices are split among the processes
# (JAXLLM_CPU_DEVICES in all, default 8), so the global mesh has as many devices as one
# process would; process 0 serves gRPC, the others follow it.
#
#   scripts/launch_local.sh N [jaxllm serve flags...]
#   scripts/launch_local.sh 2 --model /ckpt/orbax --mesh data=2,tensor=4 --port 50051
#
# Environment: JAXLLM_CPU_DEVICES (8), JAXLLM_COORDINATOR_PORT (a free port),
# JAXLLM_LOG_DIR (unset: every process writes to this terminal; set: DIR/process-I.log),
# PYTHON (python3). Prints "launch_local: process I pid P" for each process and a line as
# each exits. Exits with the first non-zero status of any process, or 0 once all exit 0;
# after a failure the others get 10 s to notice it themselves, then SIGTERM.
# SIGTERM/SIGINT go to every process: the leader drains, then stops its followers.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: $0 N [jaxllm serve flags...]   (N >= 1 processes)" >&2
  exit 2
fi
n=$1
shift
devices=${JAXLLM_CPU_DEVICES:-8}
if (( devices % n != 0 )); then
  echo "launch_local: $devices CPU devices do not split evenly over $n processes" >&2
  exit 2
fi
python=${PYTHON:-python3}
port=${JAXLLM_COORDINATOR_PORT:-$("$python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

declare -A running=()  # pid -> process index
stop_all() {
  local signal=$1 pid
  for pid in "${!running[@]}"; do
    kill "-$signal" "$pid" 2>/dev/null || true
  done
}
trap 'stop_all TERM' TERM INT

for ((i = 0; i < n; i++)); do
  output=/dev/stdout
  if [[ -n ${JAXLLM_LOG_DIR:-} ]]; then
    mkdir -p "$JAXLLM_LOG_DIR"
    output=$JAXLLM_LOG_DIR/process-$i.log
  fi
  # exec: the pid printed is the server's own, so it can be signalled directly.
  (
    cd "$repo"
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$((devices / n))"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    exec "$python" -m serve.cli serve --coordinator "127.0.0.1:$port" --num-processes "$n" \
      --process-id "$i" "$@" >"$output" 2>&1
  ) &
  running[$!]=$i
  echo "launch_local: process $i pid $!"
done

# Polled rather than `wait -n`: bash may report and forget a job that a signal ended while
# the script was busy, after which `wait -n` no longer sees it; `wait PID` still has its status.
status=0
failed_at=""
stopping=""
while (( ${#running[@]} > 0 )); do
  for pid in "${!running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    code=0
    wait "$pid" || code=$?
    echo "launch_local: process ${running[$pid]} (pid $pid) exited with status $code"
    unset "running[$pid]"
    if (( code != 0 && status == 0 )); then
      status=$code
      failed_at=$SECONDS
    fi
  done
  # After a failure the others get 10 s to notice it themselves (they exit with their own
  # message), then SIGTERM, then SIGKILL.
  if [[ -n $failed_at ]]; then
    if (( SECONDS - failed_at >= 15 )); then
      stop_all KILL
    elif (( SECONDS - failed_at >= 10 )) && [[ -z $stopping ]]; then
      stopping=1
      stop_all TERM
    fi
  fi
  # A signal sent to the whole process group (Ctrl-C, timeout, Kubernetes) also ends this
  # sleep; that must not end the script under set -e while the processes drain.
  sleep 0.2 || true
done
exit "$status"
