"""The gRPC server end to end: a real ``jaxllm serve`` process, real channels, real model."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import jax
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxllm
from serve.admission import Admission
from serve.client import AsyncClient, Client, generate_request
from serve.proto import jaxllm_pb2 as pb
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from server_process import REPO, health, serving, write_model
from sharding import make_mesh

SLOTS, QUEUE, CONTEXT = 8, 56, 128
SAMPLE = "def fibonacci(n):"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    args = ["--model", str(model_path), "--metrics-port", "0", "--max-num-seqs", str(SLOTS)]
    args += ["--max-queue", str(QUEUE), "--max-seq-len", str(CONTEXT), "--sample", SAMPLE]
    with serving(args, tmp_path_factory.mktemp("serve_log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def reference(model_path):
    """The notebook API on the same model and the same single-device layout as the server."""
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    with jaxllm.LLM.load(
        model_path, mesh=mesh, max_num_seqs=SLOTS, max_seq_len=CONTEXT, warm_up=False
    ) as llm:
        yield llm


@pytest.fixture
def client(server):
    with Client(server.target) as c:
        yield c
        _wait_idle(c)


def _wait_idle(client: Client, timeout: float = 30) -> pb.ServerStats:
    """Until no request holds a slot or a queue place (slots free at the engine's next step)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.slots_in_use == 0 and stats.in_flight == 0 and stats.queue_depth == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout} s: {stats}")
        time.sleep(0.05)


def _metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
    }


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dogs while jax compiles".split()
    return [" ".join(rng.choices(words, k=rng.randrange(1, 12))) for _ in range(n)]


async def _gather_streams(target, jobs):
    async with AsyncClient(target) as client:
        return await asyncio.gather(*(client.generate(p, **kw) for p, kw in jobs))


def test_64_concurrent_streams_match_llm_generate(server, reference, client):
    rng = random.Random(0)
    jobs = [
        (p, dict(max_tokens=rng.randrange(4, 24), temperature=0.0, ignore_eos=rng.random() < 0.5))
        for p in _prompts(64, 1)
    ]
    got = asyncio.run(_gather_streams(server.target, jobs))
    for (prompt, kw), result in zip(jobs, got, strict=True):
        want = reference.generate(prompt, **kw)
        assert result.token_ids == want.token_ids, prompt
        assert result.text == want.text
        assert result.finish_reason == want.finish_reason
        assert result.prompt_tokens == len(want.prompt_token_ids)
        assert result.completion_tokens == len(want.token_ids)
    assert any(r.finish_reason == "length" for r in got)


def test_token_ids_in_and_text_out(server, reference, client):
    ids = [256, 72, 101, 108, 108, 111]
    result = client.generate(ids, max_tokens=10, temperature=0.0, ignore_eos=True)
    want = reference.generate(ids, max_tokens=10, temperature=0.0, ignore_eos=True)
    assert result.token_ids == want.token_ids and result.text == want.text
    assert client.tokenize("Hello") == reference.tokenizer.encode("Hello")


async def _cancel_half(target):
    async with AsyncClient(target) as client:

        async def run(i):
            stream = client.generate_stream(
                f"cancel {i}", max_tokens=100, temperature=0.0, ignore_eos=True
            )
            tokens = 0
            async for message in stream:
                tokens += len(message.token_ids)
                if i % 2 == 0 and tokens >= 3:
                    await stream.aclose()  # hang up mid-way: the call is cancelled
                    return "cancelled", tokens
            return message.finish_reason, tokens

        return await asyncio.gather(*(run(i) for i in range(24)))


def test_cancelling_half_the_streams_frees_their_slots(server, client):
    before = _metrics(server)
    outcomes = asyncio.run(_cancel_half(server.target))
    assert [o for o, _ in outcomes[1::2]] == ["length"] * 12
    assert all(n == 100 for _, n in outcomes[1::2])
    assert all(o == "cancelled" and n < 100 for o, n in outcomes[::2])
    _wait_idle(client)
    after = _metrics(server)
    assert after["jaxllm_slots_in_use"] == 0 and after["jaxllm_queue_depth"] == 0
    cancelled = 'jaxllm_requests_total{outcome="cancelled"}'
    assert after[cancelled] - before[cancelled] == 12
    # And it keeps serving.
    assert client.generate("after", max_tokens=5, temperature=0.0, ignore_eos=True).token_ids


