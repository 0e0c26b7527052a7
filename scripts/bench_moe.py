"""Mixture-of-Experts decode: jaxllm against Hugging Face transformers on the same Mixtral
weights, with the machine's memory bandwidth measured in the same run.

A random Mixtral-style model is written by transformers (default: 8 experts, top-2, ~1.1 GB of
float32, a quarter of the expert weights active per token), then, in one process with one CPU
device and the library's defaults:

- jaxllm: ``LLM.load(path)``, greedy decode at batch 1 and at batch 8 (``--batch``);
- transformers: ``MixtralForCausalLM.generate`` of the same prompts, one request and batched;
- the limit: a decode step at batch 1 must read the weights a token uses (attention, the
  router, its k experts per layer, the head): bytes / the best measured read bandwidth.

Writes ``bench_moe.json``: tokens/s of each, the ratios (jaxllm / transformers, jaxllm /
limit), greedy agreement of the two outputs, expert load balance from the engine's stats.

    python scripts/bench_moe.py --out out/       # defaults (about 5 minutes here)
    python scripts/bench_moe.py --quick          # a smaller model, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# One CPU device: fake host devices would share the same cores (DESIGN.md).
os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _bench_common import (  # noqa: E402
    engine_round,
    engine_stats,
    make_prompts,
    measure_read_bandwidth,
    noise_meter,
)

import jaxllm  # noqa: E402
from jaxllm.tokenizer import byte_level_tokenizer  # noqa: E402


@dataclasses.dataclass
class Dims:
    hidden: int = 1024
    intermediate: int = 2816  # each expert's
    layers: int = 4
    heads: int = 16
    kv_heads: int = 4
    experts: int = 8
    top_k: int = 2
    vocab: int = 8192
    seed: int = 0


QUICK = Dims(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512)


def write_mixtral(folder: Path, dims: Dims) -> dict:
    """A random float32 Mixtral written by transformers, plus the byte-level tokenizer; the
    bytes a batch-1 decode step reads."""
    import torch
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        num_local_experts=dims.experts,
        num_experts_per_tok=dims.top_k,
        vocab_size=dims.vocab,
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(dims.seed)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer().save(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    D, H = dims.hidden, dims.hidden // dims.heads
    expert = 3 * D * dims.intermediate
    attention = D * H * (2 * dims.heads + 2 * dims.kv_heads)
    per_layer = attention + dims.experts * D + dims.top_k * expert + 2 * D
    active = dims.layers * per_layer + dims.vocab * D + D + D  # + head, final norm, one row
    return {
        **dataclasses.asdict(dims),
        "params": params,
        "weight_bytes": params * 4,
        "active_params_per_token": active,
        "decode_bytes_per_token_batch1": active * 4,
    }


def hf_tokens_per_s(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """Greedy generate of ``prompts`` (equal lengths, no padding) in one batch."""
    import torch

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm
        with noise_meter() as noise:
            start = time.perf_counter()
            out = model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            wall = time.perf_counter() - start
    tokens = out[:, ids.shape[1] :].tolist()
    return len(prompts) * new_tokens / wall, tokens, dataclasses.asdict(noise)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--quick", action="store_true", help="a small model, few tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per system (best kept)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    args = p.parse_args(argv)
    dims = QUICK if args.quick else Dims()
    if args.quick:
        args.new_tokens, args.rounds = 16, 1
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "what": "Mixtral-style MoE decode, greedy, one CPU device, library defaults",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
    }
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    result["machine"]["torch"] = torch.__version__
    result["machine"]["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixtral"
        result["model"] = write_mixtral(folder, dims)
        print(f"model: {result['model']['params'] / 1e6:.0f}M parameters", flush=True)
        result["limits"] = {"read_bandwidth": measure_read_bandwidth(args.bandwidth_gib, 3)}
        gbps = result["limits"]["read_bandwidth"]["best_read_gbps"]
        limit = gbps * 1e9 / result["model"]["decode_bytes_per_token_batch1"]
        result["limits"]["batch1_tokens_per_s"] = limit

        start = time.perf_counter()
        llm = jaxllm.LLM.load(folder)  # defaults: one CPU device, unrolled layers, float32
        result["jaxllm_load_s"] = time.perf_counter() - start
        hf = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        runs = {}
        for batch in args.batch:
            prompts = make_prompts(batch, args.prompt_len, seed=batch)
            engine_round(llm, prompts[:1], 4)  # throwaway
            ours = [engine_round(llm, prompts, args.new_tokens) for _ in range(args.rounds)]
            best = max(ours, key=lambda r: r.tokens_per_s)
            theirs = [hf_tokens_per_s(hf, prompts, args.new_tokens) for _ in range(args.rounds)]
            hf_best = max(theirs, key=lambda r: r[0])
            agree = [
                int(np.argmin(np.equal(a + [-1], b + [-2])))
                for a, b in zip(best.token_ids, hf_best[1], strict=True)
            ]
            runs[str(batch)] = {
                "jaxllm_tokens_per_s": best.tokens_per_s,
                "jaxllm_rounds": [r.tokens_per_s for r in ours],
                "jaxllm_noise": dataclasses.asdict(best.noise),
                "transformers_tokens_per_s": hf_best[0],
                "transformers_rounds": [r[0] for r in theirs],
                "transformers_noise": hf_best[2],
                "ratio_jaxllm_over_transformers": best.tokens_per_s / hf_best[0],
                "greedy_matching_prefix_tokens": agree,
            }
            if batch == 1:
                runs["1"]["ratio_jaxllm_over_limit"] = best.tokens_per_s / limit
            print(
                f"batch {batch}: jaxllm {best.tokens_per_s:.1f} tok/s, transformers "
                f"{hf_best[0]:.1f} tok/s",
                flush=True,
            )
        result["decode"] = runs
        stats = engine_stats(llm)
        result["expert_load"] = {
            "expert_tokens": stats.get("expert_tokens"),
            "imbalance": stats.get("expert_load_imbalance"),
        }
        llm.close()
    out = args.out / "bench_moe.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
