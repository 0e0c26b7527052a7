# ruff: noqa: E402  (TQDM_DISABLE must be set before jaxllm imports tqdm)
"""Benchmark: what int8 weights, an int8 KV cache and MLP pruning cost and save, on this CPU.

For two models, the bundled demo model (5.2M parameters, trained on Python source) and a
larger random Llama written by ``transformers`` (~200M parameters by default), and for each
setting:

    f32           the model as stored (float32)
    int8          int8 weights, per-output-channel scales (``LLM.load(quantize="int8")``),
                  multiplied by jaxllm's CPU kernel where it applies (the default)
    int8-xla      the same weights multiplied by XLA's own code (kernels switched off, and
                  layers unrolled as they are without the kernels)
    int4          int4 weights, groups of 32 (``quantize="int4"``), kernel (the default)
    int4-xla      the same multiplied by XLA's own code
    int4-g128     int4 weights, groups of 128
    int8+kv8      int8 weights and an int8 KV cache (``kv_cache_dtype="int8"``)
    pruned25/50   25% / 50% of every layer's MLP channels removed (``jaxllm.prune``,
                  importance measured on calibration text), float32 (``--settings``)

it measures, in one process and one run:

- memory: weight bytes (summed over the loaded arrays, scales included) and KV-cache bytes
  per slot (from the engine's cache, scales included);
- speed: batch-1 decode tokens/s (engine with ``max_num_seqs=1``, the time between the first
  and the last token of a long greedy output, so prefill is excluded) and MBU = bytes a step
  must read (weights without the embedding table, plus the KV positions held) / step time /
  read bandwidth measured in the same run; and output tokens/s with 8 and 32 requests at
  once (an engine of ``max_num_seqs=32``);
- quality: perplexity of held-out text (the demo model: the files of the demo corpus that
  ``scripts/train_demo.py`` held out of training, rebuilt from this interpreter's stdlib; the
  random model: none, its text is noise) and the mean KL divergence of next-token
  distributions from float32's, KL(f32 || setting), over the same positions; greedy
  agreement with float32 over the first 32 tokens of a few prompts (common prefix).

The peer: Hugging Face transformers on the same random weights, float32 and with
``torch.ao.quantization.quantize_dynamic`` int8 linear layers, batch-1 greedy decode.
The limits: read bandwidth and float32 matmul rate, measured at the start (see
bench_engine.py for how).

Writes ``out/bench_quant.json`` and prints a table (the README's). Run from the repository
root; ~25 minutes on a quiet 2-core machine with the default ~1 GB random model (16 layers),
``--quick`` ~5 minutes with a small one:

    python scripts/bench_quant.py [--quick] [--out out]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
# Every shape compiled at load or in an untimed round, while the setting's kernel switch
# (cpu_kernels.switched_off, read when a program is traced) is set; not in the background.
os.environ["JAXLLM_BACKGROUND_COMPILE"] = "0"

import jax
import numpy as np
import torch
import transformers

import jaxllm
from jaxllm import cpu_kernels, orbax_checkpoint, prune
from jaxllm.params import named_params, param_bytes

sys.path.insert(0, str(Path(__file__).parent))
import bench_engine  # noqa: I001  (helpers: limits, noise meter, the random checkpoint)

GB = 1e9
PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef main():",
    "for i in range(10):",
    "    def __repr__(self):",
    "if __name__ == '__main__':",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    load_options: dict  # LLM.load keyword arguments
    prune_fraction: float = 0.0  # fraction of MLP channels removed first
    kernels: bool = True  # False: jaxllm's CPU kernel switched off (XLA's own code)

    def load(self, path: Path, **options) -> jaxllm.LLM:
        off = contextlib.nullcontext() if self.kernels else cpu_kernels.switched_off()
        with off:
            return jaxllm.LLM.load(path, **options, **self.load_options)


def _kernels_of(name: str):
    """The kernel switch of setting ``name``, for programs compiled after its load."""
    setting = next(s for s in SETTINGS if s.name == name)
    return contextlib.nullcontext() if setting.kernels else cpu_kernels.switched_off()


SETTINGS = (
    Setting("f32", {}),
    Setting("int8", {"quantize": "int8"}),
    # Without the kernels layers are unrolled (jaxllm.params.default_scan_layers).
    Setting("int8-xla", {"quantize": "int8", "scan_layers": False}, kernels=False),
    Setting("int4", {"quantize": "int4"}),
    Setting("int4-xla", {"quantize": "int4", "scan_layers": False}, kernels=False),
    Setting("int4-g128", {"quantize": "int4-g128"}),
    Setting("int8+kv8", {"quantize": "int8", "kv_cache_dtype": "int8"}),
    Setting("pruned25", {}, 0.25),
    Setting("pruned50", {}, 0.50),
)
DEFAULT_SETTINGS = ("f32", "int8", "int8-xla", "int4", "int4-xla", "int4-g128", "int8+kv8")
CONCURRENCY = (8, 32)


# -- quality -------------------------------------------------------------------------------


def windows_of(llm: jaxllm.LLM, texts: list[str], count: int, length: int) -> list[list[int]]:
    """Consecutive ``length``-token windows of the texts, each text ending in EOS."""
    eos = llm.config.eos_token_ids[0]
    stream = [t for text in texts for t in [*llm.tokenizer.encode(text), eos]]
    return [stream[i * length : (i + 1) * length] for i in range(min(count, len(stream) // length))]


def log_probs(llm: jaxllm.LLM, windows: list[list[int]]) -> list[np.ndarray]:
    """Next-token log-probabilities ``[T - 1, V]`` for each window."""
    out = []
    for ids in windows:
        logits = llm.logits(ids)[:-1].astype(np.float64)
        out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    return out


def quality(windows, logp: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Perplexity of the windows' next tokens, and mean KL(reference || this) in nats."""
    nll = -sum(
        lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum()
        for ids, lp in zip(windows, logp, strict=True)
    )
    count = sum(len(ids) - 1 for ids in windows)
    kl = sum((np.exp(r) * (r - lp)).sum() for r, lp in zip(reference, logp, strict=True)) / count
    return {"perplexity": float(np.exp(nll / count)), "kl_vs_f32_nats": float(kl), "tokens": count}


