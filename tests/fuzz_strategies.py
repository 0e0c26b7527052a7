"""Hypothesis strategies for every public entry point, shared by the fuzz tests and
``scripts/fuzz.py`` (its long profile sets ``JAXLLM_FUZZ_EXAMPLES``).

Most drawn inputs are hostile (wrong types, NaN and infinities, integers far out of range,
thousands of stop strings, token ids outside the vocabulary) or, when valid, ask for one or
two tokens: the fast profile must stay cheap while still reaching the engine.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from serve.proto import jaxllm_pb2 as pb

EXAMPLES = int(os.environ.get("JAXLLM_FUZZ_EXAMPLES", "500"))
VOCAB = 320  # the test model's (tests/hf_models.py, byte-level tokenizer)


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
FLOAT32 = st.floats(width=32)  # NaN and the infinities included
TEXT = st.text(max_size=40) | st.text(st.characters(codec="utf-8"), max_size=4)
SMALL_TEXT = st.text(min_size=1, max_size=6)
# Thousands of stop strings, or a few very long ones, without drawing each one apiece.
MANY_STRINGS = st.integers(0, 5000).map(lambda k: ["x"] * k)
LONG_STRINGS = st.integers(1, 5000).map(lambda k: ["y" * k])


@st.composite
def sampling_params(draw, wild: frozenset[str]) -> pb.SamplingParams:
    """SamplingParams with the fields named in ``wild`` drawn from anything their type can
    carry, the others from small valid values (max_tokens 0-2)."""

    def pick(name, valid, hostile):
        return draw(hostile if name in wild else valid)

    s = pb.SamplingParams(
        max_tokens=pick("max_tokens", st.integers(1, 2), INT32),
        top_k=pick("top_k", st.integers(0, 50), INT32),
        min_p=pick("min_p", st.floats(0, 1, width=32), FLOAT32),
        stop=pick(
            "stop", st.lists(SMALL_TEXT, max_size=2), st.lists(TEXT) | MANY_STRINGS | LONG_STRINGS
        ),
        stop_token_ids=pick(
            "stop_token_ids",
            st.lists(st.integers(0, VOCAB - 1), max_size=2),
            st.lists(INT32, max_size=80) | st.integers(0, 3000).map(lambda k: [1] * k),
        ),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
        num_logprobs=pick("num_logprobs", st.integers(0, 3), INT32),
        prompt_logprobs=pick("prompt_logprobs", st.just(False), st.booleans()),
        num_prompt_logprobs=pick("num_prompt_logprobs", st.just(0), INT32),
    )
    for name, valid, hostile in (
        ("temperature", st.floats(0, 2, width=32), FLOAT32),
        ("top_p", st.floats(0.125, 1, width=32), FLOAT32),
        ("seed", st.integers(0, 2**32), UINT64),
        ("speculative", st.just(False), st.booleans()),
    ):
        if draw(st.booleans()):
            value = pick(name, valid, hostile)
            setattr(s, name, value)
    if "structured" in wild:
        kind = draw(st.sampled_from(["json_schema", "json_object", "regex", "grammar", None]))
        if kind == "json_object":
            s.structured.json_object = draw(st.booleans())
        elif kind is not None:
            text = draw(
                TEXT
                | st.sampled_from(['{"type": "integer"}', "[0-9]{1,2}", 'root ::= "a"', "{", "("])
            )
            setattr(s.structured, kind, text)
        else:
            s.structured.SetInParent()
    return s


GENERATE_FIELDS = (
    "max_tokens", "top_k", "min_p", "stop", "stop_token_ids", "num_logprobs", "prompt_logprobs",
    "num_prompt_logprobs", "temperature", "top_p", "seed", "speculative", "structured",
    "prompt", "token_ids", "messages", "request_id", "n",
)  # fmt: skip


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Valid requests, requests with one hostile field, and requests with many."""
    mode = draw(st.sampled_from(["valid", "one", "one", "one", "many"]))
    if mode == "valid":
        wild = frozenset()
    elif mode == "one":
        wild = frozenset([draw(st.sampled_from(GENERATE_FIELDS))])
    else:
        wild = frozenset(draw(st.lists(st.sampled_from(GENERATE_FIELDS), min_size=2)))
    request = pb.GenerateRequest(sampling=draw(sampling_params(wild)))
    prompt_kind = draw(st.sampled_from(["prompt", "token_ids", "messages"]))
    if prompt_kind == "prompt" or "prompt" in wild:
        request.prompt = draw(TEXT | st.integers(0, 200_000).map("z".__mul__) if "prompt" in wild
                              else SMALL_TEXT)  # fmt: skip
    if prompt_kind == "token_ids" or "token_ids" in wild:
        ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
        if "token_ids" in wild:
            ids = st.lists(INT32, max_size=50) | st.integers(0, 5000).map(lambda k: [7] * k)
        request.token_ids.extend(draw(ids))
    if prompt_kind == "messages" or "messages" in wild:
        role = st.sampled_from(["system", "user", "assistant"])
        if "messages" in wild:
            role = role | TEXT
        for r, c in draw(st.lists(st.tuples(role, TEXT), min_size=1, max_size=4)):
            request.messages.add(role=r, content=c)
    request.request_id = draw(TEXT | st.integers(0, 1000).map("r".__mul__) if "request_id" in wild
                              else st.just(""))  # fmt: skip
    request.n = draw(INT32 if "n" in wild else st.integers(0, 2))
    return request


# JSON of any shape, for the HTTP bodies' fields.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), TEXT,
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
COMPLETION_FIELDS = {
    "prompt": SMALL_TEXT | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4),
    "max_tokens": st.integers(0, 2),
    "max_completion_tokens": st.integers(1, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.1, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**40),
    "stop": SMALL_TEXT | st.lists(SMALL_TEXT, max_size=3) | MANY_STRINGS | LONG_STRINGS,
    "stop_token_ids": st.lists(st.integers(-5, VOCAB + 5), max_size=3),
    "n": st.integers(0, 20),
    "best_of": st.integers(0, 3),
    "logprobs": st.integers(-1, 30) | st.booleans(),
    "top_logprobs": st.integers(-1, 30),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}) | JSON,
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=2),
    "response_format": st.sampled_from(
        [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "x"}]
    ) | JSON,
    "user": TEXT,
    "suffix": TEXT,
    "speculative": st.booleans(),
}  # fmt: skip


@st.composite
def http_bodies(draw, chat: bool) -> bytes:
    """Request bodies: mostly JSON objects with a few fields valid and some from any JSON;
    sometimes not JSON at all or not an object."""
    shape = draw(st.sampled_from(["object"] * 8 + ["not_json", "not_object"]))
    if shape == "not_json":
        return draw(st.binary(max_size=60))
    if shape == "not_object":
        return draw(JSON).__repr__().encode()
    body: dict = {"model": "m"}
    if chat:
        role = st.sampled_from(["system", "user", "assistant"])
        body["messages"] = [
            {"role": r, "content": c}
            for r, c in draw(st.lists(st.tuples(role, SMALL_TEXT), min_size=1, max_size=3))
        ]
    else:
        body["prompt"] = draw(COMPLETION_FIELDS["prompt"])
    body["max_tokens"] = draw(st.integers(1, 2))
    names = sorted(COMPLETION_FIELDS)
    for name in draw(st.lists(st.sampled_from(names), max_size=4)):
        body[name] = draw(COMPLETION_FIELDS[name])
    for name in draw(st.lists(st.sampled_from(["model", "messages", *names, "x"]), max_size=2)):
        body[name] = draw(JSON)
    if chat:
        body.pop("prompt", None)
    return json.dumps(body).encode()
