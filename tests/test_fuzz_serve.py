"""Hostile input against one real ``jaxllm serve`` process (gRPC and HTTP), via the real
clients. The property for every drawn input: a client error (INVALID_ARGUMENT, OUT_OF_RANGE,
UNIMPLEMENTED, RESOURCE_EXHAUSTED; HTTP 4xx with an OpenAI error body) or a success, never
INTERNAL / 5xx / a hang, and a good request is served afterwards. ``JAXLLM_FUZZ_EXAMPLES``
sets the examples per entry point (500 here; scripts/fuzz.py runs the long profile).
"""

from __future__ import annotations

import collections
import json
import os

import fuzz_strategies as fz
import grpc
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve.client import Client
from serve.proto import jaxllm_pb2 as pb
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from server_process import ServerProcess, health, write_model

SLOTS, QUEUE, CONTEXT = 4, 16, 128
# Per call: every accepted request asks for at most 2 tokens (plus scoring), so a call that
# is still running after this long is hung, not slow.
CALL_TIMEOUT_S = 60
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Seen outcomes per entry point, for scripts/fuzz.py's summary (and the coverage asserts).
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """scripts/fuzz.py reads the outcomes per entry point from $JAXLLM_FUZZ_SUMMARY."""
    yield
    if os.environ.get("JAXLLM_FUZZ_SUMMARY"):
        with open(os.environ["JAXLLM_FUZZ_SUMMARY"], "w") as f:
            json.dump({k: dict(v) for k, v in OUTCOMES.items()}, f, indent=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_model(tmp_path_factory.mktemp("fuzz_model"))
    config_file = model / "tokenizer_config.json"  # a chat template, for the chat route
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": template}))  # fmt: skip
    args = ["--model", str(model), "--no-metrics", "--http-port", "0"]
    args += ["--max-num-seqs", str(SLOTS), "--max-queue", str(QUEUE)]
    args += ["--max-seq-len", str(CONTEXT), "--served-model-name", "m"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("fuzz_log") / "server.log")
    try:
        proc.http = "http://127.0.0.1:" + proc._wait_for(r"OpenAI API on \S+:(\d+)/v1", 60)
        with grpc.insecure_channel(proc.target) as channel:
            proc.wait_ready(channel)
        yield proc
        code = proc.terminate()
        assert code == 0, proc.log()[-3000:]
    finally:
        proc.kill()


def _still_serves(server) -> None:
    """A good request on each front end after the storm, and nothing left running."""
    with Client(server.target) as client:
        assert len(client.generate("ok", max_tokens=2, temperature=0).token_ids) == 2
        with grpc.insecure_channel(server.target) as channel:
            assert health(channel) == "SERVING"
    body = {"model": "m", "prompt": "ok", "max_tokens": 2}
    r = httpx.post(server.http + "/v1/completions", json=body, timeout=CALL_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_fuzzed_generate_requests(server):
    seen = OUTCOMES["grpc.Generate"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LLMStub(channel)

        @fz.fuzz_settings()
        @given(fz.generate_requests())
        def check(request):
            try:
                messages = list(stub.Generate(request, timeout=CALL_TIMEOUT_S))
            except grpc.RpcError as e:
                seen[e.code().name] += 1
                assert e.code() in CLIENT_ERRORS, (e.code(), e.details(), request)
                assert e.details()  # says what was wrong
                return
            seen["OK"] += 1
            ends = [m for m in messages if m.finish_reason]
            assert len(ends) == (request.n or 1)
            assert all(m.finish_reason in ("stop", "length") for m in ends)

        check()
    assert seen["OK"] and seen["INVALID_ARGUMENT"], seen
    _still_serves(server)


def _raw_generate(channel: grpc.Channel):
    """Generate with the request's bytes as given: what a client that is not protobuf's sends
    (invalid UTF-8 in a string field, truncated messages, wrong wire types)."""
    return channel.unary_stream(
        "/jaxllm.v1.LLM/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2); payload under 128 bytes."""
    return bytes([number << 3 | 2, len(payload)]) + payload


_raw_messages = st.one_of(
    st.binary(max_size=80),
    # A prompt, a stop string or a chat message whose bytes are not UTF-8.
    st.binary(min_size=1, max_size=40).map(lambda b: _field(1, b"\xff" + b)),
    st.binary(min_size=1, max_size=40).map(
        lambda b: _field(1, b"ok") + _field(3, _field(7, b"\xc3" + b))
    ),
    st.binary(max_size=40).map(lambda b: _field(6, _field(2, b"\xed\xa0\x80" + b))),
)


def test_fuzzed_raw_bytes_and_invalid_utf8(server):
    seen = OUTCOMES["grpc.Generate(raw bytes)"]
    with grpc.insecure_channel(server.target) as channel:
        call = _raw_generate(channel)

        @fz.fuzz_settings()
        @given(_raw_messages)
        def check(raw):
            try:
                list(call(raw, timeout=CALL_TIMEOUT_S))
            except grpc.RpcError as e:
                seen[e.code().name] += 1
                assert e.code() in CLIENT_ERRORS, (e.code(), e.details(), raw)
                return
            seen["OK"] += 1

        check()
    assert seen["INVALID_ARGUMENT"], seen
    _still_serves(server)


def test_invalid_utf8_is_invalid_argument_without_a_traceback(server):
    """Regression (found by fuzzing): gRPC answered UNKNOWN and logged a traceback."""
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as e:
        list(_raw_generate(channel)(_field(1, b"\xff\xfe"), timeout=CALL_TIMEOUT_S))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in e.value.details()
    assert "Traceback" not in server.log()


def test_fuzzed_tokenize_requests(server):
    seen = OUTCOMES["grpc.Tokenize"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LLMStub(channel)

        @fz.fuzz_settings()
        @given(fz.TEXT | st.integers(0, 2_000_000).map("t".__mul__), st.booleans())
        def check(text, special):
            request = pb.TokenizeRequest(text=text, add_special_tokens=special)
            try:
                reply = stub.Tokenize(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                seen[e.code().name] += 1
                assert e.code() in CLIENT_ERRORS, (e.code(), e.details())
                return
            seen["OK"] += 1
            assert all(0 <= t < fz.VOCAB for t in reply.token_ids)

        check()
    assert seen["OK"], seen
    _still_serves(server)


def _check_http(r: httpx.Response, seen: collections.Counter, body: bytes) -> None:
    seen[str(r.status_code)] += 1
    assert r.status_code in (200, 400, 404, 413, 422, 429), (r.status_code, r.text, body)
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and error["type"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        assert r.json()["choices"], r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_http_bodies(server, route):
    seen = OUTCOMES[f"http {route}"]
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=server.http, timeout=CALL_TIMEOUT_S) as http:

        @fz.fuzz_settings()
        @given(fz.http_bodies(chat=route.endswith("chat/completions")))
        def check(body):
            _check_http(http.post(route, content=body, headers=headers), seen, body)

        check()
    assert seen["200"] and seen["400"], seen
    _still_serves(server)


def test_fuzzed_tokenize_and_detokenize_bodies(server):
    seen = OUTCOMES["http /tokenize /detokenize"]
    with httpx.Client(base_url=server.http, timeout=CALL_TIMEOUT_S) as http:

        @fz.fuzz_settings()
        @given(
            st.sampled_from(["/tokenize", "/detokenize"]),
            # Valid bodies for either route half the time: wild ones are nearly always 400.
            st.fixed_dictionaries(
                {
                    "model": st.just("m"),
                    "prompt": fz.SMALL_TEXT,
                    "tokens": st.lists(st.integers(0, fz.VOCAB - 1), max_size=4),
                }
            )
            | st.fixed_dictionaries(
                {},
                optional={
                    "model": st.just("m") | fz.JSON,
                    "prompt": fz.TEXT | fz.JSON,
                    "tokens": st.lists(fz.INT32, max_size=6) | fz.JSON,
                    "messages": fz.JSON,
                    "add_special_tokens": fz.JSON,
                },
            ),
        )
        def check(route, body):
            r = http.post(route, json=body)
            seen[str(r.status_code)] += 1
            assert r.status_code in (200, 400, 404, 422), (r.status_code, r.text, body)
            assert r.status_code == 200 or r.json()["error"]["message"]

        check()
    assert seen["200"] and seen["400"], seen


def test_bodies_beyond_the_limit_get_413_before_they_are_read(server):
    too_big = b'{"prompt": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    r = httpx.post(server.http + "/v1/completions", content=too_big, timeout=CALL_TIMEOUT_S)
    assert r.status_code == 413 and str(4 * 1024 * 1024) in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"a" * (1024 * 1024)

    r = httpx.post(server.http + "/v1/completions", content=chunks(), timeout=CALL_TIMEOUT_S)
    assert r.status_code == 413, r.text
    with Client(server.target) as client, pytest.raises(grpc.RpcError) as e:
        client.generate("b" * (4 * 1024 * 1024), max_tokens=1)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serves(server)
