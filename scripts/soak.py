"""The chaos soak: a real ``jaxllm serve`` process (gRPC and HTTP) under a hostile mix for a
given time, and whether it stayed healthy.

    python scripts/soak.py --duration 1800 --out docs/soak    # the long run (README)
    python scripts/soak.py --duration 60 --out out/soak       # CI's (tests/test_soak.py)

The server is the embedded demo model with ``configs/demo.yaml`` unless ``--config`` /
``--model`` say otherwise. The clock starts once every step shape is compiled, and runs in
cycles (``--cycle`` seconds each):

1. ``--lanes`` clients send back to back, over gRPC or HTTP at random (``_soak_mix``): 30% of
   them give up at a random moment (before the first token or mid-stream: a gRPC cancel or
   deadline, an HTTP connection closed), 5% are invalid, 15% of the valid ones carry a long
   prompt (most of the context). Meanwhile a client subprocess streams, and is SIGKILLed
   mid-stream (``_soak_client``), one after another.
2. A burst: 1.5 x the server's capacity (slots + queue) of requests at once, so that some
   are queued and some refused.
3. Everything stops, and the server must come back to idle: no request running, queued or
   admitted, no KV page held (prefix-cached pages are free to stay: they are evictable).

Every second it samples the server's GetStats (slots, queue depth, in flight, KV pages) and
RSS. It writes ``soak.json`` (settings, time series, requests by outcome and status, latency
percentiles, the bursts, the verdicts) and ``soak.png`` (the series over time) into
``--out``, and exits 1 unless every property holds:

- no INTERNAL: no gRPC INTERNAL / UNKNOWN, no HTTP 5xx or error event, no request the server
  counted as ``error``, no traceback in its log;
- answers as planned: nothing ``unexpected`` (a valid request refused as invalid, a hang);
- no leak: idle after every burst;
- RSS growth under ``--max-rss-growth`` % from the end of warm-up (the idle point closest
  before ``--warm-up-share`` of the run, or the first) to the end (the last idle point);
- the mix ran: requests ended ok, cancelled, invalid and killed, and a burst queued or was
  refused;
- the server was SERVING at the end and exited 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # serve, from this checkout

import _soak_report as report  # noqa: E402
from _soak_mix import OUTCOMES, Answer, Mix, Plan, Sender, prompt_pool  # noqa: E402

CLIENT = Path(__file__).resolve().parent / "_soak_client.py"
# How long the server may take to come back to idle after a burst before it counts as a leak:
# a cancelled request's pages go at the engine's next step, a killed client's when the
# server sees its connection close; both are milliseconds.
SETTLE_S = 30.0


class Server:
    """``python -m serve.cli serve`` with both front ends on free ports; the log is a file."""

    def __init__(self, args: argparse.Namespace, log_path: Path):
        command = [sys.executable, "-m", "serve.cli", "serve", "--config", args.config]
        command += ["--port", "0", "--http-port", "0", "--no-metrics"]
        if args.model:
            command += ["--model", args.model]
        self.command = command + args.server_arg
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._start(started)
        except BaseException:
            self.stop()
            raise

    def _start(self, started: float) -> None:
        self.process = psutil.Process(self.proc.pid)
        self.target = "127.0.0.1:" + self._wait_for(r"jaxllm: listening on [\d.]+:(\d+)")
        self.http_base = self._wait_for(r"OpenAI API on (http://\S+)/v1")
        self._wait_for(r"jaxllm: (serving) ")
        self.ready_s = time.monotonic() - started
        # With background compile (the default) the rest of the step shapes compile after
        # SERVING: a soak of a server still compiling would measure the compiler's memory.
        warm = re.search(r"warm-up: (\d+) of (\d+) step shapes", self.log())
        if warm is None or warm[1] != warm[2]:
            self._wait_for(r"start-up: (every step shape compiled)")
        self.warm_s = time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for(self, pattern: str, timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"no {pattern!r} in the server log after {timeout} s")

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / 2**20

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM: the server drains and exits; its exit code (None if it had to be killed)."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._log.close()


@dataclasses.dataclass
class Tally:
    """Every request's end, counted as it happens (one asyncio loop: no locks)."""

    by_outcome: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_code: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_kind: dict = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    # Give-ups by when they happened: before any token came (queued or prefilling) or after.
    cancelled_before_first_token: int = 0
    cancelled_mid_stream: int = 0
    # Requests planned to give up: the rest of them ended (or were refused) first.
    planned_give_ups: int = 0
    latencies: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    notes: list = dataclasses.field(default_factory=list)  # the first few bad answers

    def add(self, plan: Plan, answer: Answer) -> None:
        self.by_outcome[answer.outcome] += 1
        self.by_code[answer.code] += 1
        self.by_kind[plan.kind][answer.outcome] += 1
        self.planned_give_ups += plan.cancel_after is not None
        if answer.outcome == "cancelled":
            if answer.first_token_s is None:
                self.cancelled_before_first_token += 1
            else:
                self.cancelled_mid_stream += 1
        if answer.outcome == "ok":
            self.latencies[f"{plan.api} {plan.kind}"].append((answer.seconds, answer.first_token_s))
        if answer.outcome in ("internal", "unexpected") and len(self.notes) < 20:
            self.notes.append({"outcome": answer.outcome, "code": answer.code, "plan": repr(plan)})

    def add_killed(self, outcome: str, code: str) -> None:
        self.by_outcome[outcome] += 1
        self.by_code[code] += 1
        self.by_kind["killed client"][outcome] += 1
        if outcome in ("internal", "unexpected") and len(self.notes) < 20:
            self.notes.append({"outcome": outcome, "code": code, "plan": "killed client"})


