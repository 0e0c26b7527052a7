# ruff: noqa: E402  (XLA_FLAGS and TQDM_DISABLE must be set before jax and jaxllm load)
"""Benchmark: the gRPC server against the in-process engine on the same workload.

One workload (``--requests`` prompts of random token ids, ``--prompt-len`` tokens, greedy,
``--max-tokens`` output tokens each with ``ignore_eos``) is run, in turns:

- in-process: ``LLM.load`` in this process, requests through ``engine.submit``, token times
  taken by the request's ``on_update`` callback;
- over gRPC: a ``jaxllm serve`` subprocess with the same model and engine options, driven by
  the asyncio client in this process; token times are message arrival times.

Load is either ``--concurrency N`` clients that each send their next request when the last
one ends (closed loop), or ``--rate R`` requests/s with Poisson arrivals (open loop). Each
system runs ``--rounds`` times in alternation (another process on the machine makes single
runs noisy); the best throughput round of each is reported. Reported: output tokens/s,
TTFT, TPOT (per request: (last - first token) / (n - 1)) and ITL (gaps between token
arrivals; a message carrying k tokens counts its gap / k, k times) p50/p99, errors, the
gRPC / in-process throughput ratio and the latency per token that gRPC adds (TPOT
difference of the medians), and the CPU each run costs per output token (this process plus
the server process), which a machine shared with other work skews less.
Writes ``OUT/bench_serving.json`` and ``OUT/bench_serving.png``.

    python scripts/bench_serving.py [--model DIR] [--concurrency 32] [--rate R]
        [--requests 128] [--prompt-len 32] [--max-tokens 128] [--max-num-seqs 32] [--out out]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc

from jaxllm.llm import LLM
from jaxllm.sampling import SamplingParams
from serve.client import AsyncClient


def workload(args, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]


def arrivals(args) -> list[float] | None:
    """Poisson send times for --rate, None for the closed loop."""
    if not args.rate:
        return None
    rng = np.random.default_rng(1)
    return np.cumsum(rng.exponential(1 / args.rate, args.requests)).tolist()


def summarize(records: list[dict], wall: float, errors: int) -> dict:
    """records: per request {start, times: [(t, tokens)]}."""
    ttft, tpot, itl, tokens = [], [], [], 0
    for r in records:
        times = r["times"]
        n = sum(k for _, k in times)
        tokens += n
        if not times:
            continue
        ttft.append(times[0][0] - r["start"])
        if n > 1:
            tpot.append((times[-1][0] - times[0][0]) / (n - 1))
        for (t0, _), (t1, k) in zip(times, times[1:], strict=False):
            itl += [(t1 - t0) / k] * k

    def pct(xs):
        return (
            {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}
            if xs
            else None
        )

    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(records) / wall,
        "errors": errors,
        "ttft_s": pct(ttft),
        "tpot_s": pct(tpot),
        "itl_s": pct(itl),
        "_ttft": ttft,
        "_itl": itl,
    }


def run_in_process(llm: LLM, prompts, args) -> dict:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    records, errors, lock = [], [0], threading.Lock()
    send_at = arrivals(args)
    queue = list(range(len(prompts)))

    def one(i, t0):
        record = {"start": time.perf_counter() - t0, "times": []}
        seen = [0]

        def on_update():
            n = len(request.output.token_ids) if request is not None else 0
            if n > seen[0]:
                record["times"].append((time.perf_counter() - t0, n - seen[0]))
                seen[0] = n

        request = None
        request = llm.engine.submit(prompts[i], params, on_update=on_update)
        try:
            request.wait(600)
            on_update()  # tokens pushed before `request` was bound
        except Exception:
            with lock:
                errors[0] += 1
            return
        with lock:
            records.append(record)

    t0 = time.perf_counter()
    if send_at is None:

        def worker():
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop(0)
                one(i, t0)

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    else:

        def delayed(i):
            time.sleep(max(0.0, send_at[i] - (time.perf_counter() - t0)))
            one(i, t0)

        threads = [threading.Thread(target=delayed, args=(i,)) for i in queue]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(records, time.perf_counter() - t0, errors[0])


async def run_grpc(target: str, prompts, args) -> dict:
    records, errors = [], [0]
    send_at = arrivals(args)
    async with AsyncClient(target) as client:
        t0 = time.perf_counter()

        async def one(i):
            record = {"start": time.perf_counter() - t0, "times": []}
            try:
                async for m in client.generate_stream(
                    prompts[i], max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True
                ):
                    if m.token_ids:
                        record["times"].append((time.perf_counter() - t0, len(m.token_ids)))
            except grpc.aio.AioRpcError:
                errors[0] += 1
                return
            records.append(record)

        if send_at is None:
            queue = list(range(len(prompts)))

            async def worker():
                while queue:
                    await one(queue.pop(0))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:

            async def delayed(i):
                await asyncio.sleep(max(0.0, send_at[i] - (time.perf_counter() - t0)))
                await one(i)

            await asyncio.gather(*(delayed(i) for i in range(len(prompts))))
        return summarize(records, time.perf_counter() - t0, errors[0])


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process (pid None) or another one, all threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run, server_pid: int | None = None) -> dict:
    """Runs ``run()`` and adds the CPU it cost (this process + the server), per output token:
    on a machine shared with other work this is steadier than throughput."""
    before = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
    summary = run()
    own = cpu_seconds() - before[0]
    server = cpu_seconds(server_pid) - before[1] if server_pid else 0.0
    summary["cpu_s"] = {"this_process": own, "server": server}
    summary["cpu_ms_per_token"] = 1e3 * (own + server) / max(summary["output_tokens"], 1)
    return summary


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--no-metrics"]
    command += ["--max-num-seqs", str(args.max_num_seqs), "--max-seq-len", str(args.max_seq_len)]
    command += ["--max-queue", str(args.requests), "--stream-interval", str(args.stream_interval)]
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.search(r"jaxllm: serving .* on ([\d.]+:\d+)", text)
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = ["in_process", "grpc"]
    best = {n: result[n] for n in names}
    axes[0].bar(names, [best[n]["tokens_per_s"] for n in names], color=["C0", "C1"])
    axes[0].set_title(f"output tokens/s (ratio {result['throughput_ratio']:.3f})")
    for ax, key, label in ((axes[1], "_ttft", "TTFT (s)"), (axes[2], "_itl", "ITL (s)")):
        for n in names:
            xs = np.sort(best[n][key])
            if len(xs):
                ax.plot(xs, np.linspace(0, 1, len(xs)), label=n)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.legend()
    fig.suptitle(result["workload"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: the demo model)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second (open loop)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stream-interval", type=int, default=1, help="server's, see serve")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    args.max_seq_len = args.prompt_len + args.max_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    llm = LLM.load(args.model, max_num_seqs=args.max_num_seqs, max_seq_len=args.max_seq_len)
    prompts = workload(args, llm.config.vocab_size)
    run_in_process(llm, prompts[: args.max_num_seqs], args)  # throwaway: first-use costs
    proc, target = start_server(args, out / "bench_serving_server.log")
    rounds = {"in_process": [], "grpc": []}
    try:
        asyncio.run(run_grpc(target, prompts[: args.max_num_seqs], args))  # throwaway
        for r in range(args.rounds):
            rounds["in_process"].append(measured(lambda: run_in_process(llm, prompts, args)))
            rounds["grpc"].append(
                measured(lambda: asyncio.run(run_grpc(target, prompts, args)), proc.pid)
            )
            a, b = rounds["in_process"][-1], rounds["grpc"][-1]
            print(
                f"round {r}: in-process {a['tokens_per_s']:.0f} tok/s "
                f"({a['cpu_ms_per_token']:.3f} CPU ms/token), gRPC {b['tokens_per_s']:.0f} tok/s "
                f"({b['cpu_ms_per_token']:.3f} CPU ms/token)",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(120)
        llm.close()
    best = {k: max(v, key=lambda s: s["tokens_per_s"]) for k, v in rounds.items()}
    load = f"{args.rate} req/s Poisson" if args.rate else f"{args.concurrency} concurrent"
    result = {
        "workload": (
            f"{args.requests} requests, {load}, prompt {args.prompt_len}, "
            f"output {args.max_tokens} tokens, {args.max_num_seqs} running at once, "
            f"model {llm.name}, "
            f"stream_interval {args.stream_interval}"
        ),
        "args": vars(args),
        **best,
        "throughput_ratio": best["grpc"]["tokens_per_s"] / best["in_process"]["tokens_per_s"],
        "added_latency_per_token_s": best["grpc"]["tpot_s"]["p50"]
        - best["in_process"]["tpot_s"]["p50"],
        "rounds_tokens_per_s": {k: [s["tokens_per_s"] for s in v] for k, v in rounds.items()},
        "added_cpu_ms_per_token": best["grpc"]["cpu_ms_per_token"]
        - best["in_process"]["cpu_ms_per_token"],
    }
    plot(result, out / "bench_serving.png")
    clean = {
        k: (
            {kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v
        )
        for k, v in result.items()
    }
    (out / "bench_serving.json").write_text(json.dumps(clean, indent=2))
    print(json.dumps({k: clean[k] for k in ("workload", "in_process", "grpc")}, indent=2))
    print(
        f"gRPC / in-process throughput: {result['throughput_ratio']:.3f}; "
        f"added latency per token: {result['added_latency_per_token_s'] * 1e3:.3f} ms; "
        f"added CPU per token: {result['added_cpu_ms_per_token']:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
