"""Injected engine faults against a real ``jaxllm serve`` process (``serve.faults``).

A device step or the engine thread raises while gRPC and HTTP requests run: every in-flight
request ends with UNAVAILABLE (HTTP: 503, or an error event once an SSE stream has begun)
within 5 s, health turns NOT_SERVING, and the process exits with ``EXIT_ENGINE_FAILED`` so a
supervisor restarts it. (A lost multi-host follower: tests/test_multihost.py.)
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import grpc
import httpx
import pytest

from serve.client import Client
from serve.faults import ENV
from serve.server import EXIT_ENGINE_FAILED
from server_process import ServerProcess, write_model

SLOTS, CONTEXT = 8, 128


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("fault_model"))


def _grpc_stream(target: str, started: concurrent.futures.Future) -> tuple:
    with Client(target) as client:
        stream = client.generate_stream("f(", max_tokens=100, temperature=0, ignore_eos=True)
        try:
            next(stream)
            started.set_result(True)
            for _ in stream:
                pass
            return ("OK", time.monotonic())
        except grpc.RpcError as e:
            return (e.code(), time.monotonic(), e.details())


def _http_stream(base: str, started: concurrent.futures.Future) -> tuple:
    body = {"model": "m", "prompt": "g(", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                if not started.done():
                    started.set_result(True)
                events.append(line[6:])
        errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in e]
        return (r.status_code, time.monotonic(), errors)


def _http_whole(base: str) -> tuple:
    body = {"model": "m", "prompt": "h(", "max_tokens": 100, "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    return (r.status_code, time.monotonic(), r.json().get("error"))


@pytest.mark.parametrize("where", ["step", "scheduler"])
def test_an_engine_fault_ends_every_request_flips_health_and_exits_non_zero(
    where, model_path, tmp_path
):
    trigger = tmp_path / "fault"
    args = ["--model", str(model_path), "--no-metrics", "--http-port", "0"]
    args += ["--max-num-seqs", str(SLOTS), "--max-seq-len", str(CONTEXT)]
    args += ["--served-model-name", "m"]
    proc = ServerProcess(args, tmp_path / "server.log", env={ENV: str(trigger)})
    try:
        base = "http://127.0.0.1:" + proc._wait_for(r"OpenAI API on \S+:(\d+)/v1", 60)
        with grpc.insecure_channel(proc.target) as channel:
            proc.wait_ready(channel)
        with concurrent.futures.ThreadPoolExecutor(8) as pool, Client(proc.target) as client:
            starts = [concurrent.futures.Future() for _ in range(3)]
            ends = [pool.submit(_grpc_stream, proc.target, s) for s in starts[:2]]
            ends.append(pool.submit(_http_stream, base, starts[2]))
            ends.append(pool.submit(_http_whole, base))
            concurrent.futures.wait(starts, timeout=60)
            # Every request holds a slot (the non-streaming one is decoding too).
            deadline = time.monotonic() + 60
            while client.stats().slots_in_use < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.stats().slots_in_use == 4
            trigger.write_text(where)
            fired = time.monotonic()
            results = [e.result(timeout=30) for e in ends]
            # The server's watcher notices the failure within 0.05 s of the requests failing
            # (it polls) and the process then keeps NOT_SERVING up for _FAILED_GRACE_S (1 s)
            # before it exits: read within that window.
            status = client.health(timeout=2)
            until = time.monotonic() + 0.5
            while status == "SERVING" and time.monotonic() < until:
                time.sleep(0.02)
                status = client.health(timeout=2)
        code = proc.wait(60)
    finally:
        proc.kill()
    for result in results:
        assert result[1] - fired < 5, (result, "ended more than 5 s after the fault")
    (g1, g2, streamed, whole) = results
    for g in (g1, g2):
        assert g[0] == grpc.StatusCode.UNAVAILABLE and "injected" in g[2], g
    assert streamed[0] == 200 and streamed[2][0]["code"] == "engine_failed", streamed
    assert whole[0] == 503 and "injected" in whole[2]["message"], whole
    assert status == "NOT_SERVING"
    assert code == EXIT_ENGINE_FAILED, proc.log()[-3000:]
    assert "jaxllm: error: engine failed" in proc.log()
