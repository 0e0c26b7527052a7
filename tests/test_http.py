"""The OpenAI-compatible HTTP API end to end: a real ``jaxllm serve --http-port`` process on
localhost, driven by the official ``openai`` client (sync and async, streaming and not) and by
raw HTTP (httpx), checked against the notebook API and gRPC on the same model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import threading
import time

import grpc
import httpx
import jax
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxllm
from jaxllm.chat import chat_prompt_ids
from jaxllm.structured import StructuredOutput
from jaxllm.tokenizer import Tokenizer
from serve.admission import Admission
from serve.client import Client
from serve.config import ServeConfig
from serve.http import HttpFrontEnd
from serve.metrics import Metrics
from server_process import ServerProcess, write_model
from sharding import make_mesh

SLOTS, QUEUE, CONTEXT = 4, 4, 256
KEY = "sk-test-0123456789"
# A small template in the style of real ones: BOS from the special tokens, one line a turn.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
]


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The test model as written: its tokenizer has no chat template."""
    return write_model(tmp_path_factory.mktemp("http_plain"))


@pytest.fixture(scope="module")
def model_path(plain_model, tmp_path_factory):
    """The same weights with a chat template."""
    path = tmp_path_factory.mktemp("http_model") / "tiny-llama"
    shutil.copytree(plain_model, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    args = ["--model", str(model_path), "--no-metrics", "--http-port", "0", "--api-key", KEY]
    args += ["--max-num-seqs", str(SLOTS), "--max-queue", str(QUEUE)]
    args += ["--max-seq-len", str(CONTEXT)]
    proc = ServerProcess(args, tmp_path_factory.mktemp("http_log") / "server.log")
    try:
        proc.http = "http://127.0.0.1:" + proc._wait_for(r"jaxllm: OpenAI API on \S+:(\d+)/v1", 60)
        # While the model loads and compiles (seconds), both endpoints say 503.
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "tiny-llama", "prompt": "hi"}
        proc.early = [
            httpx.get(proc.http + "/health", timeout=10),
            httpx.post(proc.http + "/v1/completions", json=body, headers=headers, timeout=10),
        ]
        _wait_healthy(proc)
        yield proc
    finally:
        if proc.proc.poll() is None:
            code = proc.terminate()
            assert code == 0, proc.log()[-3000:]


def _wait_healthy(proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{proc.log()[-3000:]}")
        if httpx.get(proc.http + "/health", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(proc.log()[-3000:])


@pytest.fixture(scope="module")
def reference(plain_model):
    """The notebook API on the same weights and single-device layout as the server."""
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    with jaxllm.LLM.load(
        plain_model, mesh=mesh, max_num_seqs=SLOTS, max_seq_len=CONTEXT, warm_up=False
    ) as llm:
        yield llm


@pytest.fixture(scope="module")
def chat_tokenizer(model_path):
    return Tokenizer.from_dir(model_path)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.http, headers=headers, timeout=60) as c:
        yield c


def _metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
    }


def _wait_idle(http, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(http)
        if m["jaxllm_slots_in_use"] == m["jaxllm_queue_depth"] == m["jaxllm_in_flight"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout} s")
        time.sleep(0.02)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_503_while_loading_then_health_200(server, http):
    early_health, early_completion = server.early
    assert early_health.status_code == 503
    assert _error(early_health)["code"] == "model_loading"
    assert early_completion.status_code == 503
    assert "loading" in _error(early_completion)["message"]
    assert httpx.get(server.http + "/health").status_code == 200
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert models["data"][0]["max_model_len"] == CONTEXT


def test_greedy_completion_equals_llm_generate_and_grpc(server, client, reference):
    prompt = "The quick brown fox"
    got = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, extra_body={"top_k": 0}
    )
    want = reference.generate(prompt, max_tokens=24, temperature=0)
    choice = got.choices[0]
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.system_fingerprint.startswith("fp_") and abs(got.created - time.time()) < 60
    with Client(server.target, token=KEY) as grpc_client:
        grpc = grpc_client.generate(prompt, max_tokens=24, temperature=0.0)
    assert grpc.text == choice.text


