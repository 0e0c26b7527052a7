# ruff: noqa: E402  (TQDM_DISABLE must be set before jaxllm imports tqdm)
"""Benchmark: the paged jaxllm engine as a user gets it, against transformers and the machine.

Everything runs in processes with ONE CPU device (no fake host devices: they share the same
cores), and every engine figure is measured first with ``jaxllm.LLM.load(path)`` and the
library's defaults, as a user calls it; tuned settings follow, labelled as such.

1. The machine's limits, in the same run (start and end): memory read bandwidth (best of
   jitted jnp.sum / matvec, torch.sum, numpy sum) and float32 matmul rate. MBU divides the
   bytes a decode step must read by its time and by the best read bandwidth seen.
2. Two random float32 Llamas written by transformers (``save_pretrained``) with jaxllm's
   byte-level tokenizer, so both systems load the same weights: "llama8" (8 layers, D=768,
   12 heads / 4 KV heads, F=2048, ~100M parameters) and "llama24" (24 layers, D=1024, 16 / 4
   heads, F=2048, ~1.1 GB). ``--quick`` uses one small model and levels 1 and 8.
3. Per model, with the defaults: batch-1 decode step (one long greedy request; first token
   to last) and its MBU; output tokens/s at 1, 8, 32, 64, 128 concurrent requests (all
   submitted at once through ``llm.engine.submit``, greedy, ``ignore_eos``), with TTFT and
   TPOT percentiles, taking turns with transformers' batched ``generate`` of the same prompts
   (best of each kept), and against transformers one request at a time (a few requests
   timed, taking turns with the engine's batch-1 rounds; c requests take c x the fastest).
   On the 24-layer model also ``max_num_seqs=1`` taking turns with the defaults: the step
   time ratio says what the default capacity costs a lone request (target within 15%).
   Tuned: ``--tuned`` options (default ``max_num_seqs=128``) at ``--tuned-levels`` on
   ``--tuned-models``.
4. A child process (no torch in it, so its peak RSS is the engine's), the 8-layer model with
   ``LLM.load(path, max_seq_len=4096)``: long-prompt interference (16 streams decoding, then
   a ~2,000-token prompt arrives; every stream's gaps between token updates, from steady
   state until each has made ``--gap-tokens`` more tokens after the prompt's first token;
   target: p99 <= 3 x the median of steady decode before the prompt) and the process's peak
   RSS (target < 4 GiB); then prefix-cache TTFT (two requests sharing a 1,024-token prefix,
   the second submitted after the first finished: TTFT second / first, target <= 0.2; a
   fresh prefix per trial, the median trial kept).
5. Tokens in flight per GiB of KV memory: the 8-layer model with a KV pool of 8 x 1,024
   tokens (``kv_cache_bytes``), 64 requests of 200 tokens submitted at once, polling
   ``llm.engine.stats()``: the most running at once, the most pages held by running
   sequences (tokens in flight, per GiB) and how many whole requests those pages are
   (target >= 32 for both counts).
6. XLA compilations inside every timed region (jax.monitoring's backend-compile event,
   and the engine's own ``compiles`` counter): every one must be 0.

Another process on the machine skews every number, so systems take turns and every
measurement records how many cores other processes kept busy (``other_cpu_cores``).
Writes a table to stdout, ``out/bench_engine.json`` (every number, ratios, targets) and
``out/bench_engine.png`` (tokens/s against concurrency, both models, log axes; needs
matplotlib). The engine's warm-up at each ``LLM.load`` (six loads; four with ``--quick``)
takes much of the run. Run from the repository root:

    python scripts/bench_engine.py [--quick] [--models llama8 llama24] [--out out]

On an accelerator without torch (``scripts/device_check.sh``), ``--engine-only`` runs the
engine alone: a random Llama written without transformers (``--models llama1b --dtype
bfloat16``), batch-1 decode MBU against the device's read bandwidth measured in the same run,
tokens/s at ``--concurrency``, compiles in timed regions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # loading bars would drown the table

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm

sys.path.insert(0, str(Path(__file__).parent))
from _bench_common import (
    GIB,
    Regions,
    best_time,
    build_checkpoint,
    common_prefix,
    engine_round,
    engine_stats,
    hf_generate,
    hf_one_request,
    load,
    load_hf,
    make_prompts,
    measure_hf_batched,
    measure_matmul_rate,
    measure_read_bandwidth,
    noise_meter,
    peak_rss_bytes,
    percentiles,
    release,
)
from _bench_engine_report import decode_result, plot, print_report, summarise, summarise_rounds

# bench_quant.py imports these from here.
__all__ = ["build_checkpoint", "common_prefix", "engine_round", "hf_generate", "load_hf"]
__all__ += ["make_prompts", "measure_matmul_rate", "measure_read_bandwidth", "release"]


@dataclasses.dataclass(frozen=True)
class ModelDims:
    label: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    seed: int = 0


MODELS = {
    "llama8": ModelDims("8-layer ~100M", 768, 2048, 8, 12, 4),
    "llama24": ModelDims("24-layer ~1.1 GB", 1024, 2048, 24, 16, 4),
    "quick": ModelDims("quick 4-layer ~20M", 256, 704, 4, 4, 2),
    # --engine-only (accelerators): TinyLlama-1.1B's shape, and a tiny one for dry runs.
    "llama1b": ModelDims("22-layer ~1.1B", 2048, 5632, 22, 32, 4),
    "tiny": ModelDims("tiny 2-layer ~1M", 64, 128, 2, 4, 2, vocab=512),
}
CHILD_MAX_SEQ_LEN = 4096  # the interference and peak-RSS setting
TARGETS = {
    "mbu_batch1": 0.7,
    "step_ratio_max_num_seqs_64_over_1": 1.15,
    "over_hf_batched_at_32_and_64": 2.0,
    "prefix_ttft_ratio": 0.2,
    "interference_p99_over_steady_p50": 3.0,
    "peak_rss_gib": 4.0,
    "concurrent_200_token_requests_in_8x1024_pool": 32,
}


# -- per model: batch-1 decode, concurrency sweep ------------------------------------------


def batch1(name, path, llm, hf, model, args, regions, with_seqs1: bool) -> dict:
    """Batch-1 decode rounds of the default engine (and of ``max_num_seqs=1``) taking turns
    with transformers' one-at-a-time requests."""
    engines, out = {"defaults": llm}, {}
    if with_seqs1:
        engines["max_num_seqs=1"], out["max_num_seqs=1_load"] = load(path, regions, max_num_seqs=1)
    prompts = make_prompts(args.rounds + 1, args.prompt_len, seed=1)
    extra = make_prompts(args.hf_sequential_requests, args.prompt_len, seed=7)
    for e in engines.values():
        engine_round(e, [prompts[0]], 4)  # throwaway: compiles nothing, warms caches
    hf_one_request(hf, prompts[0], 4)
    rounds: dict[str, list] = {k: [] for k in engines}
    hf_s, hf_noise, hf_first = [], [], []
    for i in range(max(args.rounds, args.hf_sequential_requests)):
        for key, e in engines.items():
            if i < args.rounds:
                with regions.region(f"{name}/batch1/{key}/round{i}", e):
                    rounds[key].append(engine_round(e, [prompts[1 + i]], args.decode_tokens))
        if i < args.hf_sequential_requests:
            with noise_meter() as noise:  # the first repeats the engine's for agreement
                s, tokens = hf_one_request(hf, prompts[1] if i == 0 else extra[i], args.output_len)
            hf_s.append(s)
            hf_noise.append(dataclasses.asdict(noise))
            hf_first = hf_first or tokens
    if with_seqs1:
        release(engines["max_num_seqs=1"])
    out["decode"] = {k: decode_result(v, model, args) for k, v in rounds.items()}
    out["hf_sequential"] = {"request_s": hf_s, "output_len": args.output_len, "noise": hf_noise}
    out["greedy_agreement"] = {
        "tokens": args.output_len,
        "matching_prefix": common_prefix(rounds["defaults"][0].token_ids[0], hf_first),
    }
    return out


