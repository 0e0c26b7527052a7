#!/usr/bin/env bash
# Regenerates the committed Python stubs of serve/proto/jaxllm.proto (run from anywhere).
# Imports are rewritten to be package-relative, so the stubs work as serve.proto.*.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/serve/proto}"
python="${PYTHON:-python}"
"$python" -m grpc_tools.protoc -I "$root/serve/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/serve/proto/jaxllm.proto"
# protoc writes `import jaxllm_pb2`, which only resolves with serve/proto on sys.path.
sed -i 's/^import jaxllm_pb2 as/from serve.proto import jaxllm_pb2 as/' "$out/jaxllm_pb2_grpc.py"