def test_deadline_cancels_the_request_and_frees_the_slot(server, client):
    key = 'jaxllm_requests_total{outcome="deadline_exceeded"}'
    before = _metrics(server)[key]
    # 120 decode steps take far longer than 50 ms on CPU (about 2 ms each here).
    with pytest.raises(grpc.RpcError) as e:
        client.generate("slow", max_tokens=120, ignore_eos=True, timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(client, timeout=10)
    assert _metrics(server)[key] == before + 1  # the server saw it too


async def _burst(target, n):
    async with AsyncClient(target) as client:

        async def one(i):
            start = time.perf_counter()
            try:
                # Long enough (110 decode steps) that few requests end while the burst arrives.
                result = await client.generate(
                    f"b{i}", max_tokens=110, temperature=0.0, ignore_eos=True
                )
                return "ok", len(result.token_ids), time.perf_counter() - start
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details(), time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_burst_beyond_capacity_is_refused_at_once(server, client):
    results = asyncio.run(_burst(server.target, 120))
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) + len(refused) == 120, {r[0] for r in results}
    # Nothing is refused before slots + queue are full; after that only places freed by
    # requests that finished while the burst arrived admit more (how many depends on the
    # machine's speed, so only "some were refused" is asserted).
    assert len(ok) >= SLOTS + QUEUE
    assert refused
    assert all(n == 110 for _, n, _ in ok)
    assert all("capacity" in detail for _, detail, _ in refused)
    ok_times = sorted(t for *_, t in ok)
    assert max(t for *_, t in refused) < ok_times[len(ok_times) // 2], "refusals must not wait"


@pytest.mark.parametrize(
    "request_kwargs, code, field",
    [
        (dict(prompt=""), "INVALID_ARGUMENT", "prompt"),
        (dict(prompt="x" * 200), "INVALID_ARGUMENT", "more than the maximum of 127"),
        (dict(prompt="a", token_ids=[1]), "INVALID_ARGUMENT", "not both"),
        (dict(token_ids=[5, 999]), "INVALID_ARGUMENT", "token_ids"),
        (dict(prompt="a", max_tokens=-1), "INVALID_ARGUMENT", "sampling.max_tokens"),
        (dict(prompt="x" * 100, max_tokens=50), "INVALID_ARGUMENT", "lower max_tokens"),
        (dict(prompt="a", temperature=-1.0), "INVALID_ARGUMENT", "sampling.temperature"),
        (dict(prompt="a", temperature=float("nan")), "INVALID_ARGUMENT", "sampling.temperature"),
        (dict(prompt="a", top_p=0.0), "INVALID_ARGUMENT", "sampling.top_p"),
        (dict(prompt="a", top_k=-3), "INVALID_ARGUMENT", "sampling.top_k"),
        (dict(prompt="a", min_p=2.0), "INVALID_ARGUMENT", "sampling.min_p"),
        (dict(prompt="a", seed=2**64 - 1), "INVALID_ARGUMENT", "sampling.seed"),
        (dict(prompt="a", stop=[""]), "INVALID_ARGUMENT", "sampling.stop"),
        (dict(prompt="a", stop_token_ids=[-1]), "INVALID_ARGUMENT", "sampling.stop_token_ids"),
        (dict(prompt="a", num_logprobs=21), "INVALID_ARGUMENT", "sampling.num_logprobs"),
        (dict(prompt="a", num_logprobs=-1), "INVALID_ARGUMENT", "sampling.num_logprobs"),
        (dict(prompt="a", num_prompt_logprobs=99), "INVALID_ARGUMENT", "num_prompt_logprobs"),
    ],
)
def test_bad_requests_name_the_field(server, request_kwargs, code, field):
    kwargs = dict(request_kwargs)
    request = pb.GenerateRequest(
        prompt=kwargs.pop("prompt", ""),
        token_ids=kwargs.pop("token_ids", []),
        sampling=pb.SamplingParams(**kwargs),
    )
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.LLMStub(channel).Generate(request, timeout=10))
    assert e.value.code().name == code
    assert field in e.value.details()