def sweep(name, label, llm, hf, levels, args, regions) -> dict:
    """At each concurrency: engine rounds taking turns with transformers' batched generate
    of the same prompts (``hf=None``: engine only); best of each."""
    out = {}
    for c in levels:
        print(f"    {label}: {c} concurrent", flush=True)
        prompts = make_prompts(c, args.prompt_len, seed=100 + c)
        engine_round(llm, prompts[: min(2, c)], 4)  # throwaway
        rounds, hf_rounds = [], []
        for i in range(args.rounds if c < 32 else args.rounds_large):
            with regions.region(f"{name}/{label}/c{c}/round{i}", llm):
                rounds.append(engine_round(llm, prompts, args.output_len))
            if hf is not None:
                hf_rounds.append(measure_hf_batched(hf, prompts, args.output_len))
        out[str(c)] = {"engine": summarise_rounds(rounds)}
        if hf_rounds:
            best = max(hf_rounds, key=lambda r: r["tokens_per_s"])
            best["tokens_per_s_all_rounds"] = [r["tokens_per_s"] for r in hf_rounds]
            out[str(c)]["hf_batched"] = best
    return out


def kv_capacity(name, path, model, args, regions) -> dict:
    """A KV pool of ``--kv-pool-tokens`` tokens (``kv_cache_bytes``); ``--kv-requests``
    requests of ``--kv-request-tokens`` tokens (half prompt, half output) submitted at once.
    Polled from ``llm.engine.stats()``: the most sequences running at once, and the most
    pages held by running sequences. Tokens in flight are those pages' positions (a
    sequence's last page may be partly empty); full-length requests in flight are the pages
    over the pages one whole request needs (a stricter count than ``running``, which also
    counts requests that are early in their prompt)."""
    pool_bytes = args.kv_pool_tokens * model["kv_bytes_per_token"]
    llm, info = load(path, regions, kv_cache_bytes=pool_bytes)
    half = args.kv_request_tokens // 2
    prompts = make_prompts(args.kv_requests, half, seed=300)
    engine_round(llm, make_prompts(2, half, seed=301), 4)  # throwaway
    params = jaxllm.SamplingParams(
        max_tokens=args.kv_request_tokens - half, temperature=0, ignore_eos=True
    )
    peak = {"running": 0, "pages_used": 0}
    before = engine_stats(llm)
    with noise_meter() as noise, regions.region(f"{name}/kv_capacity", llm):
        start = time.perf_counter()
        requests = [llm.engine.submit(p, params) for p in prompts]
        while any(r.finished_at is None for r in requests):
            stats = engine_stats(llm)
            peak = {k: max(v, stats.get(k, 0)) for k, v in peak.items()}
            time.sleep(0.005)
        wall = time.perf_counter() - start
    after = engine_stats(llm)
    kv_bytes, page_size = after["kv_cache_bytes"], after["page_size"]
    in_flight = peak["pages_used"] * page_size
    max_seq_len = info["max_seq_len"]
    release(llm)
    return {
        "load": info,
        "kv_cache_bytes_asked": pool_bytes,
        "kv_cache_bytes": kv_bytes,
        "pool_tokens": after["pages_total"] * page_size,
        "requests": args.kv_requests,
        "request_tokens": args.kv_request_tokens,
        "peak": peak,
        "tokens_in_flight": in_flight,
        "tokens_in_flight_per_gib": in_flight / (kv_bytes / GIB),
        "full_requests_in_flight": peak["pages_used"] // -(-args.kv_request_tokens // page_size),
        "slot_engine_equivalent": args.kv_pool_tokens // max_seq_len if max_seq_len else None,
        "preemptions": after["preemptions"] - before["preemptions"],
        "tokens_per_s": args.kv_requests * params.max_tokens / wall,
        "noise": dataclasses.asdict(noise),
    }