class Soak:
    def __init__(self, args: argparse.Namespace, server: Server):
        self.args, self.server = args, server
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.samples: list[dict] = []
        self.bursts: list[dict] = []
        self.idle_checks: list[dict] = []
        self.phase = "mixed"
        self.stats_failures = 0

    async def run(self) -> None:
        args, server = self.args, self.server
        self.sender = sender = Sender(server.target, server.http_base, await self._model_name())
        try:
            info = await sender.grpc.model_info()
            self.info = info
            self.capacity = info.max_slots + info.max_queue

            async def token_count(text: str) -> int:
                return len(await sender.grpc.tokenize(text))

            self.mix = Mix(
                self.rng,
                context=info.max_context,
                vocab=info.vocab_size,
                prompts=await prompt_pool(token_count, info.max_context, self.rng),
                cancel_share=args.cancel_share,
                invalid_share=args.invalid_share,
            )
            self.started = time.monotonic()
            sampler = asyncio.ensure_future(self._sample())
            # The burst and the settling after it take seconds (the last cycle's measure),
            # which the mixed phase leaves room for, so that the run ends near --duration.
            tail_s = args.cycle * 0.25
            try:
                while (mixed_s := min(args.cycle, args.duration - self.elapsed()) - tail_s) > 1:
                    tail_s = await self._cycle(mixed_s)
            finally:
                sampler.cancel()
            self.duration_s = self.elapsed()
            try:
                self.final_health = await sender.grpc.health()
                self.server_metrics = await self._server_metrics()
            except (grpc.aio.AioRpcError, httpx.HTTPError) as e:  # the server is gone
                self.final_health = f"unreachable: {e!r}"[:300]
                self.server_metrics = {"requests_by_outcome": {}, "http_5xx": None}
        finally:
            await sender.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _model_name(self) -> str:
        async with httpx.AsyncClient(base_url=self.server.http_base) as http:
            return (await http.get("/v1/models")).json()["data"][0]["id"]

    async def _cycle(self, mixed_s: float) -> float:
        """Mixed traffic for ``mixed_s``, a burst, then idle; returns the seconds after the
        mixed phase."""
        self.phase = "mixed"
        stop = asyncio.Event()
        lanes = [asyncio.ensure_future(self._lane(stop)) for _ in range(self.args.lanes)]
        lanes.append(asyncio.ensure_future(self._killer(stop)))
        await asyncio.sleep(mixed_s)
        burst_at = time.monotonic()
        self.phase = "burst"
        await self._burst()  # on top of the lanes, which keep sending
        stop.set()
        await asyncio.gather(*lanes)
        self.phase = "settle"
        await self._settle()
        return time.monotonic() - burst_at

    async def _lane(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            answer = await self._send(self.mix.lane())
            if answer.outcome == "rejected":  # as a client should: back off, then retry
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))

    async def _send(self, plan: Plan) -> Answer:
        answer = await self.sender.send(plan)
        self.tally.add(plan, answer)  # as it ends: the series count it in its own second
        return answer

    async def _killer(self, stop: asyncio.Event) -> None:
        """One client subprocess at a time, SIGKILLed a random moment after its first piece."""
        for api in itertools.cycle(("grpc", "http")):
            if stop.is_set():
                return
            where = (
                [self.server.target]
                if api == "grpc"
                else [self.server.http_base, self.sender.model]
            )
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            child = await asyncio.create_subprocess_exec(
                sys.executable, str(CLIENT), api, *where,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
            try:
                line = (await asyncio.wait_for(child.stdout.readline(), 120)).decode().strip()
            except TimeoutError:  # the server never answered it
                child.kill()
                line = "no first piece in 120 s"
            streaming = line == "first"
            if streaming:
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                with contextlib.suppress(ProcessLookupError):  # it may have ended already
                    child.send_signal(signal.SIGKILL)
                # A client that ended before the kill has said how ("end ok").
                line = (await child.stdout.read()).decode().strip()
            if streaming and not line:
                outcome, code = "killed", f"{api} client SIGKILL"
            else:
                outcome, code = _child_end(api, line)
                if outcome == "unexpected":
                    code += " " + (await child.stderr.read()).decode()[-300:]
            await child.wait()
            self.tally.add_killed(outcome, code)
            # A new interpreter costs the server's cores a fraction of a second: pace them.
            await asyncio.sleep(0.5)

    async def _burst(self) -> None:
        size = math.ceil(self.capacity * self.args.burst_factor)
        plans = [self.mix.burst() for _ in range(size)]
        watch = {"queue_depth": 0, "in_flight": 0, "slots_in_use": 0}
        watcher = asyncio.ensure_future(self._watch(watch))
        started = self.elapsed()
        answers = await asyncio.gather(*(self._send(p) for p in plans))
        watcher.cancel()
        outcomes = collections.Counter(a.outcome for a in answers)
        self.bursts.append(
            {"t": round(started, 2), "size": size, "seconds": round(self.elapsed() - started, 2)}
            | {"outcomes": dict(outcomes)}
            | {f"max_{k}": v for k, v in watch.items()}
        )

    async def _watch(self, peaks: dict) -> None:
        """The burst's peaks, sampled faster than the 1 s series (the queue fills at once and
        drains within seconds)."""
        while True:
            stats = await self._stats()
            if stats is not None:
                for key in peaks:
                    peaks[key] = max(peaks[key], getattr(stats, key))
            await asyncio.sleep(0.05)

    async def _settle(self) -> None:
        started = time.monotonic()
        while True:
            stats = await self._stats()
            idle = stats is not None and not (
                stats.in_flight or stats.slots_in_use or stats.queue_depth or stats.kv_pages_used
            )
            waited = time.monotonic() - started
            if idle or waited > SETTLE_S:
                break
            await asyncio.sleep(0.1)
        check = {"t": round(self.elapsed(), 2), "idle": idle, "settle_s": round(waited, 2)}
        check["rss_mb"] = round(self.server.rss_mb(), 1)
        if stats is not None:
            check |= {
                k: getattr(stats, k)
                for k in ("in_flight", "slots_in_use", "queue_depth")
                + ("kv_pages_used", "kv_pages_cached", "kv_pages_free")
            }
        self.idle_checks.append(check)

    async def _stats(self):
        try:
            return await asyncio.wait_for(self.sender.grpc.stats(), 5)
        except (TimeoutError, grpc.aio.AioRpcError):  # counted: a server too busy to answer
            self.stats_failures += 1
            return None

    async def _sample(self) -> None:
        while True:
            stats = await self._stats()
            sample = {"t": round(self.elapsed(), 2), "phase": self.phase}
            sample["rss_mb"] = round(self.server.rss_mb(), 1)
            if stats is not None:
                sample |= {
                    "slots_in_use": stats.slots_in_use,
                    "queue_depth": stats.queue_depth,
                    "in_flight": stats.in_flight,
                    "kv_pages_used": stats.kv_pages_used,
                    "kv_pages_cached": stats.kv_pages_cached,
                }
            sample |= {o: self.tally.by_outcome[o] for o in OUTCOMES}
            self.samples.append(sample)
            await asyncio.sleep(self.args.sample_s)

    async def _server_metrics(self) -> dict:
        """The server's own count of requests by outcome and of HTTP 5xx responses."""
        async with httpx.AsyncClient(base_url=self.server.http_base) as http:
            text = (await http.get("/metrics")).text
        outcomes = {
            m[1]: int(float(m[2]))
            for m in re.finditer(r'^jaxllm_requests_total\{outcome="(\w+)"\} (\S+)', text, re.M)
        }
        http_5xx = sum(
            int(float(m[1]))
            for m in re.finditer(
                r'^jaxllm_http_responses_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', text, re.M
            )
        )
        return {"requests_by_outcome": outcomes, "http_5xx": http_5xx}


def _child_end(api: str, line: str) -> tuple[str, str]:
    """A killed client's own last word, when it ended before the kill."""
    code = line.removeprefix("end ")
    if code == "ok":
        return "ok", f"{api} ok"
    if code in ("RESOURCE_EXHAUSTED", "429"):
        return "rejected", f"{api} {code}"
    if code in ("INTERNAL", "UNKNOWN", "DATA_LOSS", "error_event") or code.startswith("5"):
        return "internal", f"{api} client saw {code}"
    return "unexpected", f"{api} client: {line!r}"


def summarise(args: argparse.Namespace, server: Server, soak: Soak, exit_code: int | None) -> dict:
    """Everything soak.json holds, the verdicts included."""
    tally = soak.tally
    log = server.log()
    checks = soak.idle_checks
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "server": {
            "command": server.command,
            "ready_s": round(server.ready_s, 1),
            "fully_compiled_s": round(server.warm_s, 1),
            "model": soak.sender.model,
            "max_slots": soak.info.max_slots,
            "max_queue": soak.info.max_queue,
            "capacity": soak.capacity,
            "context": soak.info.max_context,
            "kv_pages": soak.info.kv_pages,
            "final_health": soak.final_health,
            "exit_code": exit_code,
            "log_tracebacks": log.count("Traceback (most recent call last)"),
            "log_errors": len(re.findall(r"^\S+ \S+ (?:ERROR|CRITICAL) ", log, re.M)),
            **soak.server_metrics,
        },
        "duration_s": round(soak.duration_s, 1),
        "requests": {
            "total": sum(tally.by_outcome.values()),
            "by_outcome": {o: tally.by_outcome[o] for o in OUTCOMES},
            "by_code": dict(tally.by_code.most_common()),
            "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
            "cancelled_before_first_token": tally.cancelled_before_first_token,
            "cancelled_mid_stream": tally.cancelled_mid_stream,
            "planned_give_ups": tally.planned_give_ups,
        },
        "internal": tally.by_outcome["internal"],
        "latency": report.latency(tally.latencies),
        "bursts": soak.bursts,
        "leak": {
            "checks": len(checks),
            "idle": sum(c["idle"] for c in checks),
            "max_settle_s": max((c["settle_s"] for c in checks), default=None),
        },
        "idle_checks": checks,
        "rss": report.rss(checks, soak.duration_s, args.warm_up_share),
        "stats_unanswered": soak.stats_failures,
        "notes": tally.notes,
        "series": report.thin(soak.samples),
    }
    result["properties"] = verdicts(result, args)
    result["passed"] = all(v["pass"] for v in result["properties"].values())
    return result