# Finite whatever the (random) model prefers: an enum and a bounded integer.
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "n"],
    "additionalProperties": False,
}


def test_structured_output_through_the_openai_client(server, client, reference):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SMALL_SCHEMA}}
    got = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        max_tokens=40,
        temperature=1.0,
        seed=3,
        response_format=fmt,
    )
    value = json.loads(got.choices[0].message.content)
    assert value["color"] in ("red", "green", "blue") and 0 <= value["n"] <= 99
    assert set(value) == {"color", "n"} and got.choices[0].finish_reason == "stop"
    # The same constraint from the notebook API gives the same tokens (greedy).
    spec = StructuredOutput(json_schema=json.dumps(SMALL_SCHEMA))
    want = reference.generate(
        reference.tokenizer.encode("The quick brown fox"),
        max_tokens=30,
        temperature=0,
        structured=spec,
    )
    text = (
        client.completions.create(
            model="tiny-llama",
            prompt="The quick brown fox",
            max_tokens=30,
            temperature=0,
            extra_body={"guided_json": SMALL_SCHEMA},
        )
        .choices[0]
        .text
    )
    assert text == want.text and json.loads(text)["color"] in ("red", "green", "blue")
    regex = r"[0-9]{3}-[a-z]{2}"
    text = (
        client.completions.create(
            model="tiny-llama",
            prompt="id:",
            max_tokens=20,
            temperature=1.0,
            seed=1,
            extra_body={"guided_regex": regex},
        )
        .choices[0]
        .text
    )
    assert re.fullmatch(regex, text)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,
            max_tokens=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "nope"}},
            },
        )
    assert refused.value.body["param"] == "response_format.json_schema.schema"
    with Client(server.target, token=KEY) as grpc_client:
        got = grpc_client.generate(
            "id:", max_tokens=20, temperature=1.0, seed=2, structured={"regex": regex}
        )
        assert re.fullmatch(regex, got.text)
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.generate("id:", max_tokens=5, structured={"regex": "(unclosed"})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.structured.regex" in refused.value.details()


def test_streaming_completion_equals_the_non_streaming_one(client, reference):
    prompt, kw = "def add(a, b):", dict(max_tokens=200, temperature=0)
    stream = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **kw,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = reference.generate(prompt, ignore_eos=True, **kw)
    assert text == want.text
    assert len([c for c in chunks if c.choices]) > 1  # it really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 200
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_async_chat_streaming_and_not(client, server, reference, chat_tokenizer):
    ids = chat_prompt_ids(chat_tokenizer, CHAT)
    want = reference.generate(ids, max_tokens=20, temperature=0, ignore_eos=True)

    async def run():
        async with openai.AsyncOpenAI(
            base_url=server.http + "/v1", api_key=KEY, max_retries=0
        ) as c:
            kw = dict(model="tiny-llama", messages=CHAT, temperature=0)
            kw["extra_body"] = {"ignore_eos": True}
            whole = await c.chat.completions.create(max_completion_tokens=20, **kw)
            stream = await c.chat.completions.create(
                max_tokens=20, stream=True, stream_options={"include_usage": True}, **kw
            )
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 20
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # The chat default: as long as the context allows.
    unbounded = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert unbounded.usage.completion_tokens == CONTEXT - len(ids)


def test_stop_strings_stop_ids_and_max_tokens(client, reference):
    prompt = "jax compiles the"
    full = reference.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True).text
    # Three characters first seen past the start: the text before them is what comes back.
    at = next(i for i in range(1, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[at : at + 3]
    got = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\x00"]
    )
    assert got.choices[0].text == full[:at]
    assert got.choices[0].finish_reason == "stop"
    short = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=3, temperature=0
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    ids = reference.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True).token_ids
    stopped = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        extra_body={"stop_token_ids": [ids[4]]},
    )
    assert stopped.usage.completion_tokens == ids.index(ids[4]) + 1
    assert stopped.choices[0].finish_reason == "stop"