def run_model(name, folder: Path, args, regions) -> dict:
    dims = MODELS[name]
    path = folder / name
    out: dict = {"label": dims.label, "model": build_checkpoint(path, dims)}
    hf = load_hf(path)
    print(f"  {name}: loading with the defaults", flush=True)
    llm, out["defaults_load"] = load(path, regions)
    print(f"  {name}: batch 1 (engine decode, transformers one at a time)", flush=True)
    out.update(batch1(name, path, llm, hf, out["model"], args, regions, name == args.mbu_model))
    out["sweep"] = sweep(name, "defaults", llm, hf, args.concurrency, args, regions)
    release(llm)
    del hf
    levels = [c for c in args.tuned_levels if c in args.concurrency]
    if args.tuned and levels and name in args.tuned_models:
        options = dict(kv.split("=", 1) for kv in args.tuned)
        options = {k: int(v) if v.isdigit() else v for k, v in options.items()}
        llm, info = load(path, regions, **options)
        label = "tuned " + " ".join(args.tuned)
        out["tuned"] = {"load": info, "sweep": sweep(name, label, llm, None, levels, args, regions)}
        release(llm)
    if name == args.latency_model:
        print(f"  {name}: tokens in flight per GiB of KV", flush=True)
        out["kv_capacity"] = kv_capacity(name, path, out["model"], args, regions)
    return out