_int32 = st.one_of(st.integers(-3, 330), st.integers(-(2**31), 2**31 - 1))
_float32 = st.one_of(
    st.sampled_from([0.0, 1e-9, 0.5, 1.0, 2.0, 100.0, 101.0, -0.0, -1.0]),
    st.floats(width=32),  # NaN, infinities, subnormals, huge values
)
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # valid UTF-8 only


_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")
_FIELDS += ("stop_token_ids", "num_logprobs", "request_id", "n")


@st.composite
def _generate_requests(draw):
    """Mostly well-formed requests with none, one or every field drawn from the wild: all
    wild would almost never get past validation, so OK would go untested."""
    mode = draw(st.sampled_from(["valid", "one_wild", "one_wild", "wild"]))
    odd = draw(st.sampled_from(_FIELDS)) if mode == "one_wild" else None

    def pick(name, valid, wild):
        return draw(wild if mode == "wild" or name == odd else valid)

    optional_float = st.none() | _float32
    sampling = pb.SamplingParams(
        max_tokens=pick("max_tokens", st.integers(0, 40), st.integers(-2, 140) | _int32),
        top_k=pick("top_k", st.integers(0, 400), _int32),
        min_p=pick("min_p", st.floats(0, 1, width=32), _float32),
        stop=pick("stop", st.lists(st.text(min_size=1, max_size=3), max_size=2), st.lists(_text)),
        stop_token_ids=pick(
            "stop_token_ids",
            st.lists(st.integers(0, 319), max_size=3),
            st.lists(_int32, max_size=70),
        ),
        ignore_eos=draw(st.booleans()),
        num_logprobs=pick("num_logprobs", st.integers(0, 20), st.integers(-2, 22) | _int32),
        logprobs=draw(st.booleans()),
    )
    temperature = pick("temperature", st.none() | st.floats(0, 2, width=32), optional_float)
    top_p = pick("top_p", st.none() | st.floats(0.125, 1, width=32), optional_float)
    seed = pick("seed", st.none() | st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1))
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    valid_prompt = st.one_of(
        st.tuples(_text.filter(bool).map(lambda t: t[:60]), st.just([])),
        st.tuples(st.just(""), st.lists(st.integers(0, 319), min_size=1, max_size=60)),
    )
    wild_prompt = st.tuples(st.just("") | _text, st.just([]) | st.lists(_int32, max_size=140))
    prompt, token_ids = pick("prompt", valid_prompt, wild_prompt)
    request_id = pick("request_id", st.just("") | st.text(max_size=20), _text)
    n = pick("n", st.integers(0, 3), _int32)
    return pb.GenerateRequest(
        prompt=prompt, token_ids=token_ids, sampling=sampling, request_id=request_id, n=n
    )


_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def test_fuzzed_requests_get_ok_or_a_client_error_and_the_server_stays_healthy(server):
    seen = set()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LLMStub(channel)

        @settings(max_examples=100, deadline=None, database=None)
        @given(_generate_requests())
        def check(request):
            try:
                messages = list(stub.Generate(request, timeout=60))
            except grpc.RpcError as e:
                assert e.code() in _CLIENT_ERRORS, (e.code(), e.details(), request)
                seen.add(e.code())
                return
            seen.add(grpc.StatusCode.OK)
            assert {m.index for m in messages} == set(range(request.n or 1))
            for index in range(request.n or 1):
                mine = [m for m in messages if m.index == index]
                last = mine[-1]
                assert last.finish_reason in ("stop", "length")
                assert last.usage.completion_tokens == sum(len(m.token_ids) for m in mine)
                assert all(not m.finish_reason for m in mine[:-1])
                wants = request.sampling.logprobs or request.sampling.num_logprobs > 0
                assert all(len(m.logprobs) == len(m.token_ids) * wants for m in mine)

        check()
        assert health(channel) == "SERVING"
    # The fuzzer reached both sides of validation.
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
    with Client(server.target) as client:
        _wait_idle(client)


