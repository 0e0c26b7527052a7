"""A scanned layer's float32 matmul on CPU, three ways, by rows: jaxllm's kernel reading the
layer in place in its stack, XLA's matmul of the layer's slice (XLA copies it out first),
and XLA's matmul of per-layer arrays (an unrolled model). Sets
``jaxllm.quantize.FLOAT_KERNEL_MAX_ROWS``: the kernel takes the rows where it is faster.

    python scripts/bench_layer_matmul.py [--out out/layer_matmul] [--layers 8]

One CPU device, float32, a Llama MLP-sized weight per layer ([2816, 1024], 11.5 MB); each
figure is the best of 7 runs of a scan over the layers. Writes ``layer_matmul.json``. Run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.pop("XLA_FLAGS", None)  # one CPU device, as a user gets it
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import cpu_kernels  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 288)


def best_ms(fn, *args, repeats: int = 7) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/layer_matmul"))
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    out_features, width = 2816, 1024
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((args.layers, out_features, width), np.float32))
    per_layer = [stack[i] for i in range(args.layers)]

    def scanned(product):
        def run(x, stack):
            def body(x, i):  # the next layer's input depends on this one's output
                return x + product(x, stack, i)[:, :width] * 1e-3, None

            return jax.lax.scan(body, x, jnp.arange(args.layers))[0]

        return jax.jit(run)

    kernel = scanned(cpu_kernels.matmul)
    sliced = scanned(lambda x, stack, i: x @ stack[i].T)

    @jax.jit
    def unrolled(x, layers):
        for w in layers:
            x = x + (x @ w.T)[:, :width] * 1e-3
        return x

    rows = []
    for r in ROWS:
        x = jnp.asarray(rng.standard_normal((r, width), np.float32))
        row = {
            "rows": r,
            "kernel_ms": best_ms(kernel, x, stack),
            "xla_sliced_ms": best_ms(sliced, x, stack),
            "xla_unrolled_ms": best_ms(unrolled, x, per_layer),
        }
        row["kernel_over_best_xla"] = row["kernel_ms"] / min(
            row["xla_sliced_ms"], row["xla_unrolled_ms"]
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "weight": [out_features, width],
        "layers": args.layers,
        "cores": os.cpu_count(),
        "rows": rows,
    }
    (args.out / "layer_matmul.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
