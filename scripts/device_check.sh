#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU and no network (run from anywhere):
#
#   scripts/device_check.sh [--dry-run] [OUT_DIR]
#
# 1. what jax.devices() says; 2. the parity tests (every family: Llama, Mistral, Qwen2/3,
# Gemma 3, Mixtral, Qwen3-MoE), the engine tests and the MoE dispatch tests on the real
# device (tests/conftest.py honours JAXLLM_TEST_REAL_DEVICES=1: no fake CPU devices); 3.
# bench_engine --engine-only on a random ~1.1B-parameter Llama in bfloat16, MBU against the
# device's read bandwidth measured in the same run. Writes devices.txt, tests.log, tests.xml,
# bench.log, bench_engine.json and device_check.json (the summary) under OUT_DIR (default
# $OUT, else out/device_check). Installs nothing. Every step has a timeout; the whole run
# stays under 9 minutes. test_model_parity needs torch and transformers and is left out
# where they are missing (said in the summary).
#
# --dry-run (or DEVICE_CHECK_DRY_RUN=1): the same steps on CPU with a tiny model, short runs
# and a few fast tests, so that tests/test_device_check.py can run the script end to end.
set -uo pipefail

dry_run="${DEVICE_CHECK_DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
out_dir="$(mkdir -p "${1:-${OUT:-out/device_check}}" && cd "${1:-${OUT:-out/device_check}}" && pwd)"
cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python}"
started=$(date +%s)

if [[ "$dry_run" == 1 ]]; then
    export JAX_PLATFORMS=cpu
    tests=(tests/test_attention_kernels.py -k "choice or overrides")
    test_timeout=120
    bench_timeout=150
    bench=(--models tiny --dtype float32 --concurrency 1 4 --rounds 1 --decode-tokens 8
        --output-len 8 --prompt-len 16 --max-seq-len 128 --bandwidth-gib 0.05 --repeats 2
        --engine-options max_num_seqs=4 max_step_tokens=32 chunk=16 page_size=8)
else
    export JAXLLM_TEST_REAL_DEVICES=1
    unset JAX_PLATFORMS
    # MoE dispatch on the chip (jax.lax.ragged_dot is the GPU default; XLA:CPU never ran it
    # fast): every method against the dense reference, and int8 experts.
    moe=tests/test_moe.py
    tests=(tests/test_attention_kernels.py tests/test_attention.py tests/test_engine.py
        "$moe::test_every_method_equals_the_dense_reference"
        "$moe::test_skewed_routing_all_tokens_to_one_expert"
        "$moe::test_int8_weights_equal_their_dequantized_floats")
    test_timeout=300  # parity over every family, engine, MoE dispatch
    bench_timeout=200
    bench=(--models llama1b --dtype bfloat16 --concurrency 1 8 32 --rounds 2 --decode-tokens 128
        --output-len 64 --prompt-len 32 --max-seq-len 1024 --bandwidth-gib 2 --repeats 5
        --engine-options max_num_seqs=32)
fi
export TQDM_DISABLE=1

echo "== jax.devices()"
timeout 120 "$python" -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices())' \
    2>&1 | tee "$out_dir/devices.txt"
devices_rc=${PIPESTATUS[0]}

parity="skipped: torch or transformers missing"
if "$python" -c 'import torch, transformers' >/dev/null 2>&1; then
    parity="run"
    [[ "$dry_run" == 1 ]] || tests=(tests/test_model_parity.py "${tests[@]}")
fi

echo "== tests on the device: ${tests[*]} (test_model_parity: $parity)"
timeout "$test_timeout" "$python" -m pytest -q -x -p no:cacheprovider \
    --junitxml="$out_dir/tests.xml" "${tests[@]}" 2>&1 | tee "$out_dir/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== bench_engine --engine-only ${bench[*]}"
timeout "$bench_timeout" "$python" scripts/bench_engine.py --engine-only "${bench[@]}" \
    --out "$out_dir" 2>&1 | tee "$out_dir/bench.log" | tail -15
bench_rc=${PIPESTATUS[0]}

"$python" - "$out_dir" "$dry_run" "$devices_rc" "$tests_rc" "$bench_rc" "$parity" \
    "$(($(date +%s) - started))" <<'EOF'
import json, sys
from pathlib import Path

out, dry, devices_rc, tests_rc, bench_rc, parity, seconds = sys.argv[1:]
out = Path(out)
bench = out / "bench_engine.json"
summary = {
    "dry_run": dry == "1",
    "devices": (out / "devices.txt").read_text().strip(),
    "devices_rc": int(devices_rc),
    "tests_rc": int(tests_rc),  # 124: timed out
    "test_model_parity": parity,
    "bench_rc": int(bench_rc),
    "seconds": int(seconds),
}
if bench.exists():
    b = json.loads(bench.read_text())
    summary["bench"] = {
        "backend": b["machine"]["jax_backend"],
        "params": b["model"]["params"],
        "dtype": b["model"]["dtype"],
        "read_bandwidth_gbps": b["read_bandwidth_gbps"],
        "batch1_step_ms": b["decode"]["step_ms"],
        "batch1_mbu": b["decode"]["mbu"],
        "tokens_per_s": {c: r["tokens_per_s"] for c, r in b["sweep"].items()},
        "xla_compiles_in_timed_regions": b["xla_compiles_in_timed_regions"],
    }
(out / "device_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "== wrote $out_dir/device_check.json in $(($(date +%s) - started)) s"
[[ "$devices_rc" == 0 && "$tests_rc" == 0 && "$bench_rc" == 0 ]]
