# ruff: noqa: E402  (TQDM_DISABLE must be set before jaxllm imports tqdm)
"""Benchmark: the jaxllm engine against Hugging Face transformers, on this machine's CPU.

What one run measures, in order:

1. The machine's physical limits, in the same run (at the start and again at the end):
   memory read bandwidth over a large float32 array (jitted ``jnp.sum`` and matrix-vector
   product, ``torch.sum``, numpy sum; a numpy copy for comparison, counted as bytes read +
   written) and float32 matmul rate (jitted and torch), each the best of several calls.
   The read bandwidth MBU is judged against is the best read kernel of either measurement.
2. A random Llama model (float32, ~200M parameters by default) written by ``transformers``
   with ``save_pretrained`` plus jaxllm's byte-level tokenizer, so both systems load the
   same weights (the greedy outputs are compared as a check).
3. The jaxllm engine (``jaxllm.LLM.load``, one CPU device, requests through
   ``llm.engine.submit``, greedy, ``ignore_eos``):
   - decode step time at batch 1 (``max_slots=1``, time between first and last token of a
     long output, so prefill is excluded) and MBU = (weight bytes + KV-cache bytes read
     per step) / step time / read bandwidth. KV bytes are counted for the positions the
     request holds (mean over its output); the engine reads a power-of-two prefix of the
     cache covering them, the excess is not counted. The embedding table is not counted
     either (decode gathers one row of it);
   - output tokens/s at each concurrency (all requests submitted at once, ``max_slots`` =
     concurrency, ``max_seq_len`` = prompt + output, a throwaway round first), with TTFT
     and TPOT percentiles;
   - a profile of where a decode step goes: a bare jitted forward at the engine's shapes,
     the same forward with a short cache (attention over the cache), a matvec over every
     weight (what XLA achieves streaming the weights), the engine's host overhead, and the
     XLA ops that take the time (from a ``jax.profiler`` trace); at 32 concurrent, the
     round split into batched prefills (as many prompts per call as the engine puts in
     one) and batched decode steps, each timed bare.
4. transformers on the same weights (torch float32, one thread per core, greedy
   ``generate`` with ``min_new_tokens = max_new_tokens``): one request at a time (a few
   requests timed, longer queues extrapolated from their mean; the JSON says which), and
   one batched ``generate`` of the same prompts, left-padded, per concurrency.
5. A table on stdout, ``out/bench_engine.json`` (every number, ratios, targets) and
   ``out/bench_engine.png`` (tokens/s against concurrency, log axes).

Another process on the machine skews every number, and torch's threads suffer more from a
busy core than XLA's. So the two systems take turns (engine round, transformers round, ...;
best of each kept), and every measurement records how many cores other processes kept busy
meanwhile (``other_cpu_cores``, from /proc/stat): compare ratios only where both are low.

Run from the repository root (about 10-15 minutes on a quiet 2-core machine; ``--quick`` is
a ~2 minute smoke run with a small model):

    python scripts/bench_engine.py [--quick] [--concurrency 1 8 32 64] [--out out]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # loading bars would drown the table

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxllm
from jaxllm import padding
from jaxllm.params import named_params
from jaxllm.tokenizer import byte_level_tokenizer

GB = 1e9
TARGET_MBU = 0.7
TARGET_SPEEDUP_VS_SEQUENTIAL = 10.0
TARGET_CONCURRENCY = 32


# -- helpers ------------------------------------------------------------------------------


@dataclasses.dataclass
class Noise:
    """CPU time other processes used while a block ran, in cores (0 = quiet machine)."""

    other_cpu_cores: float | None = None
    load_avg_1m: float | None = None


def _busy_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def noise_meter() -> Iterator[Noise]:
    """Measures the machine's busy time not spent by this process during the block."""
    noise = Noise()
    busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    yield noise
    busy1, own1, wall = _busy_seconds(), _own_seconds(), time.perf_counter() - t0
    if busy0 is not None and busy1 is not None and wall > 0:
        noise.other_cpu_cores = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall, 2)
    noise.load_avg_1m = round(os.getloadavg()[0], 2)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` timed calls (seconds); ``fn`` must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(np.mean(values)),
    }


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Random byte-token prompts (ids 0..255, which the byte-level tokenizer can decode)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, length)).tolist()


def release(llm: jaxllm.LLM) -> None:
    llm.close()
    del llm
    gc.collect()


# -- 1. machine limits ----------------------------------------------------------------------


def measure_read_bandwidth(gib: float, repeats: int) -> dict:
    """GB/s reading one float32 array with several kernels: jitted jnp.sum and a jitted
    matrix-vector product (XLA, all cores), torch.sum (all cores), numpy sum (one core);
    and a numpy copy, counted as bytes read + written. XLA's reduction does not reach the
    memory's limit here, so the read bandwidth is the best of the read kernels."""
    n = int(gib * 2**30) // 4
    nbytes = n * 4
    with noise_meter() as noise:
        x = jnp.ones((n,), jnp.float32)
        total, matvec = jax.jit(jnp.sum), jax.jit(lambda x: x.reshape(-1, 4096) @ x[:4096])
        host = np.ones((n,), np.float32)
        dst, tensor = np.empty_like(host), torch.from_numpy(host)
        seconds = {
            "jax_sum": best_time(lambda: total(x).block_until_ready(), repeats),
            "jax_matvec": best_time(lambda: matvec(x).block_until_ready(), repeats),
            "torch_sum": best_time(lambda: tensor.sum(), repeats),
            "numpy_sum": best_time(lambda: host.sum(), repeats),
        }
        copy_s = best_time(lambda: np.copyto(dst, host), repeats)
    gbps = {f"{k}_read_gbps": nbytes / t / GB for k, t in seconds.items()}
    return {
        "array_bytes": nbytes,
        **gbps,
        "best_read_gbps": max(gbps.values()),
        "numpy_copy_gbps_read_plus_write": 2 * nbytes / copy_s / GB,
        "noise": dataclasses.asdict(noise),
    }


def measure_matmul_rate(size: int, repeats: int) -> dict:
    """GFLOP/s of a float32 [size, size] x [size, size] matmul, jitted JAX and torch."""
    with noise_meter() as noise:
        a = jnp.ones((size, size), jnp.float32) / size
        matmul = jax.jit(jnp.matmul)
        jax_s = best_time(lambda: matmul(a, a).block_until_ready(), repeats)
        t = torch.ones((size, size)) / size
        torch_s = best_time(lambda: t @ t, repeats)
    flops = 2 * size**3
    return {
        "size": size,
        "jax_gflops": flops / jax_s / GB,
        "torch_gflops": flops / torch_s / GB,
        "noise": dataclasses.asdict(noise),
    }


# -- 2. the model ---------------------------------------------------------------------------


def build_checkpoint(folder: Path, args: argparse.Namespace) -> dict:
    """Writes a random float32 Llama with transformers, plus the byte-level tokenizer."""
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.decode_seq_len),
        bos_token_id=256,
        eos_token_id=257,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer().save(folder)
    params = sum(p.numel() for p in model.parameters())
    return {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab": args.vocab,
        "params": params,
        "weight_bytes": params * 4,
        "dtype": "float32",
    }


# -- 3. the jaxllm engine -------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One batch of requests submitted together to the engine."""

    wall_s: float  # first submit to last finish
    output_tokens: int
    ttft_s: list[float]
    tpot_s: list[float]  # per request: (finished - first token) / (tokens - 1)
    token_ids: list[list[int]]
    noise: Noise

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def load_engine(path: Path, slots: int, max_seq_len: int, prompt_len: int) -> tuple:
    """``LLM.load`` on one CPU device (compiles every shape); returns (llm, seconds)."""
    start = time.perf_counter()
    llm = jaxllm.LLM.load(
        path,
        mesh={"tensor": 1},
        max_slots=slots,
        max_seq_len=max_seq_len,
        max_prompt_len=prompt_len,
    )
    return llm, time.perf_counter() - start


def engine_round(llm: jaxllm.LLM, prompts: list[list[int]], max_tokens: int) -> Round:
    """Submits every prompt at once (greedy, ignore_eos) and waits for all of them."""
    params = jaxllm.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with noise_meter() as noise:
        requests = [llm.engine.submit(p, params) for p in prompts]
        outputs = [r.wait() for r in requests]
    if any(len(o.token_ids) != max_tokens for o in outputs):
        raise RuntimeError("a request finished early despite ignore_eos")
    return Round(
        wall_s=max(r.finished_at for r in requests) - min(r.submitted_at for r in requests),
        output_tokens=sum(len(o.token_ids) for o in outputs),
        ttft_s=[r.first_token_at - r.submitted_at for r in requests],
        tpot_s=[(r.finished_at - r.first_token_at) / max(1, max_tokens - 1) for r in requests],
        token_ids=[list(o.token_ids) for o in outputs],
        noise=noise,
    )


def decode_bytes_per_step(llm: jaxllm.LLM, slots: int, context: float) -> dict:
    """Bytes one decode step must read: every weight except the embedding table (a gather of
    one row per slot, unless tied to the head) and each slot's K and V for the ``context``
    positions it holds (the mean over the request: the engine reads a power-of-two prefix
    covering them, a little more, which is not counted as useful)."""
    cfg = llm.config
    weights = named_params(llm.runner.state)
    weight_bytes = sum(v.get_value().nbytes for v in weights.values())
    if not cfg.tie_word_embeddings:
        weight_bytes -= weights["embed"].get_value().nbytes
        weight_bytes += slots * cfg.hidden_size * weights["embed"].get_value().dtype.itemsize
    itemsize = jnp.dtype(llm.runner.spec.dtype).itemsize
    cache = 2 * cfg.num_layers * slots * context * cfg.num_kv_heads * cfg.head_dim * itemsize
    return {"weights": weight_bytes, "kv_cache": cache, "total": weight_bytes + cache}


def measure_decode_step(llm: jaxllm.LLM, prompt: list[int], args) -> tuple:
    """One long batch-1 request on an engine with ``max_slots=1``: the mean decode step
    (first token to last, so prefill is excluded) and the bytes per second it reads (MBU
    divides that by the read bandwidth, in ``summarise``). Returns the result and the
    request's tokens."""
    done = engine_round(llm, [prompt], args.decode_tokens)
    step_s = done.tpot_s[0]
    read = decode_bytes_per_step(llm, 1, len(prompt) + args.decode_tokens / 2)
    return {
        "step_ms": step_s * 1e3,
        "bytes_read_per_step": read,
        "achieved_gbps": read["total"] / step_s / GB,
        "noise": dataclasses.asdict(done.noise),
    }, done.token_ids[0]


def bare_forward(
    llm: jaxllm.LLM, batch: int, tokens: int, cache_len: int, attend_len: int | None = None
) -> Callable:
    """A blocking call of the model's jitted forward (one logits row per sequence, cache
    donated) at [batch, tokens] with a [batch, cache_len] cache, attention reading its first
    ``attend_len`` positions (all if None): no engine, no sampling. Compiled and run once
    before it is returned."""
    runner = llm.runner
    ids = np.zeros((batch, tokens), np.int32)
    # Decode sits at the end of the cache; a prefill starts at position 0.
    start = cache_len - 1 if tokens == 1 else 0
    positions = np.broadcast_to(np.arange(start, start + tokens, dtype=np.int32), ids.shape)
    last = np.full((batch,), tokens - 1, np.int32)
    box = {"cache": runner.new_cache(batch, cache_len)}

    def call():
        logits, box["cache"] = runner.forward_at(
            runner.params, ids, positions, box["cache"], last, attend_len
        )
        logits.block_until_ready()

    call()
    return call


def weight_matvec(llm: jaxllm.LLM) -> tuple[Callable, int]:
    """A blocking jitted call that multiplies a vector by every weight matrix once (not the
    embedding, which decode only gathers from): XLA's floor for streaming the weights.
    Returns the call and the bytes it reads."""
    weights = []
    for name, var in named_params(llm.runner.state).items():
        w = var.get_value()
        if w.ndim < 2 or name == "embed":
            continue
        # [out, in] as the model stores them; wo's input is its trailing N*H.
        out = w.shape[0] if name.endswith("attn.wo") else -1
        weights.append(w.reshape(out, w.shape[-1] if out == -1 else -1))

    @jax.jit
    def stream(ws):
        return [jnp.einsum("md,od->mo", jnp.ones((1, w.shape[1]), w.dtype), w) for w in ws]

    def call():
        jax.block_until_ready(stream(weights))

    call()
    return call, sum(w.nbytes for w in weights)


def interleaved_ms(calls: dict[str, Callable], repeats: int) -> dict[str, dict]:
    """Runs the calls in turn ``repeats`` times, so that load from other processes hits
    them alike; ms per call, best and mean."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: {"best": min(v), "mean": float(np.mean(v))} for k, v in times.items()}


def top_xla_ops(call: Callable[[], None], calls: int, top: int = 8) -> dict | None:
    """ms per call spent in each kind of XLA op (numbered names merged), from a
    jax.profiler trace; None if this jax cannot write a perfetto trace."""
    folder = Path(tempfile.mkdtemp(prefix="bench_trace_"))
    try:
        jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
        for _ in range(calls):
            call()
        jax.profiler.stop_trace()
        trace = next(folder.rglob("*perfetto_trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))
    except Exception as e:  # profiling is a diagnostic: never fail the benchmark over it
        print(f"  (op profile unavailable: {e})", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    events = events["traceEvents"] if isinstance(events, dict) else events
    host_side = ("Thunk", "$", "Pjit", "Common", "Slinky", "end:", "ParseArguments", "Handle")
    per_kind: Counter[str] = Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(host_side):
            per_kind[re.sub(r"[.\d]+$", "", e["name"])] += e.get("dur", 0)
    return {k: v / calls / 1e3 for k, v in per_kind.most_common(top)}


def profile_decode_step(llm: jaxllm.LLM, args, engine_step_ms: float, read: dict) -> dict:
    """Where a batch-1 decode step goes: the bare forward at the engine's cache size and at
    a short one (the difference is attention over the cache), the weight-streaming floor,
    and the XLA ops of the bare forward. Uses the runner of a closed engine."""
    short = args.prompt_len
    # The prefix the engine reads in the middle of the request.
    attend_len = llm.engine.config.attend_len_for(args.prompt_len + args.decode_tokens // 2)
    full_call = bare_forward(llm, 1, 1, llm.max_seq_len, attend_len)
    matvec_call, matvec_bytes = weight_matvec(llm)
    calls = {
        "bare_forward": full_call,
        f"bare_forward_cache_{short}": bare_forward(llm, 1, 1, short),
        "weight_matvec": matvec_call,
    }
    with noise_meter() as noise:
        ms = interleaved_ms(calls, args.profile_repeats)
    ops = top_xla_ops(full_call, args.profile_repeats) if args.op_profile else None
    bare = ms["bare_forward"]
    return {
        "engine_step_ms": engine_step_ms,
        "times_ms": ms,
        "engine_minus_bare_forward_mean_ms": engine_step_ms - bare["mean"],
        "attention_over_full_cache_ms": bare["best"] - ms[f"bare_forward_cache_{short}"]["best"],
        "bare_forward_gbps": read["total"] / bare["best"] / 1e6,
        "weight_matvec_gbps": matvec_bytes / ms["weight_matvec"]["best"] / 1e6,
        "xla_ops_ms_per_forward": ops,
        "noise": dataclasses.asdict(noise),
    }


def profile_batched_round(llm: jaxllm.LLM, concurrency: int, args, best: Round) -> dict:
    """Splits a round's wall time into prefills (as many prompts per call as the engine
    batches) and decode steps over all slots, each timed bare, to compare with the engine."""
    config = llm.engine.config
    rows = config.prefill_rows(padding.bucket_for(args.prompt_len, config.buckets))
    calls = {
        "prefill_call": bare_forward(llm, rows, args.prompt_len, args.prompt_len),
        "decode_step": bare_forward(llm, concurrency, 1, llm.max_seq_len),
    }
    with noise_meter() as noise:
        ms = interleaved_ms(calls, 3)
    prefill, step = ms["prefill_call"]["best"], ms["decode_step"]["best"]
    prefill_calls = -(-concurrency // rows)
    predicted_s = (prefill_calls * prefill + (args.output_len - 1) * step) / 1e3
    return {
        "bare_ms": ms,
        "prompts_per_prefill_call": rows,
        "engine_tpot_p50_ms": float(np.median(best.tpot_s)) * 1e3,
        "prefills_share_of_predicted": prefill_calls * prefill / 1e3 / predicted_s,
        "predicted_wall_s": predicted_s,
        "measured_wall_s": best.wall_s,
        "noise": dataclasses.asdict(noise),
    }


def summarise_rounds(rounds: list[Round]) -> tuple[dict, Round]:
    best = max(rounds, key=lambda r: r.tokens_per_s)
    return {
        "tokens_per_s": best.tokens_per_s,
        "tokens_per_s_all_rounds": [r.tokens_per_s for r in rounds],
        "wall_s": best.wall_s,
        "ttft_s": percentiles(best.ttft_s),
        "tpot_s": percentiles(best.tpot_s),
        "noise_per_round": [dataclasses.asdict(r.noise) for r in rounds],
    }, best


# -- 4. Hugging Face transformers ------------------------------------------------------------


def load_hf(path: Path) -> transformers.PreTrainedModel:
    torch.set_num_threads(os.cpu_count() or 1)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generate for a batch, left-padded (pad id 0, masked) to the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    return out[:, width:].tolist()


def measure_hf_sequential(model, prompts: list[list[int]], output_len: int) -> tuple[dict, list]:
    """One request at a time: per-request latency, from which c requests' tokens/s follow."""
    hf_generate(model, prompts[:1], 4)  # warm-up
    seconds, outputs = [], []
    with noise_meter() as noise:
        for prompt in prompts:
            start = time.perf_counter()
            outputs.append(hf_generate(model, [prompt], output_len)[0])
            seconds.append(time.perf_counter() - start)
    return {
        "requests_measured": len(prompts),
        "request_s": seconds,
        "tokens_per_s": len(prompts) * output_len / sum(seconds),
        "noise": dataclasses.asdict(noise),
    }, outputs


def hf_sequential_at(sequential: dict, concurrency: int, output_len: int) -> dict:
    """Time to serve ``concurrency`` queued requests one at a time: the measured sum when
    that many were timed, else the mean request time times ``concurrency``."""
    times = sequential["request_s"]
    if concurrency <= len(times):
        wall, how = sum(times[:concurrency]), "measured"
    else:
        wall, how = concurrency * float(np.mean(times)), f"extrapolated from {len(times)}"
    return {"wall_s": wall, "tokens_per_s": concurrency * output_len / wall, "method": how}


def measure_hf_batched(model, prompts: list[list[int]], output_len: int) -> dict:
    """One batched greedy generate over all prompts."""
    hf_generate(model, prompts[:1], 2)  # warm-up
    with noise_meter() as noise:
        start = time.perf_counter()
        outputs = hf_generate(model, prompts, output_len)
        wall = time.perf_counter() - start
    assert all(len(o) == output_len for o in outputs)
    return {
        "concurrency": len(prompts),
        "wall_s": wall,
        "tokens_per_s": len(prompts) * output_len / wall,
        "noise": dataclasses.asdict(noise),
    }


# -- paired runs: engine and transformers take turns, so background load hits both alike ---


def run_batch1(path: Path, hf_model, args) -> tuple[dict, dict, dict]:
    """Engine decode rounds at batch 1 (MBU) taking turns with transformers' one-at-a-time
    requests; then the decode-step profile on the engine's runner."""
    llm, load_s = load_engine(path, 1, args.decode_seq_len, args.prompt_len)
    prompts = make_prompts(args.rounds + 1, args.prompt_len, seed=1)
    engine_round(llm, prompts[:1], 4)  # throwaway
    first, engine_tokens = measure_decode_step(llm, prompts[1], args)
    # transformers' first request repeats the engine's, for the greedy agreement check.
    extra = make_prompts(args.hf_sequential_requests - 1, args.prompt_len, seed=7)
    sequential, hf_outputs = measure_hf_sequential(hf_model, [prompts[1], *extra], args.output_len)
    decode = [first] + [measure_decode_step(llm, p, args)[0] for p in prompts[2:]]
    llm.close()
    best = min(decode, key=lambda d: d["step_ms"])
    result = {
        **best,
        "max_seq_len": args.decode_seq_len,
        "output_tokens": args.decode_tokens,
        "load_and_compile_s": load_s,
        "step_ms_all_rounds": [d["step_ms"] for d in decode],
    }
    result["profile"] = profile_decode_step(llm, args, best["step_ms"], best["bytes_read_per_step"])
    release(llm)
    agreement = {
        "tokens": args.output_len,
        "matching_prefix": common_prefix(engine_tokens[: args.output_len], hf_outputs[0]),
    }
    return result, sequential, agreement


def run_concurrency(path: Path, hf_model, concurrency: int, args) -> tuple[dict, dict]:
    """Engine rounds at ``concurrency`` (all requests at once, ``max_slots`` = concurrency)
    taking turns with transformers' batched generate of the same prompts; best of each."""
    max_seq_len = args.prompt_len + args.output_len
    llm, load_s = load_engine(path, concurrency, max_seq_len, args.prompt_len)
    prompts = make_prompts(concurrency, args.prompt_len, seed=100 + concurrency)
    engine_round(llm, prompts[: min(2, concurrency)], 4)  # throwaway
    rounds, hf_rounds = [], []
    for _ in range(args.rounds if concurrency < TARGET_CONCURRENCY else args.rounds_large):
        rounds.append(engine_round(llm, prompts, args.output_len))
        hf_rounds.append(measure_hf_batched(hf_model, prompts, args.output_len))
    llm.close()
    hf = max(hf_rounds, key=lambda r: r["tokens_per_s"])
    hf["tokens_per_s_all_rounds"] = [r["tokens_per_s"] for r in hf_rounds]
    hf["noise_per_round"] = [r["noise"] for r in hf_rounds]
    engine, best = summarise_rounds(rounds)
    engine.update(
        concurrency=concurrency,
        max_slots=concurrency,
        max_seq_len=max_seq_len,
        load_and_compile_s=load_s,
    )
    profiled = (
        TARGET_CONCURRENCY if TARGET_CONCURRENCY in args.concurrency else max(args.concurrency)
    )
    if concurrency == profiled:
        engine["profile"] = profile_batched_round(llm, concurrency, args, best)
    release(llm)
    return engine, hf


# -- 5. report ------------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def summarise(results: dict, args) -> None:
    """Adds ratios and the issue's targets to ``results``."""
    engine, hf_seq, hf_batch = results["engine"], results["hf_sequential"], results["hf_batched"]
    ratios, ahead = {}, {}
    for c in args.concurrency:
        key = str(c)
        e = engine[key]["tokens_per_s"]
        ratios[key] = {
            "engine_over_hf_sequential": e / hf_seq["at_concurrency"][key]["tokens_per_s"],
            "engine_over_hf_batched": e / hf_batch[key]["tokens_per_s"],
        }
        ahead[key] = ratios[key]["engine_over_hf_batched"] > 1
    results["ratios"] = ratios
    # The limit is the best read bandwidth seen (start or end of the run): other processes
    # can only lower a measurement.
    limits, decode = results["machine"]["limits"], results["decode_batch1"]
    runs = ("read_bandwidth", "read_bandwidth_end")
    read_gbps = max(limits[k]["best_read_gbps"] for k in runs)
    jax_sum_gbps = max(limits[k]["jax_sum_read_gbps"] for k in runs)
    mbu = decode["achieved_gbps"] / read_gbps
    decode.update(
        read_bandwidth_gbps=read_gbps,
        mbu=mbu,
        mbu_against_jax_sum=decode["achieved_gbps"] / jax_sum_gbps,
    )
    target_c = str(TARGET_CONCURRENCY)
    speedup = ratios[target_c]["engine_over_hf_sequential"] if target_c in ratios else None
    results["targets"] = {
        "mbu_batch1": {"target": TARGET_MBU, "value": mbu, "met": mbu >= TARGET_MBU},
        f"engine_over_hf_sequential_at_{TARGET_CONCURRENCY}": {
            "target": TARGET_SPEEDUP_VS_SEQUENTIAL,
            "value": speedup,
            "met": speedup is not None and speedup >= TARGET_SPEEDUP_VS_SEQUENTIAL,
        },
        "ahead_of_hf_batched_at_every_concurrency": {
            "per_concurrency": ahead,
            "met": all(ahead.values()),
        },
    }


def print_report(results: dict, args) -> None:
    lim, model, dec = results["machine"]["limits"], results["model"], results["decode_batch1"]
    print("\n=== machine limits (this run) ===")
    for when in ("read_bandwidth", "read_bandwidth_end"):
        bw = lim[when]
        kernels = ("jax_sum", "jax_matvec", "torch_sum", "numpy_sum")
        reads = ", ".join(f"{k} {bw[f'{k}_read_gbps']:.1f}" for k in kernels)
        print(
            f"{'start' if when == 'read_bandwidth' else 'end':>5}: read GB/s: {reads}; numpy "
            f"copy (r+w) {bw['numpy_copy_gbps_read_plus_write']:.1f}; other cores busy "
            f"{bw['noise']['other_cpu_cores']}"
        )
    mm = lim["matmul"]
    print(
        f"f32 matmul {mm['size']}^3: jax {mm['jax_gflops']:.0f} GFLOP/s, torch "
        f"{mm['torch_gflops']:.0f} GFLOP/s; other cores busy {mm['noise']['other_cpu_cores']}"
    )
    print(
        f"model: {model['params'] / 1e6:.1f}M params, {model['weight_bytes'] / GB:.2f} GB "
        f"float32, {model['layers']} layers, D={model['hidden']}, F={model['intermediate']}"
    )
    print("\n=== decode at batch 1 (engine) ===")
    read = dec["bytes_read_per_step"]
    print(
        f"step {dec['step_ms']:.2f} ms (max_seq_len {dec['max_seq_len']}); reads "
        f"{read['weights'] / 1e6:.0f} MB weights + {read['kv_cache'] / 1e6:.1f} MB KV cache "
        f"-> {dec['achieved_gbps']:.1f} GB/s of {dec['read_bandwidth_gbps']:.1f} GB/s: "
        f"MBU {dec['mbu']:.2f} (against jnp.sum's bandwidth: {dec['mbu_against_jax_sum']:.2f})"
    )
    print(
        f"  all rounds {', '.join(f'{x:.1f}' for x in dec['step_ms_all_rounds'])} ms; other "
        f"cores busy {dec['noise']['other_cpu_cores']}; compiled in "
        f"{dec['load_and_compile_s']:.0f} s"
    )
    prof = dec["profile"]
    print("profile (calls taking turns; ms best / mean):")
    for name, t in prof["times_ms"].items():
        print(f"  {name:<24} {t['best']:8.2f} / {t['mean']:8.2f}")
    print(
        f"  engine step - bare forward mean: {prof['engine_minus_bare_forward_mean_ms']:.2f} ms;"
        f" attention over the full cache: {prof['attention_over_full_cache_ms']:.2f} ms; "
        f"bare forward {prof['bare_forward_gbps']:.1f} GB/s, weight matvec "
        f"{prof['weight_matvec_gbps']:.1f} GB/s; other cores busy "
        f"{prof['noise']['other_cpu_cores']}"
    )
    if prof["xla_ops_ms_per_forward"]:
        ops = ", ".join(f"{k} {v:.1f}" for k, v in prof["xla_ops_ms_per_forward"].items())
        print(f"  XLA ops, ms per bare forward (under the profiler): {ops}")
    print(f"\n=== output tokens/s ({args.prompt_len}-token prompts, {args.output_len} out) ===")
    header = (
        f"{'conc':>5} {'engine':>9} {'HF seq':>9} {'HF batch':>9} {'eng/seq':>8} "
        f"{'eng/batch':>9} {'HF seq method':>20} {'busy: eng / HF batch':>20}"
    )
    print(header)
    for c in args.concurrency:
        key = str(c)
        e, r = results["engine"][key], results["ratios"][key]
        seq = results["hf_sequential"]["at_concurrency"][key]
        batch = results["hf_batched"][key]
        busy = " / ".join(
            "/".join(str(n["other_cpu_cores"]) for n in x["noise_per_round"]) for x in (e, batch)
        )
        print(
            f"{c:>5} {e['tokens_per_s']:>9.1f} {seq['tokens_per_s']:>9.1f} "
            f"{batch['tokens_per_s']:>9.1f} {r['engine_over_hf_sequential']:>8.2f} "
            f"{r['engine_over_hf_batched']:>9.2f} {seq['method']:>20} "
            f"{busy:>20}"
        )
    key = str(TARGET_CONCURRENCY)
    if key in results["engine"]:
        e = results["engine"][key]
        print(
            f"\nlatency at {TARGET_CONCURRENCY} concurrent: TTFT p50 {e['ttft_s']['p50']:.2f} s "
            f"p99 {e['ttft_s']['p99']:.2f} s; TPOT p50 {e['tpot_s']['p50'] * 1e3:.1f} ms "
            f"p99 {e['tpot_s']['p99'] * 1e3:.1f} ms"
        )
    for c in args.concurrency:
        p = results["engine"][str(c)].get("profile")
        if p:
            bare = p["bare_ms"]
            print(
                f"at {c} concurrent: bare prefill call of {p['prompts_per_prefill_call']} "
                f"prompts {bare['prefill_call']['best']:.0f} ms x "
                f"{-(-c // p['prompts_per_prefill_call'])} + bare decode step "
                f"{bare['decode_step']['best']:.0f} ms (engine TPOT p50 "
                f"{p['engine_tpot_p50_ms']:.0f} ms); prefills are "
                f"{p['prefills_share_of_predicted']:.0%} of a predicted {p['predicted_wall_s']:.1f}"
                f" s round, measured {p['measured_wall_s']:.1f} s"
            )
    agree = results["greedy_agreement"]
    print(
        f"\ngreedy agreement engine vs HF (same prompt): first {agree['matching_prefix']} of "
        f"{agree['tokens']} tokens identical"
    )
    print("\n=== targets ===")
    for name, t in results["targets"].items():
        value = t.get("value", t.get("per_concurrency"))
        if isinstance(value, float):
            value = f"{value:.2f}"
        print(f"{name}: {'MET' if t['met'] else 'MISSED'} ({value})")


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = args.concurrency
    series = {
        "jaxllm engine": [results["engine"][str(c)]["tokens_per_s"] for c in cs],
        "transformers, one at a time": [
            results["hf_sequential"]["at_concurrency"][str(c)]["tokens_per_s"] for c in cs
        ],
        "transformers, batched generate": [
            results["hf_batched"][str(c)]["tokens_per_s"] for c in cs
        ],
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        ax.plot(cs, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    model = results["model"]
    ax.set_title(
        f"{model['params'] / 1e6:.0f}M-param Llama, float32, CPU "
        f"({args.prompt_len}-token prompts, {args.output_len} output tokens)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and loads, ~2 minutes")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per system (best kept)")
    p.add_argument(
        "--rounds-large", type=int, default=1, help="rounds at concurrency >= 32 (long rounds)"
    )
    p.add_argument("--decode-tokens", type=int, default=128, help="output for the MBU run")
    p.add_argument("--decode-seq-len", type=int, default=512, help="max_seq_len, MBU run")
    p.add_argument("--hf-sequential-requests", type=int, default=3)
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5, help="repeats of the limit kernels")
    p.add_argument("--profile-repeats", type=int, default=10)
    p.add_argument("--no-op-profile", dest="op_profile", action="store_false")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 1408, 4, 8, 2
        args.concurrency = [1, 8]
        args.output_len, args.decode_tokens, args.decode_seq_len = 16, 64, 256
        args.rounds, args.rounds_large, args.hf_sequential_requests = 1, 1, 2
        args.bandwidth_gib, args.repeats, args.profile_repeats = 0.25, 3, 3
    args.concurrency = sorted(set(args.concurrency))
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    results: dict = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": len(jax.devices()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    step("machine limits")
    bandwidth = measure_read_bandwidth(args.bandwidth_gib, args.repeats)
    results["machine"]["limits"] = {
        "read_bandwidth": bandwidth,
        "matmul": measure_matmul_rate(args.matmul_size, args.repeats),
    }

    with tempfile.TemporaryDirectory(prefix="bench_llama_") as folder:
        path = Path(folder)
        step("building the random Llama checkpoint")
        results["model"] = build_checkpoint(path, args)

        hf_model = load_hf(path)

        step("batch 1: engine decode steps, transformers one request at a time")
        decode, sequential, agreement = run_batch1(path, hf_model, args)
        sequential["at_concurrency"] = {
            str(c): hf_sequential_at(sequential, c, args.output_len) for c in args.concurrency
        }
        results["decode_batch1"], results["hf_sequential"] = decode, sequential
        results["greedy_agreement"] = agreement

        results["engine"], results["hf_batched"] = {}, {}
        for c in args.concurrency:
            step(f"{c} concurrent requests: engine rounds and transformers batched generate")
            engine, hf = run_concurrency(path, hf_model, c, args)
            results["engine"][str(c)], results["hf_batched"][str(c)] = engine, hf
        del hf_model

    step("machine limits again")
    results["machine"]["limits"]["read_bandwidth_end"] = measure_read_bandwidth(
        args.bandwidth_gib, args.repeats
    )
    summarise(results, args)
    results["total_s"] = time.perf_counter() - started
    print_report(results, args)
    json_path, png_path = args.out / "bench_engine.json", args.out / "bench_engine.png"
    json_path.write_text(json.dumps(results, indent=2))
    plot(results, args, png_path)
    print(f"\nwrote {json_path} and {png_path} in {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
