"""Server security and lifecycle: bearer-token auth over TLS and a graceful SIGTERM under load
(on a real server process), and an engine failure (on a server in this process, so the test
can break its engine for real)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time

import grpc
import httpx
import pytest

from serve.client import AsyncClient, Client
from serve.config import ServeConfig
from serve.proto import jaxllm_pb2 as pb
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from serve.server import Server
from server_process import ServerProcess, write_model

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1 (it is its own CA)."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "server.key", folder / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("lifecycle_model"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls_files, model):
    key, cert = tls_files
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["--model", str(model), "--max-seq-len", "128", "--max-num-seqs", "4", "--no-metrics"]
    args += ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(token_file)]
    args += ["--drain-timeout-s", "60", "--http-port", "0"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("lifecycle_log") / "server.log")
    try:
        proc.https = proc._wait_for(r"OpenAI API on (https://\S+)/v1", 60)
        with _channel(proc, cert) as channel:
            proc.wait_ready(channel)
        yield proc
    finally:
        proc.kill()


def _channel(proc, cert) -> grpc.Channel:
    return grpc.secure_channel(proc.target, grpc.ssl_channel_credentials(cert.read_bytes()))


def test_tls_client_with_the_token_is_served(server, tls_files):
    with Client(server.target, token=TOKEN, ca_cert=tls_files[1]) as client:
        result = client.generate("secure", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(result.token_ids) == 6 and result.finish_reason == "length"
        assert client.model_info().max_slots == 4


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_without_the_right_token_every_rpc_is_unauthenticated(server, tls_files, token):
    with Client(server.target, token=token, ca_cert=tls_files[1]) as client:
        for call in (
            lambda: client.generate("x", max_tokens=2),
            client.model_info,
            lambda: client.tokenize("x"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in e.value.details()
        # Health stays open for probes.
        assert client.health() == "SERVING"


def test_https_from_the_same_certificate_and_no_prompt_in_the_info_log(server, tls_files):
    _, cert = tls_files
    secret = "zq-private-prompt-7f3a"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": secret, "max_tokens": 2}
    with httpx.Client(verify=str(cert), headers=headers, timeout=60) as https:
        assert https.get(server.https + "/v1/models").status_code == 200
        name = https.get(server.https + "/v1/models").json()["data"][0]["id"]
        r = https.post(server.https + "/v1/completions", json={**body, "model": name})
        assert r.status_code == 200, r.text
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.get(server.https.replace("https://", "http://") + "/health", timeout=10)
    with _channel(server, cert) as channel:
        client_metadata = (("authorization", f"Bearer {TOKEN}"),)
        stub = pb_grpc.LLMStub(channel)
        request = pb.GenerateRequest(prompt=secret, sampling=pb.SamplingParams(max_tokens=2))
        assert list(stub.Generate(request, metadata=client_metadata, timeout=60))
    # The server logs at INFO (its default): requests are served, their text never logged.
    assert "INFO" in server.log() and secret not in server.log()


def test_a_plaintext_client_cannot_talk_to_the_tls_server(server):
    with Client(server.target, token=TOKEN) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.model_info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def _drain_under_load(server, cert):
    async with AsyncClient(server.target, token=TOKEN, ca_cert=cert) as client:

        async def run(i):
            tokens, last = [], None
            async for message in client.generate_stream(
                f"drain {i}", max_tokens=110, temperature=0.0, ignore_eos=True
            ):
                tokens += message.token_ids
                last = message
            return len(tokens), last.finish_reason

        tasks = [asyncio.ensure_future(run(i)) for i in range(16)]
        deadline = time.monotonic() + 10
        while (await client.stats()).in_flight < 16:  # all admitted: 4 decoding, 12 queued
            assert time.monotonic() < deadline and not any(t.done() for t in tasks), tasks
            await asyncio.sleep(0.005)
        server.proc.send_signal(signal.SIGTERM)
        statuses = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "NOT_SERVING" not in statuses:
            statuses.append(await client.health())
        try:
            await client.generate("late", max_tokens=2)
            late = "OK"
        except grpc.aio.AioRpcError as e:
            late = e.code(), e.details()
        busy = sum(not t.done() for t in tasks)
        return statuses, late, busy, await asyncio.gather(*tasks)


def test_sigterm_drains_running_streams_and_exits_0(server, tls_files):
    statuses, late, busy, results = asyncio.run(_drain_under_load(server, tls_files[1]))
    assert statuses[-1] == "NOT_SERVING"
    assert late == (grpc.StatusCode.UNAVAILABLE, "server is shutting down")
    assert busy > 0, "the streams finished before the test saw the drain: not a drain test"
    assert results == [(110, "length")] * 16
    assert server.wait(60) == 0, server.log()[-2000:]
    assert "cancelling" not in server.log()  # nothing had to be cut off


class _ServerThread:
    """A ``Server`` on an asyncio loop in a thread of this process."""

    def __init__(self, config: ServeConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            return Server(config)

        self.server = self.call(make())
        self.call(self.server.start())
        self.call(self.server.load())
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _streams_then_break(target, engine):
    async with AsyncClient(target) as client:
        streams = [
            client.generate_stream(f"f{i}", max_tokens=110, temperature=0.0, ignore_eos=True)
            for i in range(4)
        ]
        for stream in streams:  # every request holds a slot and is decoding
            await anext(stream)
        # A real failure inside the running engine: its weights lose an array, so the next
        # decode step raises in the engine thread (as a device or compiler error would).
        engine.runner.params = engine.runner.params[:-1]

        async def finish(stream):
            try:
                async for _ in stream:
                    pass
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()

        ends = await asyncio.wait_for(asyncio.gather(*(finish(s) for s in streams)), 30)
        for _ in range(100):
            if await client.health() == "NOT_SERVING":
                break
            await asyncio.sleep(0.05)
        try:
            await client.generate("after", max_tokens=2, timeout=10)
            after = "OK"
        except grpc.aio.AioRpcError as e:
            after = e.code(), e.details()
        return ends, await client.health(), after


def test_an_engine_failure_fails_streams_clearly_and_flips_health(model):
    config = ServeConfig(
        model=str(model),
        mesh="data=2,tensor=4",  # this process has 8 fake devices
        engine={"max_num_seqs": 4, "max_seq_len": 128},
        port=0,
        metrics_port=None,
        drain_timeout_s=0,
    )
    server = _ServerThread(config)
    try:
        ends, status, after = asyncio.run(
            _streams_then_break(server.target, server.server.llm.engine)
        )
    finally:
        server.close()
    for end in ends:
        assert end[0] == grpc.StatusCode.UNAVAILABLE and "engine failed" in end[1], end
    assert status == "NOT_SERVING"
    assert after[0] == grpc.StatusCode.UNAVAILABLE and "engine failed" in after[1], after