# -- the latency child: interference, peak RSS, prefix cache --------------------------------


def wait_until(condition, timeout: float = 600.0) -> float:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.002)
    return time.perf_counter()


def interference(llm, args, regions) -> dict:
    """``--streams`` streams decode; once steady and ``--gap-tokens`` tokens further, a
    ``--long-prompt``-token prompt arrives; the window ends when every stream has made
    ``--gap-tokens`` tokens after that prompt's first token. A gap is the time between two
    of a stream's token updates (``on_update``) in the window."""
    n = args.streams
    events: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    requests: list = [None] * n

    def listener(i):
        def on_update(*_):
            if requests[i] is not None:
                events[i].append((time.perf_counter(), len(requests[i].output.token_ids)))

        return on_update

    def count(i):
        return events[i][-1][1] if events[i] else 0

    def all_past(marks):
        return all(count(i) >= marks[i] or requests[i].finished_at for i in range(n))

    prompts = make_prompts(n, args.prompt_len, seed=400)
    long_prompt = make_prompts(1, args.long_prompt, seed=401)[0]
    engine_round(llm, make_prompts(1, args.long_prompt, seed=402), 2)  # throwaway, other tokens
    room = CHILD_MAX_SEQ_LEN - args.prompt_len
    params = jaxllm.SamplingParams(max_tokens=min(room, 1024), temperature=0, ignore_eos=True)
    with noise_meter() as noise, regions.region("interference", llm):
        for i in range(n):
            requests[i] = llm.engine.submit(prompts[i], params, on_update=listener(i))
        t_steady = wait_until(lambda: all_past([4] * n))
        marks = [count(i) + args.gap_tokens for i in range(n)]
        t_submit = wait_until(lambda: all_past(marks))
        long = llm.engine.submit(long_prompt, jaxllm.SamplingParams(max_tokens=4, temperature=0))
        t_first = wait_until(lambda: long.first_token_at is not None)
        marks = [count(i) + args.gap_tokens for i in range(n)]
        t_end = wait_until(lambda: all_past(marks))
        for r in requests:
            r.cancel()
        long.wait()
    llm.engine.wait_idle()
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for stream in events:
        for (t0, n0), (t1, n1) in zip(stream, stream[1:], strict=False):
            if n1 > n0 and t0 >= t_steady and t1 <= t_end:
                phase = "before" if t1 <= t_submit else "during" if t1 <= t_first else "after"
                phases[phase].append(t1 - t0)
    gaps = [g for v in phases.values() for g in v]
    p = percentiles(gaps)
    return {
        "streams": n,
        "long_prompt_tokens": args.long_prompt,
        "gap_tokens": args.gap_tokens,
        "long_prompt_ttft_s": long.first_token_at - long.submitted_at,
        "gap_s": {**p, "max": max(gaps)},
        "p99_over_p50": p["p99"] / p["p50"],
        "per_phase_gap_s": {
            k: {**percentiles(v), "max": max(v, default=0.0)} for k, v in phases.items()
        },
        "p99_over_before_p50": p["p99"] / float(np.median(phases["before"])),
        "window_s": t_end - t_steady,
        "noise": dataclasses.asdict(noise),
    }


