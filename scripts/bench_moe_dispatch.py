"""Benchmark: which mixture-of-experts dispatch (``jaxllm.moe.METHODS``) is fastest on this CPU.

For each shape (T tokens in 1, 8, 64, 512; a Mixtral-like layer E=8 k=2 D=1024 F=2816 and a
Qwen3-MoE-like one E=64 k=8 D=1024 F=512) and each method, the best wall time of the jitted
``experts_mlp`` on one CPU device, float32, with softmax-top-k routing of random logits
(every expert about equally loaded), plus:

- ``useful_gflops``: 2 * P * 3 * D * F (the pairs' own arithmetic, P = T * k) / time, and its
  ratio to the float32 matmul rate measured in the same run;
- ``weight_read_gbps``: bytes of the weights of the experts that got a token / time, and its
  ratio to the read bandwidth measured in the same run (the limit for small T).

Methods whose arithmetic would exceed ``--max-gflop`` per call (``ragged`` on XLA:CPU is a
masked dense product over all experts) are reported as skipped with the estimate. The
``blocks`` method is also timed at half and twice its default block size, and with int8
weights against ``ragged`` (which converts the whole stack) for the Mixtral-like layer.

Defaults come first in the JSON, then the machine's limits, then the results. Run from the
repository root; about 4 minutes on a quiet 2-core machine:

    python scripts/bench_moe_dispatch.py [--out out] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import moe, quantize

sys.path.insert(0, str(Path(__file__).parent))
import _bench_common as common  # noqa: E402

LAYERS = {
    "mixtral_like": dict(E=8, k=2, D=1024, F=2816),
    "qwen3_moe_like": dict(E=64, k=8, D=1024, F=512),
}
TOKENS = (1, 8, 64, 512)


def useful_flops(T: int, k: int, D: int, F: int) -> float:
    return 2.0 * T * k * 3 * D * F


def method_flops(method: str, T: int, E: int, k: int, D: int, F: int) -> float:
    """Arithmetic a method really does on XLA:CPU (see jaxllm.moe's docstring)."""
    if method == "ragged":
        return E * useful_flops(T, k, D, F)  # masked dense product over every expert
    if method == "capacity":
        return useful_flops(T, 1, D, F) * E  # T slots per expert
    return useful_flops(T, k, D, F)


def layer(E: int, k: int, D: int, F: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    w_gate = jax.random.normal(keys[0], (E, F, D), jnp.float32) / np.sqrt(D)
    w_up = jax.random.normal(keys[1], (E, F, D), jnp.float32) / np.sqrt(D)
    w_down = jax.random.normal(keys[2], (E, D, F), jnp.float32) / np.sqrt(F)
    router = jax.random.normal(keys[3], (E, D), jnp.float32) / np.sqrt(D)
    return (w_gate, w_up, w_down), router


def time_call(fn, args, budget_s: float) -> tuple[float, int]:
    """Best time of ``fn(*args)`` over as many calls as fit ``budget_s`` (2 to 20)."""
    jax.block_until_ready(fn(*args))  # compile
    first = common.best_time(lambda: jax.block_until_ready(fn(*args)), repeats=1, warmup=0)
    repeats = int(max(2, min(20, budget_s / max(first, 1e-6))))
    best = common.best_time(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=0)
    return min(first, best), repeats + 1


def measure(name, dims, T, method, mats, scales, router, limits, args, block_rows=None):
    E, k, D, F = dims["E"], dims["k"], dims["D"], dims["F"]
    row = {"layer": name, "T": T, "method": method, "int8": scales is not None}
    if block_rows is not None:
        row["block_rows"] = block_rows
    estimate = method_flops(method, T, E, k, D, F)
    if estimate > args.max_gflop * 1e9:
        return {**row, "skipped": f"~{estimate / 1e9:.0f} GFLOP per call > --max-gflop"}
    x = jax.random.normal(jax.random.key(T), (T, D), jnp.float32)
    weights, experts = moe.route(x @ router.T, k, normalize=True)

    @jax.jit
    def step(x, weights, experts, mats, scales):
        return moe.experts_mlp(
            x, weights, experts, *mats, scales, method=method, block_rows=block_rows
        )

    with common.noise_meter() as noise:
        seconds, calls = time_call(step, (x, weights, experts, mats, scales), args.budget_s)
    hit = int(np.count_nonzero(np.bincount(np.asarray(experts).ravel(), minlength=E)))
    bytes_per_weight = 1 if scales is not None else 4
    weight_bytes = hit * 3 * D * F * bytes_per_weight
    gflops = useful_flops(T, k, D, F) / seconds / 1e9
    read_gbps = weight_bytes / seconds / 1e9
    return {
        **row,
        "ms": round(seconds * 1e3, 3),
        "calls": calls,
        "experts_hit": hit,
        "useful_gflops": round(gflops, 2),
        "useful_gflops_over_matmul_rate": round(gflops / limits["matmul_gflops"], 3),
        "weight_read_gbps": round(read_gbps, 2),
        "weight_read_over_bandwidth": round(read_gbps / limits["read_gbps"], 3),
        "noise": noise.__dict__,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--quick", action="store_true", help="T in 1, 64 only; less time each")
    parser.add_argument("--budget-s", type=float, default=2.0, help="timing budget per case")
    parser.add_argument("--max-gflop", type=float, default=150.0, help="skip bigger cases")
    args = parser.parse_args(argv)
    tokens = (1, 64) if args.quick else TOKENS
    if args.quick:
        args.budget_s = min(args.budget_s, 0.5)

    result = {
        "defaults": {
            "method": moe.DEFAULT_METHOD,
            "methods": list(moe.METHODS),
            "max_block_rows": moe.MAX_BLOCK_ROWS,
            "dtype": "float32",
            "devices": jax.device_count(),
            "backend": jax.default_backend(),
        },
        "config": {"layers": LAYERS, "tokens": list(tokens), **vars(args) | {"out": str(args.out)}},
    }
    bandwidth = common.measure_read_bandwidth(gib=0.5, repeats=5)
    matmul = common.measure_matmul_rate(size=2048, repeats=5)
    limits = {"read_gbps": bandwidth["best_read_gbps"], "matmul_gflops": matmul["jax_gflops"]}
    result["machine"] = {"limits": limits, "read_bandwidth": bandwidth, "matmul_rate": matmul}

    rows = []
    for name, dims in LAYERS.items():
        mats, router = layer(**dims)
        for T in tokens:
            for method in moe.METHODS:
                rows.append(measure(name, dims, T, method, mats, None, router, limits, args))
                print(json.dumps(rows[-1]), flush=True)
            default = moe._block_rows(T, dims["k"], dims["E"])
            for block in sorted({max(1, default // 2), min(T, default * 2)} - {default}):
                if T >= 8:
                    rows.append(
                        measure(name, dims, T, "blocks", mats, None, router, limits, args, block)
                    )
                    print(json.dumps(rows[-1]), flush=True)
            if name == "mixtral_like":
                quantized = [quantize.quantize(w) for w in mats]
                q_mats = tuple(q for q, _ in quantized)
                q_scales = tuple(s for _, s in quantized)
                for method in ("blocks", "ragged"):
                    rows.append(
                        measure(name, dims, T, method, q_mats, q_scales, router, limits, args)
                    )
                    print(json.dumps(rows[-1]), flush=True)
        del mats
    result["results"] = rows
    result["fastest"] = fastest(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_moe_dispatch.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["fastest"], indent=1))
    print(f"wrote {path}")
    return result


def fastest(rows: list[dict]) -> dict[str, str]:
    """Per float32 (layer, T): the fastest method at its default block size."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if "ms" not in r or r["int8"] or "block_rows" in r:
            continue
        key = f"{r['layer']} T={r['T']}"
        if key not in best or r["ms"] < best[key][0]:
            best[key] = (r["ms"], r["method"])
    return {key: f"{method} ({ms} ms)" for key, (ms, method) in best.items()}


if __name__ == "__main__":
    main()