def test_batched_prompts_token_ids_and_echo(client, reference):
    prompts = ["alpha beta", "gamma"]
    got = client.completions.create(
        model="tiny-llama", prompt=prompts, max_tokens=5, temperature=0, echo=True, n=2
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for choice, prompt in zip(got.choices, [p for p in prompts for _ in range(2)], strict=True):
        assert choice.text == prompt + reference.generate(prompt, max_tokens=5, temperature=0).text
    ids = reference.tokenizer.encode("token ids in")
    by_ids = client.completions.create(
        model="tiny-llama", prompt=[ids, ids[:3]], max_tokens=4, temperature=0
    )
    assert by_ids.choices[0].text == reference.generate(ids, max_tokens=4, temperature=0).text
    assert by_ids.usage.prompt_tokens == len(ids) + 3


def test_n_3_with_a_seed_is_reproducible(client, http):
    kw = dict(model="tiny-llama", prompt="Once upon", max_tokens=12, temperature=1.0, seed=7)
    kw["extra_body"] = {"ignore_eos": True}
    first = client.completions.create(n=3, **kw)
    again = client.completions.create(n=3, **kw)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # three samples, not one three times
    assert first.usage.completion_tokens == 36
    assert client.completions.create(n=1, **kw).choices[0].text == texts[0]
    # Streaming, the same choices come back interleaved.
    chunks = list(client.completions.create(n=3, stream=True, **kw))
    streamed = [
        "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)
    ]
    assert streamed == texts
    chat = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, n=3, seed=3, max_tokens=8, temperature=1.0
    )
    assert len(chat.choices) == 3 and [c.index for c in chat.choices] == [0, 1, 2]
    _wait_idle(http)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_logprobs_equal_log_softmax_of_llm_logits(client, reference, chat_tokenizer):
    prompt = "Scores of tokens"
    prompt_ids = reference.tokenizer.encode(prompt)
    kw = dict(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=1.0, seed=11)
    got = client.completions.create(logprobs=5, echo=True, extra_body={"ignore_eos": True}, **kw)
    want = reference.generate(prompt, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    ids = prompt_ids + want.token_ids
    expected = _log_softmax(reference.logits(ids).astype(np.float64))
    lp = got.choices[0].logprobs
    token = reference.tokenizer
    assert lp.tokens == [token.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[: len(prompt_ids) + 1] == [0, *range(len(prompt) + 1)]  # BOS: 0 wide
    assert lp.text_offset == sorted(lp.text_offset)
    for i in range(1, len(ids)):  # prompt and generated tokens alike: row i - 1 predicts i
        np.testing.assert_allclose(lp.token_logprobs[i], expected[i - 1, ids[i]], atol=1e-4)
        top = np.argsort(-expected[i - 1])[:5]
        keys = [token.decode([int(t)], skip_special_tokens=False) for t in top]
        assert set(keys) <= set(lp.top_logprobs[i]), i
        for key, t in zip(keys, top, strict=True):
            if keys.count(key) == 1:  # byte tokens of half a character all read "\ufffd"
                np.testing.assert_allclose(lp.top_logprobs[i][key], expected[i - 1, t], atol=1e-4)
    # Scoring only: echo with max_tokens 0 generates nothing and gives the prompt's logprobs.
    scored = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=0, echo=True, logprobs=1
    )
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    np.testing.assert_allclose(
        scored.choices[0].logprobs.token_logprobs[1:],
        [expected[i - 1, ids[i]] for i in range(1, len(prompt_ids))],
        atol=1e-4,
    )
    # Chat: each token's logprob and the top 3 alternatives, in order.
    chat_ids = chat_prompt_ids(chat_tokenizer, CHAT)
    chat = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=6, temperature=1.0, seed=5,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    sampled = reference.generate(chat_ids, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    rows = _log_softmax(reference.logits(chat_ids + sampled.token_ids).astype(np.float64))
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for j, (entry, t) in enumerate(zip(content, sampled.token_ids, strict=True)):
        row = rows[len(chat_ids) - 1 + j]
        np.testing.assert_allclose(entry.logprob, row[t], atol=1e-4)
        assert entry.token == token.decode([t], skip_special_tokens=False)
        np.testing.assert_allclose(
            [a.logprob for a in entry.top_logprobs], np.sort(row)[::-1][:3], atol=1e-4
        )
    # Under temperature and top-k they are those of the distribution sampled from: the top 4
    # tokens' logits / 0.7, renormalised; the others were never candidates.
    kw = dict(max_tokens=6, temperature=0.7, seed=9, ignore_eos=True)
    filtered = client.completions.create(
        model="tiny-llama", prompt=prompt, logprobs=4,
        extra_body={"top_k": 4, **kw}, **{k: v for k, v in kw.items() if k != "ignore_eos"},
    ).choices[0].logprobs  # fmt: skip
    sampled = reference.generate(prompt, top_k=4, **kw).token_ids
    rows = reference.logits(prompt_ids + sampled).astype(np.float64)[len(prompt_ids) - 1 :]
    for j, t in enumerate(sampled):
        top4 = np.argsort(-rows[j])[:4]
        assert t in top4
        scaled = rows[j][top4] / 0.7
        want = scaled - np.log(np.exp(scaled - scaled.max()).sum()) - scaled.max()
        np.testing.assert_allclose(filtered.token_logprobs[j], want[list(top4).index(t)], atol=1e-4)
        shown = sorted(filtered.top_logprobs[j].values())[::-1]  # ids that read alike share
        np.testing.assert_allclose(shown[0], want.max(), atol=1e-4)
        assert all(np.abs(want - v).min() < 1e-4 for v in shown)


def _bad_requests():
    ok = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
    chat = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 2}
    c, cc = "/v1/completions", "/v1/chat/completions"
    long_text = "x" * 300  # 301 tokens with BOS: over the 255 a prompt may have
    return [
        (c, b"{not json", 400, None),
        (c, b"", 400, None),
        (c, b"[1, 2]", 400, None),
        (c, {**ok, "model": "gpt-4"}, 404, "model"),
        (c, {k: v for k, v in ok.items() if k != "model"}, 400, "model"),
        (c, {k: v for k, v in ok.items() if k != "prompt"}, 400, "prompt"),
        (c, {**ok, "prompt": ""}, 400, "prompt"),
        (c, {**ok, "prompt": []}, 400, "prompt"),
        (c, {**ok, "prompt": 5}, 400, "prompt"),
        (c, {**ok, "prompt": [1, -2]}, 400, "prompt"),
        (c, {**ok, "prompt": [1, 999]}, 400, "prompt"),
        (c, {**ok, "prompt": ["ok", ""]}, 400, "prompt[1]"),
        (c, {**ok, "prompt": long_text}, 400, "prompt"),
        (c, {**ok, "max_tokens": -1}, 400, "max_tokens"),
        (c, {**ok, "max_tokens": "5"}, 400, "max_tokens"),
        (c, {**ok, "max_tokens": 10**30}, 400, "max_tokens"),
        (c, {**ok, "max_tokens": 0}, 400, "max_tokens"),
        (c, {**ok, "prompt": "x" * 200, "max_tokens": 100}, 400, "max_tokens"),
        (c, {**ok, "temperature": -1}, 400, "temperature"),
        (c, {**ok, "temperature": 1e9}, 400, "temperature"),
        (c, b'{"model": "tiny-llama", "prompt": "a", "temperature": NaN}', 400, "temperature"),
        (c, {**ok, "top_p": 0}, 400, "top_p"),
        (c, {**ok, "top_p": 1.5}, 400, "top_p"),
        (c, {**ok, "top_k": -5}, 400, "top_k"),
        (c, {**ok, "min_p": 2}, 400, "min_p"),
        (c, {**ok, "seed": -1}, 400, "seed"),
        (c, {**ok, "seed": 2**64}, 400, "seed"),
        (c, {**ok, "stop": [""]}, 400, "stop"),
        (c, {**ok, "stop": ["s"] * 40}, 400, "stop"),
        (c, {**ok, "stop": 3}, 400, "stop"),
        (c, {**ok, "stop_token_ids": [320]}, 400, "stop_token_ids"),
        (c, {**ok, "n": 0}, 400, "n"),
        (c, {**ok, "n": 9}, 400, "n"),  # more than the server's 8 places
        (c, {**ok, "n": 1000}, 400, "n"),
        (c, {**ok, "logprobs": 21}, 400, "logprobs"),
        (c, {**ok, "logprobs": True}, 400, "logprobs"),
        (c, {**ok, "echo": "yes"}, 400, "echo"),
        (c, {**ok, "stream": 1}, 400, "stream"),
        (c, {**ok, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        (c, {**ok, "stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x"),
        (c, {**ok, "suffix": "end"}, 400, "suffix"),
        (c, {**ok, "best_of": 3}, 400, "best_of"),
        (c, {**ok, "presence_penalty": 0.5}, 400, "presence_penalty"),
        (c, {**ok, "frequency_penalty": -1}, 400, "frequency_penalty"),
        (c, {**ok, "logit_bias": {"5": 10}}, 400, "logit_bias"),
        (c, {**ok, "repetition_penalty": 1.1}, 400, "repetition_penalty"),
        (c, {**ok, "ignore_eos": "true"}, 400, "ignore_eos"),
        (c, {**ok, "user": 5}, 400, "user"),
        (cc, {**chat, "messages": []}, 400, "messages"),
        (cc, {**chat, "messages": "hi"}, 400, "messages"),
        (cc, {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (cc, {**chat, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        (cc, {**chat, "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
        (
            cc,
            {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content",
        ),
        (cc, {**chat, "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),
        (cc, {**chat, "model": "nope"}, 404, "model"),
        (cc, {**chat, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        (cc, {**chat, "max_completion_tokens": 3}, 400, "max_completion_tokens"),
        (cc, {**chat, "top_logprobs": 2}, 400, "top_logprobs"),
        (cc, {**chat, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
        (cc, {**chat, "response_format": {"type": "xml"}}, 400, "response_format.type"),
        (
            cc,
            {**chat, "response_format": {"type": "json_object"}, "guided_regex": "a+"},
            400,
            "guided_regex",
        ),
        (c, {**ok, "guided_grammar": "x" * (64 * 1024 + 1)}, 400, "guided_grammar"),
        (c, {**ok, "speculative": True}, 400, "speculative"),
        (cc, {**chat, "tools": [{"type": "function"}]}, 400, "tools"),
        (cc, {**chat, "echo": True}, 400, "echo"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
        ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ]


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(http, client):
    cases = _bad_requests()
    assert len(cases) >= 30
    before = _metrics(http)['jaxllm_requests_total{outcome="invalid"}']
    for path, body, status, param in cases:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        error = _error(r)
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    assert _metrics(http)['jaxllm_requests_total{outcome="invalid"}'] > before + 20
    # Routes and methods that do not exist answer in the same shape.
    assert _error(http.get("/v1/nothing"))["type"]
    assert http.get("/v1/completions").status_code == 405
    got = client.completions.create(model="tiny-llama", prompt="still fine", max_tokens=3)
    assert got.usage.completion_tokens == 3
    assert http.get("/health").status_code == 200


_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
_json = st.one_of(
    _json_scalars,
    st.lists(_json_scalars, max_size=4),
    st.dictionaries(st.text(max_size=8), _json_scalars, max_size=4),
)
_COMPLETION_FIELDS = {
    "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 319), min_size=1),
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.1, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**40),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "n": st.integers(1, 3),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}  # fmt: skip


@st.composite
def _completion_bodies(draw):
    """Mostly valid bodies with none, one or several fields drawn from any JSON."""
    body = {"model": "tiny-llama", "prompt": "fuzz"}
    for name in draw(st.lists(st.sampled_from(sorted(_COMPLETION_FIELDS)), max_size=5)):
        body[name] = draw(_COMPLETION_FIELDS[name])
    for name in draw(st.lists(st.sampled_from(["model", *_COMPLETION_FIELDS, "x"]), max_size=2)):
        body[name] = draw(_json)
    return body


def test_fuzzed_bodies_get_200_or_a_4xx_and_never_a_5xx(http):
    seen = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(_completion_bodies())
    def check(body):
        r = http.post("/v1/completions", json=body)
        seen.add(r.status_code)
        assert r.status_code in (200, 400, 404, 429), (body, r.text)
        if r.status_code != 200:
            _error(r)
        elif body.get("stream") is True:
            assert r.text.endswith("data: [DONE]\n\n"), r.text
        else:
            assert r.json()["choices"]

    check()
    assert {200, 400} <= seen
    _wait_idle(http)


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="x", temperature=-3)
    assert e.value.body["param"] == "temperature"


def test_401_without_or_with_a_wrong_key(server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            r = httpx.request(method, server.http + path, headers=headers, json={})
            assert r.status_code == 401, (headers, path)
            assert _error(r)["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.http + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Probes and scrapers need no key.
    assert httpx.get(server.http + "/health").status_code == 200
    assert "jaxllm_http_responses_total" in httpx.get(server.http + "/metrics").text


async def _fill_then_one_more(base: str):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = dict(model="tiny-llama", max_tokens=200, ignore_eos=True, stream=True)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:
        streams = []
        try:
            for i in range(SLOTS + QUEUE):
                request = c.build_request(
                    "POST", "/v1/completions", json={**body, "prompt": f"{i}"}
                )
                response = await c.send(request, stream=True)
                assert response.status_code == 200
                streams.append(response)
            refused = await c.post("/v1/completions", json={**body, "prompt": "one more"})
            refused_n = await c.post("/v1/completions", json={**body, "prompt": "x", "n": 2})
        finally:
            for response in streams:
                await response.aclose()
    return refused, refused_n


def test_429_when_admission_is_full(server, http):
    refused, refused_n = asyncio.run(_fill_then_one_more(server.http))
    assert refused.status_code == 429 and refused_n.status_code == 429
    error = _error(refused)
    assert error["code"] == "rate_limit_exceeded" and "capacity" in error["message"]
    _wait_idle(http)


async def _hang_up_beside_a_witness(base: str, http) -> tuple[int, float]:
    """Streams A and a witness W (the same length, W a little later, so they advance in the
    same steps), hangs A up after its first chunk, and returns how many tokens W had when A's
    slot was freed, and the slots then in use."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = dict(model="tiny-llama", max_tokens=240, ignore_eos=True, stream=True, logprobs=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:

        async def open_stream(prompt):
            request = c.build_request("POST", "/v1/completions", json={**body, "prompt": prompt})
            response = await c.send(request, stream=True)
            return response, response.aiter_lines()

        a, a_lines = await open_stream("stream A")
        assert (await anext(a_lines)).startswith("data: ")
        w, w_lines = await open_stream("witness")
        w_tokens = [0]

        async def read_witness():
            async for line in w_lines:
                if line.startswith("data: {"):
                    w_tokens[0] += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])

        reader = asyncio.ensure_future(read_witness())
        while w_tokens[0] == 0:
            await asyncio.sleep(0.002)
        await a.aclose()  # hang up A
        while (slots := _metrics(http)["jaxllm_slots_in_use"]) > 1:
            await asyncio.sleep(0.002)
        seen = w_tokens[0]
        await reader
        await w.aclose()
        assert w_tokens[0] == 240
    return seen, slots


def test_a_disconnect_mid_stream_frees_the_request_at_once(server, http):
    before = _metrics(http)
    seen, slots = asyncio.run(_hang_up_beside_a_witness(server.http, http))
    # A was freed while the witness, which runs in the same steps, was far from its end: had
    # A run on to its 240 tokens, W would have had as many.
    assert slots == 1 and seen < 120, (slots, seen)
    after = _wait_idle(http)
    cancelled = 'jaxllm_requests_total{outcome="cancelled"}'
    assert after[cancelled] == before[cancelled] + 1


async def _hang_up_while_queued(base: str, http) -> None:
    """Fills every slot, sends one more request (it waits in the queue) and hangs it up, then
    reads the streams to their end."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = dict(model="tiny-llama", max_tokens=250, ignore_eos=True)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:
        streams = []
        for i in range(SLOTS):
            request = c.build_request(
                "POST", "/v1/completions", json={**body, "prompt": f"{i}", "stream": True}
            )
            streams.append(await c.send(request, stream=True))
        while _metrics(http)["jaxllm_slots_in_use"] < SLOTS:
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(c.post("/v1/completions", json={**body, "prompt": "q"}))
        while _metrics(http)["jaxllm_in_flight"] < SLOTS + 1:  # admitted and submitted
            await asyncio.sleep(0.005)
        waiting.cancel()  # closes its connection: a non-streaming client giving up
        for response in streams:
            assert (await response.aread()).endswith(b"data: [DONE]\n\n")


def test_a_non_streaming_client_that_hangs_up_is_cancelled(server, http):
    before = _metrics(http)
    asyncio.run(_hang_up_while_queued(server.http, http))
    after = _wait_idle(http)
    # The streams ran to their end; the request that was given up never did (it would have,
    # with nobody to read it, once a slot freed).
    ok, cancelled = (
        'jaxllm_requests_total{outcome="ok"}',
        'jaxllm_requests_total{outcome="cancelled"}',
    )
    assert after[ok] == before[ok] + SLOTS
    assert after[cancelled] == before[cancelled] + 1


def test_tokenize_and_detokenize(http, reference, chat_tokenizer):
    text = "tokens, please"
    got = http.post("/tokenize", json={"model": "tiny-llama", "prompt": text}).json()
    assert got["tokens"] == reference.tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == CONTEXT
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == reference.tokenizer.encode(text, add_special_tokens=False)
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == chat_prompt_ids(chat_tokenizer, CHAT)
    back = http.post("/detokenize", json={"tokens": got["tokens"]}).json()
    assert back == {"prompt": text}


def test_metrics_count_http_responses(http, client):
    before = _metrics(http)
    client.completions.create(model="tiny-llama", prompt="count me", max_tokens=2)
    after = _metrics(http)
    key = 'jaxllm_http_responses_total{route="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    ok = 'jaxllm_requests_total{outcome="ok"}'
    assert after[ok] == before[ok] + 1
    assert after["jaxllm_time_to_first_token_seconds_count"] > 0


@contextlib.contextmanager
def _front_end(llm):
    """An HttpFrontEnd in this process on ``llm``, on a real localhost port, in a thread of
    its own (as serve.server runs it, without the gRPC half)."""
    front = HttpFrontEnd(ServeConfig(), Metrics(), token=None)
    started, loop = threading.Event(), asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main():
        await front.start("127.0.0.1", 0)
        front.attach(llm, Admission(SLOTS, QUEUE))
        started.set()
        await stop.wait()
        await front.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield f"http://127.0.0.1:{front.port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_a_model_without_a_chat_template_gets_a_clear_400(reference):
    with _front_end(reference) as base:
        r = httpx.post(
            base + "/v1/chat/completions", json={"model": reference.name, "messages": CHAT}
        )
    assert r.status_code == 400
    error = _error(r)
    assert error["param"] == "messages" and "no chat template" in error["message"]


def test_an_engine_failure_ends_streams_with_an_error_and_answers_503(plain_model):
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    llm = jaxllm.LLM.load(plain_model, mesh=mesh, max_num_seqs=2, max_seq_len=64, warm_up=False)
    body = dict(model=llm.name, prompt="x", max_tokens=60, ignore_eos=True)
    try:
        with _front_end(llm) as base, httpx.Client(base_url=base, timeout=60) as c:
            assert c.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                lines = response.iter_lines()
                assert next(x for x in lines if x.startswith("data: "))
                # A real failure inside the running engine: its weights lose an array, so the
                # next step raises in the engine thread (as a device error would).
                llm.engine.runner.params = llm.engine.runner.params[:-1]
                events = [x for x in lines if x.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2][6:])["error"]
            assert error["code"] == "engine_failed" and "engine failed" in error["message"]
            after = c.post("/v1/completions", json=body)
            assert after.status_code == 503 and _error(after)["code"] == "engine_failed"
            assert c.get("/health").status_code == 503
    finally:
        llm.close()


def test_sigterm_drains_http_streams_and_refuses_new_requests(server, http):
    """Last: it stops the module's server."""
    body = dict(model="tiny-llama", prompt="drain", max_tokens=150, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(x for x in lines if x.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:
                refused = c.post("/v1/completions", json={**body, "stream": False})
                if refused.status_code == 503 or time.monotonic() > deadline:
                    break
            assert refused.status_code == 503 and _error(refused)["code"] == "draining"
            assert httpx.get(server.http + "/health").status_code == 503
            rest = [x for x in lines if x.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
    assert finishes[-1] == "length"
    assert server.wait() == 0