def prefix_ttft(llm, args, regions) -> dict:
    """Per trial a fresh ``--prefix-len``-token prefix: request A (prefix + 16 tokens), then,
    once A finished, request B (same prefix, other 16 tokens): TTFT of each."""
    params = jaxllm.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine_round(llm, make_prompts(1, args.prefix_len + 16, seed=499), 2)  # throwaway
    trials = []
    for t in range(args.prefix_trials):
        prefix = make_prompts(1, args.prefix_len, seed=500 + t)[0]
        tails = make_prompts(2, 16, seed=600 + t)
        row = {}
        for which, tail in zip(("first", "second"), tails, strict=True):
            before = engine_stats(llm)
            with noise_meter() as noise, regions.region(f"prefix/trial{t}/{which}", llm):
                request = llm.engine.submit(prefix + tail, params)
                request.wait()
            after = engine_stats(llm)
            hits = after.get("prefix_hit_tokens", 0) - before.get("prefix_hit_tokens", 0)
            row[which] = {
                "ttft_s": request.first_token_at - request.submitted_at,
                "prefix_hit_tokens": hits,
                "noise": dataclasses.asdict(noise),
            }
        row["ratio"] = row["second"]["ttft_s"] / row["first"]["ttft_s"]
        trials.append(row)
    median = sorted(trials, key=lambda r: r["ratio"])[len(trials) // 2]
    return {
        "prefix_len": args.prefix_len,
        "ratio": median["ratio"],
        "median_trial": median,
        "trials": trials,
    }


def child_latency(path: Path, args) -> dict:
    regions = Regions()
    llm, info = load(path, regions, max_seq_len=CHILD_MAX_SEQ_LEN)
    out = {"load": info, "peak_rss_after_load_bytes": peak_rss_bytes()}
    print("  latency child: long-prompt interference", flush=True)
    out["interference"] = interference(llm, args, regions)
    out["peak_rss_bytes"] = peak_rss_bytes()  # the engine's process: no torch in it
    print("  latency child: prefix-cache TTFT", flush=True)
    out["prefix_cache"] = prefix_ttft(llm, args, regions)
    out["compiles_in_timed_regions"] = regions.data
    llm.close()
    return out


def run_child(path: Path, argv: Sequence[str], out_file: Path) -> dict:
    command = [sys.executable, __file__, *argv, "--child-latency", str(path)]
    subprocess.run([*command, "--child-out", str(out_file)], check=True)
    return json.loads(out_file.read_text())


# -- --engine-only: an accelerator without torch or transformers ---------------------------


def measure_device_read_bandwidth(gib: float, repeats: int) -> dict:
    """GB/s reading one float32 array on the default device: jitted jnp.sum and a jitted
    matrix-vector product (JAX only; no torch). MBU on an accelerator divides by the best."""
    n = int(gib * GIB) // 4 // 4096 * 4096  # rows of 4096 for the matvec
    with noise_meter() as noise:
        x = jnp.ones((n,), jnp.float32)
        total, matvec = jax.jit(jnp.sum), jax.jit(lambda x: x.reshape(-1, 4096) @ x[:4096])
        seconds = {
            "jax_sum": best_time(lambda: total(x).block_until_ready(), repeats),
            "jax_matvec": best_time(lambda: matvec(x).block_until_ready(), repeats),
        }
    gbps = {f"{k}_read_gbps": n * 4 / t / 1e9 for k, t in seconds.items()}
    return {
        "array_bytes": n * 4,
        **gbps,
        "best_read_gbps": max(gbps.values()),
        "device": str(jax.devices()[0]),
        "noise": dataclasses.asdict(noise),
    }


def write_random_checkpoint(folder: Path, dims: ModelDims, dtype: str) -> dict:
    """A random Llama as a Hugging Face folder written without torch: config.json, one
    safetensors file (normal, std 0.02; norm scales 1) and the byte-level tokenizer."""
    import ml_dtypes

    from jaxllm.tokenizer import byte_level_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    D, F, N, K = dims.hidden, dims.intermediate, dims.heads, dims.kv_heads
    H = D // N
    shapes = {"model.embed_tokens.weight": (dims.vocab, D), "model.norm.weight": (D,)}
    shapes["lm_head.weight"] = (dims.vocab, D)
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    tag = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(dims.seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                value = np.ones(shape, np.float32)
            else:
                value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
            f.write(value.astype(np_dtype).tobytes())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "vocab_size": dims.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 256,
        "eos_token_id": 257,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    byte_level_tokenizer().save(folder)
    params = sum(int(np.prod(s)) for s in shapes.values())
    return {
        "hidden": D,
        "intermediate": F,
        "layers": dims.layers,
        "heads": N,
        "kv_heads": K,
        "head_dim": H,
        "vocab": dims.vocab,
        "params": params,
        "dtype": dtype,
        "weight_bytes": params * itemsize,
        # What one decode step reads: every weight but the embedding table (one row of it).
        "decode_weight_bytes": (params - dims.vocab * D + D) * itemsize,
        "kv_bytes_per_token": 2 * dims.layers * K * H * itemsize,
    }


def engine_only(args, started: float) -> dict:
    """The engine alone on the default device (no torch, no transformers): the device's
    read bandwidth, a random Llama of ``--models``' first preset in ``--dtype``, batch-1
    decode rounds and their MBU, output tokens/s at ``--concurrency``, compiles in every
    timed region. Writes ``bench_engine.json`` under ``--out``."""
    from _bench_engine_report import decode_result, summarise_rounds

    regions = Regions()
    name = args.models[0]
    dims = MODELS[name]
    results: dict = {
        "mode": "engine_only",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
        },
    }

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    step("device read bandwidth")
    limits = {"read_bandwidth": measure_device_read_bandwidth(args.bandwidth_gib, args.repeats)}
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as folder:
        path = Path(folder) / name
        step(f"writing a random {dims.label} Llama in {args.dtype}")
        model = write_random_checkpoint(path, dims, args.dtype)
        step(f"loading {name}")
        options = dict(kv.split("=", 1) for kv in args.engine_options)
        options = {k: int(v) if v.isdigit() else v for k, v in options.items()}
        options.setdefault("max_seq_len", args.max_seq_len)
        llm, info = load(path, regions, dtype=args.dtype, **options)
        prompts = make_prompts(args.rounds + 1, args.prompt_len, seed=1)
        engine_round(llm, [prompts[0]], 4)  # throwaway
        step(f"batch-1 decode, {args.decode_tokens} tokens x {args.rounds}")
        rounds = []
        for i in range(args.rounds):
            with regions.region(f"{name}/batch1/round{i}", llm):
                rounds.append(engine_round(llm, [prompts[1 + i]], args.decode_tokens))
        decode = decode_result(rounds, model, args)
        sweep_out = {}
        for c in args.concurrency:
            step(f"{c} concurrent")
            batch = make_prompts(c, args.prompt_len, seed=100 + c)
            engine_round(llm, batch[: min(2, c)], 4)  # throwaway
            runs = []
            for i in range(args.rounds):
                with regions.region(f"{name}/c{c}/round{i}", llm):
                    runs.append(engine_round(llm, batch, args.output_len))
            sweep_out[str(c)] = summarise_rounds(runs)
        stats = engine_stats(llm)
        release(llm)
    limits["read_bandwidth_end"] = measure_device_read_bandwidth(args.bandwidth_gib, args.repeats)
    read = max(v["best_read_gbps"] for v in limits.values())
    decode["mbu"] = decode["achieved_gbps"] / read
    compiles = sum(r["xla_compiles"] for r in regions.data.values())
    results["machine"]["limits"] = limits
    results["read_bandwidth_gbps"] = read
    results["model"] = {"name": name, "label": dims.label, **model}
    results["load"] = info
    results["decode"] = decode
    results["sweep"] = sweep_out
    results["engine_stats"] = stats
    results["compiles_in_timed_regions"] = regions.data
    results["xla_compiles_in_timed_regions"] = compiles
    results["total_s"] = time.perf_counter() - started
    out = args.out / "bench_engine.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    best = max(sweep_out.values(), key=lambda r: r["tokens_per_s"]) if sweep_out else None
    print(
        f"\n{name} ({model['params'] / 1e9:.2f}B, {args.dtype}) on {jax.devices()[0]}: "
        f"batch-1 step {decode['step_ms']:.2f} ms, {decode['achieved_gbps']:.0f} GB/s of "
        f"{read:.0f} GB/s read bandwidth (MBU {decode['mbu']:.2f})"
        + (f"; best {best['tokens_per_s']:.0f} tokens/s" if best else "")
        + f"; {compiles} compiles in timed regions\nwrote {out} in {results['total_s']:.0f} s"
    )
    return results


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small model, levels 1 and 8")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--models", nargs="+", default=["llama8", "llama24"], choices=list(MODELS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per system (best kept)")
    p.add_argument("--rounds-large", type=int, default=1, help="rounds at concurrency >= 32")
    p.add_argument("--decode-tokens", type=int, default=128, help="output of the batch-1 run")
    p.add_argument("--hf-sequential-requests", type=int, default=3)
    p.add_argument("--tuned", nargs="*", default=["max_num_seqs=128"], help="KEY=VALUE ...")
    p.add_argument("--tuned-levels", type=int, nargs="*", default=[128])
    p.add_argument("--tuned-models", nargs="*", default=["llama8"])
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--prefix-trials", type=int, default=3)
    p.add_argument("--long-prompt", type=int, default=2000)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--gap-tokens", type=int, default=24)
    p.add_argument("--kv-pool-tokens", type=int, default=8 * 1024)
    p.add_argument("--kv-requests", type=int, default=64)
    p.add_argument("--kv-request-tokens", type=int, default=200)
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5, help="repeats of the limit kernels")
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="the engine alone on the default device, no torch/transformers (GPU/TPU runs): "
        "read bandwidth, batch-1 decode MBU, tokens/s at --concurrency; the first of --models",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-seq-len", type=int, default=1024, help="with --engine-only")
    p.add_argument("--engine-options", nargs="*", default=[], help="KEY=VALUE, --engine-only")
    p.add_argument("--child-latency", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.concurrency, args.tuned = ["quick"], [1, 8], []
        args.output_len, args.decode_tokens, args.rounds, args.hf_sequential_requests = 16, 48, 1, 2
        args.prefix_trials, args.gap_tokens, args.kv_requests = 2, 16, 48
        args.bandwidth_gib, args.repeats = 0.25, 3
    args.concurrency = sorted(set(args.concurrency))
    args.mbu_model = "llama24" if "llama24" in args.models else args.models[-1]
    args.latency_model = "llama8" if "llama8" in args.models else args.models[0]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_latency is not None:
        results = child_latency(args.child_latency, args)
        args.child_out.write_text(json.dumps(results, indent=2, default=str))
        return results
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.engine_only:
        return engine_only(args, started)
    regions = Regions()
    results: dict = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": len(jax.devices()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "models": {},
    }

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    if len(jax.devices()) > 1:
        print(f"warning: {len(jax.devices())} JAX devices here (XLA_FLAGS?); users get one")
    step("machine limits")
    results["machine"]["limits"] = {
        "read_bandwidth": measure_read_bandwidth(args.bandwidth_gib, args.repeats),
        "matmul": measure_matmul_rate(args.matmul_size, args.repeats),
    }
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    results["machine"].update(torch=torch.__version__, transformers=transformers.__version__)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as folder:
        for name in args.models:
            step(f"model {name} ({MODELS[name].label})")
            results["models"][name] = run_model(name, Path(folder), args, regions)
            if name == args.latency_model:
                step(f"latency child on {name}: interference, peak RSS, prefix cache")
                out_file = Path(folder) / "latency.json"
                results["latency"] = run_child(Path(folder) / name, argv, out_file)
    step("machine limits again")
    results["machine"]["limits"]["read_bandwidth_end"] = measure_read_bandwidth(
        args.bandwidth_gib, args.repeats
    )
    results["compiles_in_timed_regions"] = {
        **regions.data,
        **{f"latency/{k}": v for k, v in results["latency"]["compiles_in_timed_regions"].items()},
    }
    summarise(results, args, TARGETS)
    results["total_s"] = time.perf_counter() - started
    print_report(results, args)
    json_path, png_path = args.out / "bench_engine.json", args.out / "bench_engine.png"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    wrote = plot(results, args, png_path)
    print(
        f"\nwrote {json_path}{' and ' + str(png_path) if wrote else ''} "
        f"in {results['total_s']:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
