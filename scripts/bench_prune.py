"""Benchmark: structured MLP pruning of the demo model, quality and speed.

For the full model, for 25% and 50% of every layer's MLP channels removed, and for half the
query heads removed, each both by the importance measures of ``jaxllm.prune`` and at random
(the baseline), it reports:
parameters, held-out perplexity (the first half of the demo model's held-out files; the
other half calibrates), and batch-1 greedy decode tokens/s through the serving engine.

Decode speed is measured in interleaved rounds (every model once per round, median over
rounds; "shape": the median of every timing of the models of that shape, importance and
random alike), so that load from other processes on a shared CPU hits all models alike. This
run also times single decode steps of the model alone (the jitted forward, no engine) and
keeps the fastest, the figure least disturbed by other processes. This
machine's memory read bandwidth is measured in the same run: batch-1 decode streams every
weight once per token, so weight bytes x tokens/s against it says how near the limit a
model runs.

    python scripts/bench_prune.py [--rounds 9] [--tokens 128] [--eval-windows 256]

Writes out/bench_prune.json and prints a table. One CPU device (the default on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import jaxllm
from jaxllm import prune

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):"


def read_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best of a few full reads (a sum) of a buffer far larger than the caches."""
    buf = np.ones(nbytes // 8, np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def decode_seconds(llm, tokens: int) -> float:
    start = time.perf_counter()
    out = llm.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == tokens
    return time.perf_counter() - start


def step_seconds(llm, calls: int, state: dict) -> list[float]:
    """Wall time of each of ``calls`` batch-1 decode steps of the model alone (the engine's
    jitted step for one decode row at position 100 over its own pages; no sampler, no
    engine loop). ``state`` carries the donated pool between calls."""
    from jaxllm import step

    engine = llm.engine
    if "inputs" not in state:
        inp = step.padding_only((1, 0), engine.config, engine.num_pages)
        pages = np.arange(engine.config.max_pages_per_seq, dtype=np.int32)[None]
        state["inputs"] = inp._replace(
            tokens=np.array([7], np.int32),
            positions=np.array([100], np.int32),
            decode_pages=pages % engine.num_pages,
            decode_kv_len=np.array([101], np.int32),
            sampling=None,
            sample_step=None,
        )
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        logits, engine.pool = engine._step._model(
            engine.runner.params, engine.pool, state["inputs"]
        )
        logits.block_until_ready()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per timing")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=256, help="256-token windows")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_prune.json")
    args = parser.parse_args()

    full = jaxllm.LLM.load(warm_up=False, max_num_seqs=1)
    calibration, heldout = prune.demo_texts()
    calib = prune.token_windows(full.tokenizer, calibration, 256, limit=args.calibration_windows)
    evaluation = prune.token_windows(
        full.tokenizer, heldout, 257, stride=256, limit=args.eval_windows
    )
    start = time.perf_counter()
    scores = {"importance": prune.importance(full, calib)}
    scoring_s = time.perf_counter() - start
    scores["random"] = prune.random_importance(full.config, seed=0)

    models = {"full": full}
    for fraction in (0.25, 0.5):
        for how, importance in scores.items():
            models[f"{how} mlp-{fraction:.0%}"] = prune.pruned_llm(
                full, importance, remove_fraction=fraction
            )
    for how, importance in scores.items():  # half the query heads (one per KV group)
        models[f"{how} heads-50%"] = prune.pruned_llm(
            full, importance, remove_fraction=0.0, heads_fraction=0.5
        )

    rows = {}
    for name, llm in models.items():
        cfg = llm.config
        rows[name] = {
            "intermediate_size": cfg.intermediate_size,
            "num_heads": cfg.num_heads,
            "params": cfg.num_params,
            "weight_bytes": cfg.num_params * 4,
            "heldout_ppl": prune.perplexity(llm, evaluation),
        }
        decode_seconds(llm, args.tokens)  # compiles this model's prefill and decode steps
        print(f"{name}: perplexity {rows[name]['heldout_ppl']:.2f}", flush=True)

    bandwidth = read_bandwidth_gbs()
    times = {name: [] for name in models}
    steps = {name: [] for name in models}
    step_state = {name: {} for name in models}
    for name, llm in models.items():
        step_seconds(llm, 3, step_state[name])  # compile
    for _ in range(args.rounds):
        for name, llm in models.items():
            times[name].append(decode_seconds(llm, args.tokens))
            steps[name].extend(step_seconds(llm, 50, step_state[name]))
    # Models of one shape (importance or random) run the same computation: their timings
    # pooled give a steadier figure on a shared CPU.
    by_shape: dict[tuple, list[float]] = {}
    for name, row in rows.items():
        by_shape.setdefault((row["intermediate_size"], row["num_heads"]), []).extend(times[name])
    for name, row in rows.items():
        row["decode_tok_s"] = args.tokens / statistics.median(times[name])
        shape_times = by_shape[(row["intermediate_size"], row["num_heads"])]
        row["decode_tok_s_same_shape"] = args.tokens / statistics.median(shape_times)
        row["decode_s_all_rounds"] = times[name]
        # The fastest of many single steps: the least disturbed by other processes.
        row["model_step_ms_min"] = 1e3 * min(steps[name])
        row["model_step_ms_median"] = 1e3 * statistics.median(steps[name])
        # Weights streamed per second at that rate (the embedding table is only indexed).
        streamed = row["weight_bytes"] - full.config.vocab_size * full.config.hidden_size * 4
        row["weights_gb_s"] = streamed * row["decode_tok_s"] / 1e9

    result = {
        "model": full.name,
        "measure": {"mlp": prune.MEASURE, "heads": prune.HEAD_MEASURE},
        "calibration_tokens": int(calib.size),
        "heldout_tokens": int(evaluation[:, 1:].size),
        "scoring_seconds": scoring_s,
        "decode_tokens_per_timing": args.tokens,
        "rounds": args.rounds,
        "read_bandwidth_gb_s": bandwidth,
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    base = rows["full"]
    print(
        f"\n{result['heldout_tokens']} held-out tokens, {result['calibration_tokens']} "
        f"calibration tokens; memory read bandwidth {bandwidth:.1f} GB/s"
    )
    print(
        f"{'model':<22} {'F':>5} {'N':>3} {'params':>10} {'ppl':>8} {'d ppl':>7} "
        f"{'tok/s':>7} {'shape':>6} {'x':>5} {'step ms':>8} {'x':>5}"
    )
    for name, row in rows.items():
        print(
            f"{name:<22} {row['intermediate_size']:>5} {row['num_heads']:>3} {row['params']:>10,} "
            f"{row['heldout_ppl']:>8.2f} {row['heldout_ppl'] / base['heldout_ppl'] - 1:>+7.1%} "
            f"{row['decode_tok_s']:>7.0f} {row['decode_tok_s_same_shape']:>6.0f} "
            f"{row['decode_tok_s_same_shape'] / base['decode_tok_s_same_shape']:>5.2f} "
            f"{row['model_step_ms_min']:>8.3f} "
            f"{base['model_step_ms_min'] / row['model_step_ms_min']:>5.2f}"
        )
    print(f"wrote {args.out}")
    for llm in models.values():
        llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
