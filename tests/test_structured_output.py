"""Structured output through the engine, on the demo model: 200 sampled generations at
temperature 1.0 per JSON Schema all parse and validate; regexes hold; unconstrained requests
batched with constrained ones get the tokens they get alone; a schema the engine cannot
compile is refused before any work."""

import json
import re

import pytest
from test_structured import SCHEMAS, _check

import jaxllm
from jaxllm.sampling import SamplingParams
from jaxllm.structured import StructuredOutput

SAMPLES = 200


@pytest.fixture(scope="module")
def llm():
    # Compiles lazily: a test hits a few of the step shapes, not all of them.
    with jaxllm.LLM.load(None, max_num_seqs=32, max_seq_len=256, warm_up=False) as llm:
        yield llm


def generate(llm, prompt: str, params: list[SamplingParams]) -> list:
    ids = llm.tokenizer.encode(prompt)
    requests = [llm.engine.submit(ids, p) for p in params]
    return [r.wait(300) for r in requests]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_always_parses_and_validates(llm, name):
    schema = SCHEMAS[name]["schema"]
    spec = StructuredOutput(json_schema=json.dumps(schema))
    params = [
        SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured=spec)
        for i in range(SAMPLES)
    ]
    outputs = generate(llm, "record = ", params)
    for out in outputs:
        assert out.finish_reason == "stop", out.text  # the grammar ended it, within 200 tokens
        _check(json.loads(out.text), schema)
    assert len({out.text for out in outputs}) > 20  # sampled, not one answer


def test_regexes_hold_and_json_object_is_an_object(llm):
    regexes = [r"\d{4}-\d{2}-\d{2}", r"[a-z_][a-z0-9_]{0,15}", r"\(\d{3}\) \d{3}-\d{4}"]
    for regex in regexes:
        spec = StructuredOutput(regex=regex)
        params = [
            SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured=spec)
            for i in range(20)
        ]
        for out in generate(llm, "value = ", params):
            assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text
    spec = StructuredOutput(json_object=True)
    params = [
        SamplingParams(max_tokens=120, temperature=0.7, seed=i, structured=spec) for i in range(8)
    ]
    outputs = generate(llm, "config = ", params)
    finished = [out for out in outputs if out.finish_reason == "stop"]
    # Any object may be long: some run out of tokens inside it (finish_reason "length").
    assert finished
    for out in finished:
        assert isinstance(json.loads(out.text), dict)


def test_free_requests_are_unchanged_by_constrained_neighbours(llm):
    free = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=6, ignore_eos=True),
    ]
    alone = [out.token_ids for out in generate(llm, "def parse(text):", free)]
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS["order"]["schema"]))
    constrained = [
        SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured=spec) for i in range(6)
    ]
    mixed = generate(llm, "def parse(text):", constrained[:3] + free + constrained[3:])
    assert [out.token_ids for out in mixed[3:6]] == alone
    for out in mixed[:3] + mixed[6:]:
        json.loads(out.text)


def test_a_schema_it_cannot_compile_is_refused_before_any_work(llm):
    steps = llm.engine.steps
    for bad in ('{"type": "nope"}', '{"type": "object", "properties": 3}'):
        with pytest.raises(ValueError, match="json_schema"):
            llm.engine.submit([5, 6], SamplingParams(structured=StructuredOutput(json_schema=bad)))
    with pytest.raises(ValueError, match="regex"):
        llm.engine.submit([5, 6], SamplingParams(structured=StructuredOutput(regex="(unclosed")))
    assert llm.engine.steps == steps and llm.engine.queue_depth == 0