def verdicts(result: dict, args: argparse.Namespace) -> dict[str, dict]:
    """The properties of the module's docstring, each with what it was judged on."""
    server, requests, memory = result["server"], result["requests"], result["rss"]
    outcomes, leak = requests["by_outcome"], result["leak"]
    server_errors = server["requests_by_outcome"].get("error", 0)
    bad_log = server["log_tracebacks"] + server["log_errors"]
    queued = max((b["max_queue_depth"] for b in result["bursts"]), default=0)
    refused = sum(b["outcomes"].get("rejected", 0) for b in result["bursts"])
    missing = [o for o in ("ok", "cancelled", "invalid", "killed") if not outcomes[o]]
    return {
        "no_internal": {
            "pass": result["internal"] == 0
            and server_errors == 0
            and server["http_5xx"] == 0
            and bad_log == 0,
            "detail": f"{result['internal']} INTERNAL/UNKNOWN/5xx/error events seen by clients, "
            f"{server_errors} requests the server counted as error, {server['http_5xx']} HTTP "
            f"5xx it sent, {bad_log} tracebacks or ERROR lines in its log",
        },
        "answers_as_planned": {
            "pass": outcomes["unexpected"] == 0,
            "detail": f"{outcomes['unexpected']} unexpected answers (see notes)",
        },
        "no_leak": {
            "pass": leak["checks"] > 0 and leak["idle"] == leak["checks"],
            "detail": f"idle (no request admitted, running or queued, 0 KV pages held) after "
            f"{leak['idle']} of {leak['checks']} bursts, within {leak['max_settle_s']} s",
        },
        "rss_growth": {
            "pass": memory["growth_pct"] < args.max_rss_growth,
            "detail": f"{memory['warm_up_mb']} MiB at {memory['warm_up_at_s']} s -> "
            f"{memory['end_mb']} MiB at {memory['end_at_s']} s: {memory['growth_pct']:+.2f}% "
            f"(limit {args.max_rss_growth}%)",
        },
        "mix_ran": {
            "pass": not missing and (queued > 0 or refused > 0),
            "detail": f"requests ended {', '.join(o for o in OUTCOMES if outcomes[o])}"
            + (f" but none {', '.join(missing)}" if missing else "")
            + f"; bursts queued up to {queued} and refused {refused} requests",
        },
        "clean_exit": {
            "pass": server["final_health"] == "SERVING" and server["exit_code"] == 0,
            "detail": f"health {server['final_health']} at the end, exit code "
            f"{server['exit_code']} on SIGTERM",
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of soak (60: CI)")
    parser.add_argument("--out", default="out/soak", help="folder for soak.json and soak.png")
    parser.add_argument("--config", default="configs/demo.yaml", help="the server's YAML")
    parser.add_argument("--model", help="checkpoint to serve (default: the demo model)")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="one more `jaxllm serve` argument"
    )
    parser.add_argument("--cycle", type=float, default=20, help="seconds per burst cycle")
    parser.add_argument("--lanes", type=int, default=8, help="clients sending back to back")
    parser.add_argument("--burst-factor", type=float, default=1.5, help="burst / capacity")
    parser.add_argument("--cancel-share", type=float, default=0.30)
    parser.add_argument("--invalid-share", type=float, default=0.05)
    parser.add_argument("--warm-up-share", type=float, default=0.2, help="of the run, for RSS")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    server = Server(args, out / "server.log")
    print(f"soak: server ready in {server.ready_s:.1f} s, fully compiled in {server.warm_s:.1f} s")
    soak = Soak(args, server)
    try:
        asyncio.run(soak.run())
    finally:
        exit_code = server.stop()
    result = summarise(args, server, soak, exit_code)
    report.write(result, out)
    print(report.headline(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