# -- speed ---------------------------------------------------------------------------------


def decode_read_bytes(llm: jaxllm.LLM, held_positions: float) -> dict:
    """Bytes one batch-1 decode step must read: every weight but the embedding table (one
    row is gathered), and the KV cache's bytes for the positions the request holds."""
    weights = named_params(llm.runner.state)
    table = sum(weights[n].value().nbytes for n in ("embed", "embed_scale") if n in weights)
    weight_bytes = param_bytes(llm.runner.state)
    if not llm.config.tie_word_embeddings:
        weight_bytes -= table
    engine = llm.engine
    per_position = engine.kv_cache_bytes / (engine.num_pages * engine.config.page_size)
    kv = per_position * held_positions
    return {"weights": weight_bytes, "kv_cache": kv, "total": weight_bytes + kv}


def decode_speeds(engines: dict, prompt: list[int], args, read_gbps: float) -> dict:
    """Batch-1 decode of each engine (``max_num_seqs=1``), rounds interleaved, best kept."""
    best: dict = {}
    for llm in engines.values():
        bench_engine.engine_round(llm, [prompt], 4)  # compiles nothing new; warms caches
    for _ in range(args.rounds):
        for name, llm in engines.items():
            done = bench_engine.engine_round(llm, [prompt], args.decode_tokens)
            if name not in best or done.tpot_s[0] < best[name].tpot_s[0]:
                best[name] = done
    speeds = {}
    for name, done in best.items():
        step_s = done.tpot_s[0]
        read = decode_read_bytes(engines[name], len(prompt) + args.decode_tokens / 2)
        speeds[name] = {
            "step_ms": step_s * 1e3,
            "tokens_per_s": 1 / step_s,
            "bytes_read_per_step": read,
            "achieved_gbps": read["total"] / step_s / GB,
            "mbu": read["total"] / step_s / GB / read_gbps,
            "noise": dataclasses.asdict(done.noise),
        }
    return speeds


