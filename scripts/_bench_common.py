"""Helpers the benchmarks share: the noise meter, the machine's limits, a random Llama
checkpoint both systems load, engine rounds, transformers' generate, a compile counter.

torch and transformers are imported inside the functions that use them, so that a process
that only runs the engine (bench_engine's latency child, whose peak RSS is a figure) does not
carry them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
from jaxllm.tokenizer import byte_level_tokenizer

GB = 1e9
GIB = 2**30


# -- noise, timing, statistics --------------------------------------------------------------


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


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


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
    if not len(values):
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan"), "n": 0}
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(np.mean(values)),
        "n": len(values),
    }


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Random byte-token prompts (ids 0..255, which the byte-level tokenizer can decode)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, length)).tolist()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def release(llm: jaxllm.LLM) -> None:
    llm.close()
    del llm
    gc.collect()


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM) in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile event, which a persistent
    cache hit also records) and jaxpr traces in this process, from every thread."""

    COMPILE = "backend_compile"
    TRACE = "jaxpr_trace"

    def __init__(self):
        self.compiles = 0
        self.traces = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        with self._lock:
            if self.COMPILE in event:
                self.compiles += 1
            elif self.TRACE in event:
                self.traces += 1

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.compiles, self.traces


# -- 1. machine limits ----------------------------------------------------------------------


def measure_read_bandwidth(gib: float, repeats: int) -> dict:
    """GB/s reading one float32 array with several kernels: jitted jnp.sum and a jitted
    matrix-vector product (XLA, all cores), torch.sum (all cores), numpy sum (one core);
    and a numpy copy, counted as bytes read + written. XLA's reduction does not reach the
    memory's limit here, so the read bandwidth is the best of the read kernels."""
    import torch

    n = int(gib * GIB) // 4
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
    import torch

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


def build_checkpoint(folder: Path, dims) -> dict:
    """Writes a random float32 Llama with transformers, plus the byte-level tokenizer.
    ``dims`` has ``hidden, intermediate, layers, heads, kv_heads, vocab, seed`` (and
    optionally ``decode_seq_len``, a context the model must allow)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        vocab_size=dims.vocab,
        max_position_embeddings=max(4096, getattr(dims, "decode_seq_len", 0)),
        bos_token_id=256,
        eos_token_id=257,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(dims.seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer().save(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    head_dim = dims.hidden // dims.heads
    return {
        "hidden": dims.hidden,
        "intermediate": dims.intermediate,
        "layers": dims.layers,
        "heads": dims.heads,
        "kv_heads": dims.kv_heads,
        "head_dim": head_dim,
        "vocab": dims.vocab,
        "params": params,
        "weight_bytes": params * 4,
        # What one decode step must read: every weight but the (untied) embedding table,
        # of which it gathers one row per sequence.
        "decode_weight_bytes": (params - dims.vocab * dims.hidden + dims.hidden) * 4,
        "kv_bytes_per_token": 2 * dims.layers * dims.kv_heads * head_dim * 4,
        "dtype": "float32",
    }


# -- 3. the jaxllm engine -------------------------------------------------------------------


def engine_stats(llm: jaxllm.LLM) -> dict:
    """``llm.engine.stats()``, or {} for an engine without it."""
    stats = getattr(llm.engine, "stats", None)
    return dict(stats()) if stats is not None else {}


@dataclasses.dataclass
class Round:
    """One batch of requests submitted together to the engine."""

    wall_s: float  # first submit to last finish
    output_tokens: int
    ttft_s: list[float]
    tpot_s: list[float]  # per request: (finished - first token) / (tokens - 1)
    token_ids: list[list[int]]
    noise: Noise
    stats_delta: dict = dataclasses.field(default_factory=dict)  # engine counters

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


COUNTERS = ("steps", "preemptions", "prefix_hit_tokens", "prompt_tokens", "compiles")


def engine_round(llm: jaxllm.LLM, prompts: list[list[int]], max_tokens: int) -> Round:
    """Submits every prompt at once (greedy, ignore_eos) and waits for all of them."""
    params = jaxllm.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = engine_stats(llm)
    with noise_meter() as noise:
        requests = [llm.engine.submit(p, params) for p in prompts]
        outputs = [r.wait() for r in requests]
    after = engine_stats(llm)
    if any(len(o.token_ids) != max_tokens for o in outputs):
        raise RuntimeError("a request finished early despite ignore_eos")
    return Round(
        wall_s=max(r.finished_at for r in requests) - min(r.submitted_at for r in requests),
        output_tokens=sum(len(o.token_ids) for o in outputs),
        ttft_s=[r.first_token_at - r.submitted_at for r in requests],
        tpot_s=[(r.finished_at - r.first_token_at) / max(1, max_tokens - 1) for r in requests],
        token_ids=[list(o.token_ids) for o in outputs],
        noise=noise,
        stats_delta={k: after[k] - before[k] for k in COUNTERS if k in after and k in before},
    )


class Regions:
    """Compile counts of the timed regions: XLA's (every thread of this process) and the
    engine's own counter where ``llm`` is given."""

    def __init__(self):
        self.counter = CompileCounter()
        self.data: dict[str, dict] = {}

    @contextlib.contextmanager
    def region(self, name: str, llm: jaxllm.LLM | None = None):
        c0, t0 = self.counter.snapshot()
        e0 = engine_stats(llm).get("compiles") if llm is not None else None
        yield
        c1, t1 = self.counter.snapshot()
        e1 = engine_stats(llm).get("compiles") if llm is not None else None
        self.data[name] = {
            "xla_compiles": c1 - c0,
            "traces": t1 - t0,
            "engine_compiles": None if e0 is None or e1 is None else e1 - e0,
        }


def load(path: Path, regions: Regions, **options) -> tuple[jaxllm.LLM, dict]:
    """``LLM.load(path, **options)`` (no mesh: the library's one-device default on CPU),
    with what it compiled and how long it took."""
    c0, t0 = regions.counter.snapshot()
    start = time.perf_counter()
    llm = jaxllm.LLM.load(path, **options)
    info = {"options": options, "load_and_warm_up_s": time.perf_counter() - start}
    c1, t1 = regions.counter.snapshot()
    info.update(xla_compiles_at_load=c1 - c0, traces_at_load=t1 - t0)
    config = getattr(llm.engine, "config", None)
    if dataclasses.is_dataclass(config):
        info["engine_config"] = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    with contextlib.suppress(Exception):
        info["devices"] = int(np.size(llm.mesh.devices))
    stats = engine_stats(llm)
    info["stats_at_start"] = stats
    info["max_seq_len"] = getattr(llm, "max_seq_len", getattr(config, "max_seq_len", None))
    return llm, info


# -- 4. Hugging Face transformers ------------------------------------------------------------


def load_hf(path: Path):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generate for a batch, left-padded (pad id 0, masked) to the longest prompt."""
    import torch

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


def hf_one_request(model, prompt: list[int], output_len: int) -> tuple[float, list[int]]:
    """Seconds for one greedy request on its own, and its tokens."""
    start = time.perf_counter()
    tokens = hf_generate(model, [prompt], output_len)[0]
    return time.perf_counter() - start, tokens


def hf_sequential_at(request_s: Sequence[float], concurrency: int, output_len: int) -> dict:
    """Time to serve ``concurrency`` queued requests one at a time: the fastest timed request
    (best of N, as for the engine's rounds) times ``concurrency``."""
    wall = concurrency * min(request_s)
    how = f"{concurrency} x fastest of {len(request_s)} timed"
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
