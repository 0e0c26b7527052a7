# ruff: noqa: E402  (XLA_FLAGS and TQDM_DISABLE must be set before jax and jaxllm load)
"""Benchmark: the HTTP (OpenAI-compatible) and gRPC servers against the in-process engine on
the same workload.

One workload (``--requests`` prompts of about ``--prompt-len`` tokens, greedy, ``--max-tokens``
output tokens each with ``ignore_eos``) is run, in turns:

- in-process: ``LLM.load`` in this process, requests through ``engine.submit``, token times
  taken by the request's ``on_update`` callback;
- over gRPC: a ``jaxllm serve --http-port 0`` subprocess with the same model and engine
  options, driven by the asyncio client in this process; token times are message arrival times;
- over HTTP: the same server process, driven by streaming requests (Server-Sent Events) from
  this process over kept-alive connections (a minimal client, ``SSEClient``: the load
  generator's CPU is taken from the server's); token times are event arrival times. OpenAI's
  stream carries text, not token ids, so each event counts as one token and the request's
  ``usage`` sets the total (the server's stream_interval 1 sends one event per token unless
  tokens arrive together).

``--api chat`` (the default) sends one user message per request: rendered by the model's chat
template on the server (HTTP ``/v1/chat/completions``, gRPC ``messages``) and by
``jaxllm.chat.chat_prompt_ids`` in-process. A model without a template (the demo model) is
copied to ``OUT/bench_model`` with a one-line template added. ``--api completions`` sends
random token ids (HTTP ``/v1/completions``).

Load is either ``--concurrency N`` clients that each send their next request when the last
one ends (closed loop), or ``--rate R`` requests/s with Poisson arrivals (open loop). Each
system runs ``--rounds`` times in alternation (another process on the machine makes single
runs noisy); the best throughput round of each is reported. Reported: output tokens/s,
TTFT, TPOT (per request: (last - first token) / (n - 1)) and ITL (gaps between token
arrivals; a message carrying k tokens counts its gap / k, k times) p50/p99, errors, the
gRPC / in-process and HTTP / in-process throughput ratios and the latency per token each
front end adds (TPOT difference of the medians), and the CPU each run costs per output token
(this process plus the server process), which a machine shared with other work skews less.
Writes ``OUT/bench_serving.json`` and ``OUT/bench_serving.png``.

    python scripts/bench_serving.py [--model DIR] [--api chat|completions] [--concurrency 32]
        [--rate R] [--requests 128] [--prompt-len 32] [--max-tokens 128] [--max-num-seqs 32]
        [--out out]
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
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc

from jaxllm import demo, orbax_checkpoint
from jaxllm.chat import chat_prompt_ids
from jaxllm.llm import LLM
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import Tokenizer
from serve.client import AsyncClient, chat_request
from serve.proto import jaxllm_pb2_grpc as pb_grpc

# Added to a copy of a model without a chat template, for --api chat.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "the quick brown fox jumps over lazy dogs while jax compiles every shape once".split()


class Job:
    """One request of the workload: token ids (completions) or a user message (chat)."""

    def __init__(self, ids: list[int], message: str | None = None):
        self.ids, self.message = ids, message

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.message}]


def workload(args, tokenizer: Tokenizer, vocab: int) -> list[Job]:
    rng = random.Random(0)
    if args.api == "completions":
        return [
            Job([rng.randrange(vocab) for _ in range(args.prompt_len)])
            for _ in range(args.requests)
        ]
    jobs = []
    for _ in range(args.requests):
        words = []
        while True:  # about prompt_len tokens once the template has wrapped it
            words.append(rng.choice(WORDS))
            message = " ".join(words)
            ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": message}])
            if len(ids) >= args.prompt_len:
                break
        jobs.append(Job(ids, message))
    return jobs


def with_chat_template(model: str | None, out: Path) -> str | None:
    """``model`` itself if its tokenizer has a chat template, else a copy with one."""
    path = Path(model) if model else demo.demo_model_dir()
    is_orbax = orbax_checkpoint.is_orbax_checkpoint(path)
    tokenizer_dir = orbax_checkpoint.tokenizer_dir(path) if is_orbax else path
    if Tokenizer.from_dir(tokenizer_dir).has_chat_template:
        return model
    copy = out / "bench_model" / path.name
    if not copy.exists():
        shutil.copytree(path, copy)
    copied_tokenizer = orbax_checkpoint.tokenizer_dir(copy) if is_orbax else copy
    (copied_tokenizer / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(copy)


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


def run_in_process(llm: LLM, prompts: list[Job], args) -> dict:
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
        job = prompts[i]
        ids = job.ids if job.message is None else chat_prompt_ids(llm.tokenizer, job.messages)
        request = llm.engine.submit(ids, params, on_update=on_update)
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


async def drive(prompts: list[Job], args, one) -> tuple[float, float]:
    """Runs ``one(i, t0)`` for every request, closed or open loop; returns (t0, end)."""
    send_at = arrivals(args)
    t0 = time.perf_counter()
    if send_at is None:
        queue = list(range(len(prompts)))

        async def worker():
            while queue:
                await one(queue.pop(0), t0)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    else:

        async def delayed(i):
            await asyncio.sleep(max(0.0, send_at[i] - (time.perf_counter() - t0)))
            await one(i, t0)

        await asyncio.gather(*(delayed(i) for i in range(len(prompts))))
    return t0, time.perf_counter()


async def run_grpc(target: str, prompts: list[Job], args) -> dict:
    records, errors = [], [0]
    sampling = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    async with AsyncClient(target) as client:
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.LLMStub(channel)

        async def one(i, t0):
            record = {"start": time.perf_counter() - t0, "times": []}
            job = prompts[i]
            if job.message is None:
                stream = client.generate_stream(job.ids, **sampling)
            else:
                stream = stub.Generate(chat_request(job.messages, **sampling))
            try:
                async for m in stream:
                    if m.token_ids:
                        record["times"].append((time.perf_counter() - t0, len(m.token_ids)))
            except grpc.aio.AioRpcError:
                errors[0] += 1
                return
            records.append(record)

        t0, end = await drive(prompts, args, one)
        await channel.close()
        return summarize(records, end - t0, errors[0])


class SSEClient:
    """A minimal HTTP/1.1 client for streamed (chunked) responses over kept-alive
    connections. The load generator shares the machine's CPU with the server, and httpx's
    async stack costs about 120 us per event here, several times this; gRPC's client is C."""

    def __init__(self, base: str):
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname, url.port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stream(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """The response body's chunks; RuntimeError for a status other than 200."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (path.encode(), self.host.encode(), len(payload), payload)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200 or b"transfer-encoding: chunked" not in head.lower():
            writer.close()
            raise RuntimeError(f"HTTP {status}")
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]
        await reader.readline()  # the empty trailer
        self.idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def run_http(base: str, model: str, prompts: list[Job], args) -> dict:
    records, errors = [], [0]
    client = SSEClient(base)

    async def one(i, t0):
        record = {"start": time.perf_counter() - t0, "times": []}
        job = prompts[i]
        body = dict(model=model, max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        body.update(stream=True, stream_options={"include_usage": True})
        if job.message is None:
            path, body["prompt"] = "/v1/completions", job.ids
        else:
            path, body["messages"] = "/v1/chat/completions", job.messages
        usage, buffer = None, b""
        try:
            async for data in client.stream(path, body):
                now = time.perf_counter() - t0
                *events, buffer = (buffer + data).split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue
                    chunk = json.loads(event[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    choices = chunk["choices"]
                    # One event per token batch, text or not (a random model's bytes may not
                    # decode yet); the chat stream's first event only announces the role.
                    if choices and choices[0].get("delta", {}).get("role") is None:
                        record["times"].append((now, 1))
        except (RuntimeError, OSError, asyncio.IncompleteReadError):
            errors[0] += 1
            return
        if record["times"] and usage is not None:  # the last event's tokens: the rest
            t, _ = record["times"][-1]
            record["times"][-1] = (t, usage - len(record["times"]) + 1)
        records.append(record)

    try:
        t0, end = await drive(prompts, args, one)
    finally:
        client.close()
    return summarize(records, end - t0, errors[0])


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


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    command = [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--no-metrics"]
    command += ["--http-port", "0"]
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
            http = re.search(r"jaxllm: OpenAI API on (http://\S+)/v1", text).group(1)
            return proc, found.group(1), http
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = ["in_process", "grpc", "http"]
    best = {n: result[n] for n in names}
    axes[0].bar(names, [best[n]["tokens_per_s"] for n in names], color=["C0", "C1", "C2"])
    ratios = result["throughput_ratio"]
    axes[0].set_title(f"output tokens/s (gRPC {ratios['grpc']:.3f}, HTTP {ratios['http']:.3f})")
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
    parser.add_argument("--api", choices=["chat", "completions"], default="chat")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.api == "chat":
        args.model = with_chat_template(args.model, out)
    # Chat prompts come out a few tokens past --prompt-len: leave them room.
    args.max_seq_len = args.prompt_len + args.max_tokens + (16 if args.api == "chat" else 0)

    llm = LLM.load(args.model, max_num_seqs=args.max_num_seqs, max_seq_len=args.max_seq_len)
    prompts = workload(args, llm.tokenizer, llm.config.vocab_size)
    warm = prompts[: args.max_num_seqs]
    run_in_process(llm, warm, args)  # throwaway: first-use costs
    proc, target, http = start_server(args, out / "bench_serving_server.log")
    with urllib.request.urlopen(http + "/v1/models") as reply:
        model = json.load(reply)["data"][0]["id"]
    systems = {
        "in_process": (lambda: run_in_process(llm, prompts, args), None),
        "grpc": (lambda: asyncio.run(run_grpc(target, prompts, args)), proc.pid),
        "http": (lambda: asyncio.run(run_http(http, model, prompts, args)), proc.pid),
    }
    rounds = {name: [] for name in systems}
    try:
        asyncio.run(run_grpc(target, warm, args))  # throwaway
        asyncio.run(run_http(http, model, warm, args))  # throwaway
        for r in range(args.rounds):
            line = []
            for name, (run, pid) in systems.items():
                rounds[name].append(measured(run, pid))
                s = rounds[name][-1]
                line.append(
                    f"{name} {s['tokens_per_s']:.0f} tok/s ({s['cpu_ms_per_token']:.3f} CPU "
                    f"ms/token, {s['errors']} errors)"
                )
            print(f"round {r}: " + ", ".join(line), flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
        llm.close()
    best = {k: max(v, key=lambda s: s["tokens_per_s"]) for k, v in rounds.items()}
    load = f"{args.rate} req/s Poisson" if args.rate else f"{args.concurrency} concurrent"
    base = best["in_process"]
    fronts = ("grpc", "http")
    result = {
        "workload": (
            f"{args.requests} streaming {args.api} requests, {load}, prompt ~{args.prompt_len}, "
            f"output {args.max_tokens} tokens, {args.max_num_seqs} running at once, "
            f"model {llm.name}, "
            f"stream_interval {args.stream_interval}"
        ),
        "args": vars(args),
        **best,
        "throughput_ratio": {f: best[f]["tokens_per_s"] / base["tokens_per_s"] for f in fronts},
        "added_latency_per_token_s": {
            f: best[f]["tpot_s"]["p50"] - base["tpot_s"]["p50"] for f in fronts
        },
        "rounds_tokens_per_s": {k: [s["tokens_per_s"] for s in v] for k, v in rounds.items()},
        "added_cpu_ms_per_token": {
            f: best[f]["cpu_ms_per_token"] - base["cpu_ms_per_token"] for f in fronts
        },
    }
    plot(result, out / "bench_serving.png")
    clean = {
        k: (
            {kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v
        )
        for k, v in result.items()
    }
    (out / "bench_serving.json").write_text(json.dumps(clean, indent=2))
    print(json.dumps({k: clean[k] for k in ("workload", "in_process", "grpc", "http")}, indent=2))
    for f, name in (("grpc", "gRPC"), ("http", "HTTP")):
        print(
            f"{name} / in-process throughput: {result['throughput_ratio'][f]:.3f}; "
            f"added latency per token: {result['added_latency_per_token_s'][f] * 1e3:.3f} ms; "
            f"added CPU per token: {result['added_cpu_ms_per_token'][f]:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