def _options(args) -> dict:
    return dict(mesh={"tensor": 1}, max_seq_len=args.max_seq_len)


# -- one model, every setting --------------------------------------------------------------


def prepare(setting: Setting, source: Path, work: Path, texts: tuple[list, list]) -> Path:
    """The checkpoint a setting loads: the source, or a copy of it pruned by importance
    measured on the calibration texts (``texts``: calibration, evaluation)."""
    if not setting.prune_fraction:
        return source
    out = work / setting.name
    prune.prune_checkpoint(
        source,
        out,
        mlp_fraction=setting.prune_fraction,
        calibration_text=texts[0],
        eval_text=texts[1],
        mesh={"tensor": 1},
        log=lambda line: None,
    )
    return out


def run_model(name: str, source: Path, windows, texts, prompts, args, read_gbps) -> dict:
    """Every setting on one model; the float32 logits are the KL reference. Speed is measured
    with every setting's engine loaded at once, taking turns round by round (best kept), so
    a background process slows them alike instead of skewing the ratios."""
    results: dict = {}
    reference = None
    reference_tokens: list[list[int]] | None = None
    decode_prompt = prompts[0]
    settings = [s for s in SETTINGS if s.name in args.settings]
    with tempfile.TemporaryDirectory(prefix=f"bench_quant_{name}_") as work:
        paths, engines = {}, {}
        for setting in settings:
            print(f"  {name}: {setting.name}", flush=True)
            paths[setting.name] = prepare(setting, source, Path(work), texts)
            try:
                llm = setting.load(paths[setting.name], max_num_seqs=1, **_options(args))
            except ValueError as e:  # a group size this model's widths do not divide
                print(f"  {name}: {setting.name} skipped: {e}", flush=True)
                results.setdefault("skipped", {})[setting.name] = str(e)
                continue
            row: dict = {}
            row["params"] = llm.config.num_params
            row["weight_bytes"] = param_bytes(llm.runner.state)
            pool_tokens = llm.engine.num_pages * llm.engine.config.page_size
            row["kv_bytes_per_token"] = llm.engine.kv_cache_bytes / pool_tokens
            row["kv_bytes_per_slot"] = row["kv_bytes_per_token"] * args.max_seq_len
            logp = log_probs(llm, windows)
            if reference is None:
                reference = logp
            row["quality"] = quality(windows, logp, reference)
            outputs = llm.generate(prompts, max_tokens=32, temperature=0, ignore_eos=True)
            tokens = [o.token_ids for o in outputs]
            if reference_tokens is None:
                reference_tokens = tokens
            row["greedy_agreement_32"] = sum(
                bench_engine.common_prefix(a, b)
                for a, b in zip(reference_tokens, tokens, strict=True)
            ) / (32 * len(prompts))
            results[setting.name], engines[setting.name] = row, llm
        skipped = results.pop("skipped", {})
        settings = [s for s in settings if s.name not in skipped]
        print(f"  {name}: batch-1 decode, settings taking turns", flush=True)
        for setting_name, speed in decode_speeds(engines, decode_prompt, args, read_gbps).items():
            results[setting_name]["decode_batch1"] = speed
        for llm in engines.values():
            bench_engine.release(llm)
        print(f"  {name}: {CONCURRENCY} concurrent requests, settings taking turns", flush=True)
        # Compiled on demand (warm_up=False), by an untimed round per count: compiling every
        # shape of a 32-row engine for each setting took longer than the measurement.
        engines = {
            s.name: s.load(
                paths[s.name], max_num_seqs=max(CONCURRENCY), warm_up=False, **_options(args)
            )
            for s in settings
        }
        for count in CONCURRENCY:
            for setting_name, llm in engines.items():
                with _kernels_of(setting_name):
                    bench_engine.engine_round(llm, [decode_prompt] * count, 8)
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for setting_name, llm in engines.items():
                    prompts_now = [decode_prompt] * count
                    done = bench_engine.engine_round(llm, prompts_now, args.decode_tokens // 2)
                    best[setting_name] = max(best.get(setting_name, 0.0), done.tokens_per_s)
            for setting_name in engines:
                results[setting_name][f"tokens_per_s_{count}_concurrent"] = best[setting_name]
        for llm in engines.values():
            bench_engine.release(llm)
        gc.collect()
    base = results["f32"]
    for row in results.values():
        row["weight_ratio_vs_f32"] = row["weight_bytes"] / base["weight_bytes"]
        row["kv_slots_per_byte_vs_f32"] = base["kv_bytes_per_slot"] / row["kv_bytes_per_slot"]
        row["decode_speedup_vs_f32"] = (
            row["decode_batch1"]["tokens_per_s"] / base["decode_batch1"]["tokens_per_s"]
        )
        for count in CONCURRENCY:
            key = f"tokens_per_s_{count}_concurrent"
            row[f"speedup_{count}_concurrent_vs_f32"] = row[key] / base[key]
        row["perplexity_change_vs_f32"] = (
            row["quality"]["perplexity"] / base["quality"]["perplexity"] - 1
        )
    return results


# -- the peer: transformers on the same random weights ------------------------------------


def hf_decode_tokens_per_s(model, prompt: list[int], tokens: int) -> float:
    """Batch-1 greedy decode tokens/s: (time for ``tokens`` - time for 1) / (tokens - 1)."""

    def run(n):
        start = time.perf_counter()
        bench_engine.hf_generate(model, [prompt], n)
        return time.perf_counter() - start

    run(2)
    one = min(run(1) for _ in range(2))
    full = min(run(tokens) for _ in range(2))
    return (tokens - 1) / (full - one)


def run_peer(source: Path, prompt: list[int], tokens: int) -> dict:
    model = bench_engine.load_hf(source)
    out = {"f32_tokens_per_s": hf_decode_tokens_per_s(model, prompt, tokens)}
    try:
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
        out["dynamic_int8_tokens_per_s"] = hf_decode_tokens_per_s(quantized, prompt, tokens)
    except Exception as e:  # the API is deprecated in newer torch: say so, not fail
        out["dynamic_int8_error"] = f"{type(e).__name__}: {e}"
    del model
    gc.collect()
    return out


# -- report --------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [
        "| model | setting | params | weights MB (x f32) | KV slots per byte (x f32) | "
        "decode tok/s batch 1 (x f32) | MBU | tok/s at 8 (x f32) | tok/s at 32 (x f32) | "
        "perplexity (change) | KL nats | greedy 32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in ("demo", "random"):
        for name, r in results.get(model, {}).items():
            q = r["quality"]
            ppl = (
                f"{q['perplexity']:.2f} ({r['perplexity_change_vs_f32']:+.1%})"
                if model == "demo"
                else "-"
            )
            lines.append(
                f"| {model} | {name} | {r['params'] / 1e6:.2f}M | "
                f"{r['weight_bytes'] / 1e6:.1f} ({r['weight_ratio_vs_f32']:.3f}) | "
                f"{r['kv_slots_per_byte_vs_f32']:.2f} | "
                f"{r['decode_batch1']['tokens_per_s']:.1f} ({r['decode_speedup_vs_f32']:.2f}) | "
                f"{r['decode_batch1']['mbu']:.2f} | "
                + "".join(
                    f"{r[f'tokens_per_s_{c}_concurrent']:.1f} "
                    f"({r[f'speedup_{c}_concurrent_vs_f32']:.2f}) | "
                    for c in CONCURRENCY
                )
                + f"{ppl} | {q['kl_vs_f32_nats']:.4f} | {r['greedy_agreement_32']:.0%} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small random model, fewer windows")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--windows", type=int, default=24, help="held-out windows of 256 tokens")
    p.add_argument("--decode-tokens", type=int, default=96)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)  # head dim 128, as Llama (int4-g128 fits)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=[s.name for s in SETTINGS]
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (best kept)")
    p.add_argument("--models", nargs="+", default=["demo", "random"], choices=["demo", "random"])
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 1408, 4, 8, 2
        args.windows, args.decode_tokens = 8, 48
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    results["machine"] = {
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
    }
    print("machine limits", flush=True)
    bandwidth = bench_engine.measure_read_bandwidth(1.0, 5)
    results["machine"]["read_bandwidth"] = bandwidth
    results["machine"]["matmul"] = bench_engine.measure_matmul_rate(2048, 5)
    read_gbps = bandwidth["best_read_gbps"]

    if "demo" in args.models:
        print("demo model", flush=True)
        demo = jaxllm.LLM.load(mesh={"tensor": 1}, max_seq_len=args.max_seq_len, warm_up=False)
        # Held-out files the model never trained on: the first half is scored, the second half
        # calibrates pruning (jaxllm.prune.demo_texts).
        calibration_texts, eval_texts = prune.demo_texts()
        scored = windows_of(demo, eval_texts, args.windows, args.max_seq_len)
        prompts = [demo.tokenizer.encode(p) for p in PROMPTS]
        bench_engine.release(demo)
        results["demo"] = run_model(
            "demo",
            jaxllm.demo.demo_model_dir(),
            scored,
            (calibration_texts, eval_texts),
            prompts,
            args,
            read_gbps,
        )

    if "random" in args.models:
        print("random model", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_quant_random_") as folder:
            hf_dir, source = Path(folder) / "hf", Path(folder) / "orbax"
            args.prompt_len, args.decode_seq_len = 32, args.max_seq_len
            results["random_model"] = bench_engine.build_checkpoint(hf_dir, args)
            orbax_checkpoint.convert_hf_to_orbax(hf_dir, source)  # pruning reads Orbax
            rng = np.random.default_rng(1)
            # Random bytes: the random model's "text" (its perplexity means nothing; KL does).
            noise = ["".join(map(chr, rng.integers(32, 127, 4096))) for _ in range(4)]
            demo_like = jaxllm.LLM.load(source, mesh={"tensor": 1}, max_seq_len=256, warm_up=False)
            random_windows = windows_of(demo_like, noise[2:], 4, 128)
            bench_engine.release(demo_like)
            random_prompts = bench_engine.make_prompts(len(PROMPTS), 32, seed=2)
            results["random"] = run_model(
                "random",
                source,
                random_windows,
                (noise[:2], noise[2:]),
                random_prompts,
                args,
                read_gbps,
            )
            print("  transformers peer", flush=True)
            results["peer_transformers"] = run_peer(hf_dir, random_prompts[0], args.decode_tokens)
        peer, engine = results["peer_transformers"], results["random"]
        results["ratios"] = {}
        for name in engine:  # jaxllm batch-1 decode against the peer's, on the same weights
            tokens_per_s = engine[name]["decode_batch1"]["tokens_per_s"]
            results["ratios"][f"{name}_vs_transformers_f32"] = (
                tokens_per_s / peer["f32_tokens_per_s"]
            )
            if "dynamic_int8_tokens_per_s" in peer:
                results["ratios"][f"{name}_vs_transformers_dynamic_int8"] = (
                    tokens_per_s / peer["dynamic_int8_tokens_per_s"]
                )
    results["total_s"] = time.perf_counter() - started
    report = table(results)
    print(report)
    peers = {k: results[k] for k in ("peer_transformers", "ratios") if k in results}
    print(json.dumps(peers, indent=1))
    (args.out / "bench_quant.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out / 'bench_quant.json'} in {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