def test_health_reflection_and_model_info(server, client, reference):
    with grpc.insecure_channel(server.target) as channel:
        assert health(channel) == "SERVING"
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "jaxllm.v1.LLM" in services and "grpc.health.v1.Health" in services
    info = client.model_info()
    assert info.max_context == CONTEXT and info.max_prompt_tokens == CONTEXT - 1
    assert info.vocab_size == reference.config.vocab_size == 320
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32"
    assert info.max_slots == SLOTS and info.max_queue == QUEUE
    assert info.num_params == reference.config.num_params


def test_metrics_cover_latency_tokens_and_start_up(server, client):
    client.generate("metrics", max_tokens=8, temperature=0.0, ignore_eos=True)
    m = _metrics(server)
    assert m["jaxllm_time_to_first_token_seconds_count"] >= 1
    assert m["jaxllm_time_per_output_token_seconds_count"] >= 1
    assert m["jaxllm_inter_token_latency_seconds_count"] >= 7
    assert m["jaxllm_output_tokens_sum"] >= 8 and m["jaxllm_prompt_tokens_count"] >= 1
    assert m["jaxllm_model_load_seconds"] > 0 and m["jaxllm_warm_up_seconds"] > 0
    # The start-up report: by phase, and every warm-up program compiled or from the cache.
    assert (
        m['jaxllm_startup_seconds{phase="total"}'] >= m['jaxllm_startup_seconds{phase="compile"}']
    )
    assert m['jaxllm_startup_seconds{phase="compile"}'] > 0
    programs = m['jaxllm_startup_programs{source="compiled"}']
    programs += m['jaxllm_startup_programs{source="cache"}']
    stats = client.stats()
    startup = stats.startup
    assert programs == startup.programs_compiled + startup.programs_cached > 0
    # This server does not speculate: its figures are there, at 0.
    assert stats.spec_draft_tokens == stats.spec_accepted_tokens == 0
    assert m["jaxllm_spec_draft_tokens_total"] == m["jaxllm_spec_tokens_per_step"] == 0
    assert startup.total_seconds >= startup.compile_seconds > 0 and startup.weight_bytes > 0
    assert m['jaxllm_requests_total{outcome="ok"}'] >= 1
    assert m['jaxllm_requests_total{outcome="invalid"}'] >= 1  # from the bad-request tests


def test_cli_generate_streams_from_the_server(server, reference):
    out = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "--server", server.target]
        + ["--max-tokens", "12", "Hello there"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    want = reference.generate("Hello there", max_tokens=12, temperature=0.0)
    assert out.stdout.decode(errors="replace") == ("Hello there" + want.text).encode().decode(
        errors="replace"
    )
    assert f"{len(want.token_ids)} tokens" in out.stderr.decode()


def test_serve_prints_a_sample_completion_once_serving(server, reference):
    expected = reference.generate(SAMPLE, max_tokens=48, temperature=0)
    header = f"jaxllm: sample completion (greedy, {len(expected.token_ids)} tokens):"
    deadline = time.monotonic() + 60
    while header not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log()
    assert log.index("jaxllm: serving") < log.index(header)
    assert header + "\n" + SAMPLE + expected.text in log


def test_generate_request_helper_rejects_unknown_options():
    with pytest.raises(TypeError, match="temprature"):
        generate_request("x", temprature=0.5)


def test_oversized_messages_are_refused_by_the_transport(server, client):
    request = pb.GenerateRequest(prompt="x" * (5 * 1024 * 1024))  # over the 4 MiB default
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.LLMStub(channel).Generate(request, timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate("small", max_tokens=2, temperature=0.0).completion_tokens >= 1


def test_admission_takes_every_choice_of_a_request_or_none():
    admission = Admission(max_running=2, max_queue=1)
    assert admission.try_acquire(2) is None and admission.in_flight == 2
    refusal = admission.try_acquire(2)  # an n=2 request needs two places: none are taken
    assert "needs 2" in refusal and admission.in_flight == 2
    assert admission.try_acquire() is None and admission.in_flight == 3
    admission.release(3)
    assert admission.in_flight == 0
    with pytest.raises(RuntimeError):
        admission.release()
