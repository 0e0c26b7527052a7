"""Structured output and per-request speculation as the front ends take them: every HTTP
spelling and the gRPC field become ``SamplingParams.structured`` / ``.speculative``, and bad
input is refused naming the field, before any engine work. (Whether the engine enforces a
constraint is the engine's tests' business.)"""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from jaxllm.engine_config import EngineConfig
from jaxllm.structured import StructuredOutput
from serve import cli, validation
from serve import openai_protocol as oa
from serve.client import generate_request, structured
from serve.config import ServeConfig
from serve.metrics import Metrics, Speculation
from serve.proto import jaxllm_pb2 as pb

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}
SCHEMA_TEXT = json.dumps(SCHEMA)
LIMIT = ServeConfig().max_structured_chars
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 4}


def _limits(speculative: str | None = None) -> oa.Limits:
    config = ServeConfig()
    return oa.Limits(
        context=256,
        vocab=320,
        default_max_tokens=16,
        max_stop_strings=config.max_stop_strings,
        max_stop_string_chars=config.max_stop_string_chars,
        max_stop_token_ids=config.max_stop_token_ids,
        max_structured_chars=config.max_structured_chars,
        speculative=speculative,
    )


def _http_params(fields: dict, chat: bool = True, speculative: str | None = None):
    model = oa.ChatCompletionRequest if chat else oa.CompletionRequest
    body = json.dumps({**(CHAT if chat else COMPLETION), **fields}).encode()
    return oa.sampling_params(oa.parse(model, body), _limits(speculative), 3)[0]


def _http_refusal(fields: dict, chat: bool = True) -> oa.BadRequest:
    with pytest.raises(oa.BadRequest) as e:
        _http_params(fields, chat)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize(
    "fields, want",
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutput(json_schema=SCHEMA_TEXT),
        ),
        ({"guided_json": SCHEMA}, StructuredOutput(json_schema=SCHEMA_TEXT)),
        ({"guided_json": SCHEMA_TEXT}, StructuredOutput(json_schema=SCHEMA_TEXT)),
        ({"guided_regex": "[a-z]+"}, StructuredOutput(regex="[a-z]+")),
        ({"guided_grammar": 'start: "a"+'}, StructuredOutput(grammar='start: "a"+')),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput(json_schema=SCHEMA_TEXT)),
        ({"structured_outputs": {"json": SCHEMA_TEXT}}, StructuredOutput(json_schema=SCHEMA_TEXT)),
        ({"structured_outputs": {"regex": "x"}}, StructuredOutput(regex="x")),
        ({"structured_outputs": {"grammar": "g"}}, StructuredOutput(grammar="g")),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput(json_object=True)),
    ],
)
def test_every_http_spelling_maps_onto_structured(fields, want, chat):
    assert _http_params(fields, chat).structured == want


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
        ({"guided_regex": "a", "guided_grammar": "g"}, "guided_grammar"),
        (
            {"guided_regex": "a", "structured_outputs": {"json_object": True}},
            "structured_outputs.json_object",
        ),
        ({"structured_outputs": {"regex": "a", "json": SCHEMA}}, "structured_outputs.regex"),
    ],
)
def test_two_constraints_are_a_400_naming_both(fields, param):
    error = _http_refusal(fields)
    assert error.param == param
    assert "at most one" in str(error)
    names = [f.split(".")[0] for f in fields]
    assert all(name in str(error) for name in names)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {
                "response_format": {
                    "type": "json_object",
                    "json_schema": {"name": "a", "schema": {}},
                }
            },
            "response_format.json_schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_json": [1, 2]}, "guided_json"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": "3"}}, "structured_outputs.json"),
        ({"speculative": "yes"}, "speculative"),
    ],
)
def test_malformed_constraints_name_the_field(fields, param):
    assert _http_refusal(fields).param == param


def test_constraint_text_is_limited_in_every_spelling():
    regex = "a" * LIMIT
    assert _http_params({"guided_regex": regex}).structured.regex == regex
    big_schema = {"description": "x" * LIMIT}
    for fields, param in [
        ({"guided_regex": regex + "a"}, "guided_regex"),
        ({"structured_outputs": {"grammar": regex + "a"}}, "structured_outputs.grammar"),
        ({"guided_json": big_schema}, "guided_json"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": big_schema},
                }
            },
            "response_format.json_schema.schema",
        ),
    ]:
        error = _http_refusal(fields, chat=False)
        assert error.param == param and f"max_structured_chars ({LIMIT})" in str(error)


def test_http_speculative_maps_and_needs_a_speculating_server():
    assert _http_params({}, speculative="ngram").speculative is None
    assert _http_params({"speculative": False}).speculative is False
    assert _http_params({"speculative": True}, speculative="ngram").speculative is True
    error = _http_refusal({"speculative": True})
    assert error.param == "speculative" and "--speculative" in str(error)


def _grpc_params(engine: EngineConfig | None = None, **sampling):
    s = pb.SamplingParams(max_tokens=4, **sampling)
    return validation.sampling_params(s, engine or EngineConfig(), 320, ServeConfig())


@pytest.mark.parametrize(
    "given, want",
    [
        (pb.StructuredOutput(json_schema=SCHEMA_TEXT), StructuredOutput(json_schema=SCHEMA_TEXT)),
        (pb.StructuredOutput(json_object=True), StructuredOutput(json_object=True)),
        (pb.StructuredOutput(regex="[0-9]+"), StructuredOutput(regex="[0-9]+")),
        (pb.StructuredOutput(grammar="start: x"), StructuredOutput(grammar="start: x")),
    ],
)
def test_grpc_structured_maps_onto_sampling_params(given, want):
    assert _grpc_params(structured=given).structured == want
    assert _grpc_params().structured is None


@pytest.mark.parametrize(
    "given, field, message",
    [
        (pb.StructuredOutput(), "sampling.structured", "set one of"),
        (pb.StructuredOutput(json_object=False), "sampling.structured.json_object", "true"),
        (pb.StructuredOutput(json_schema="{"), "sampling.structured.json_schema", "JSON"),
        (pb.StructuredOutput(json_schema="[]"), "sampling.structured.json_schema", "object"),
        (
            pb.StructuredOutput(regex="a" * (LIMIT + 1)),
            "sampling.structured.regex",
            f"max_structured_chars ({LIMIT})",
        ),
        (
            pb.StructuredOutput(grammar="a" * (LIMIT + 1)),
            "sampling.structured.grammar",
            "max_structured_chars",
        ),
    ],
)
def test_grpc_bad_structured_is_invalid_argument_naming_the_field(given, field, message):
    with pytest.raises(validation.InvalidRequest) as e:
        _grpc_params(structured=given)
    assert e.value.field == field and message in str(e.value)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_grpc_speculative_maps_and_needs_a_speculating_server():
    ngram = EngineConfig(speculative="ngram")
    assert _grpc_params(ngram).speculative is None
    assert _grpc_params(speculative=False).speculative is False
    assert _grpc_params(ngram, speculative=True).speculative is True
    with pytest.raises(validation.InvalidRequest) as e:
        _grpc_params(speculative=True)
    assert e.value.field == "sampling.speculative"


def test_the_client_builds_the_structured_field():
    request = generate_request("x", structured={"json_schema": SCHEMA}, speculative=False)
    assert json.loads(request.sampling.structured.json_schema) == SCHEMA
    params = validation.sampling_params(request.sampling, EngineConfig(), 320, ServeConfig())
    assert params.structured == StructuredOutput(json_schema=json.dumps(SCHEMA))
    assert params.speculative is False
    assert generate_request("x", structured=structured(regex="a")).sampling.structured.regex == "a"
    with pytest.raises(ValueError, match="one of"):
        structured(regex="a", grammar="b")


def test_speculative_flags_and_yaml_reach_the_engine_config(tmp_path):
    parse = cli.build_parser().parse_args
    args = ["serve", "--speculative", "draft", "--draft-model", "/ckpt", "--num-speculative-tokens"]
    engine = cli.serve_config(parse([*args, "7"])).engine_config
    assert (engine.speculative, engine.draft_model, engine.num_speculative_tokens) == (
        "draft",
        "/ckpt",
        7,
    )
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  speculative: ngram\n  num_speculative_tokens: 2\n")
    engine = cli.serve_config(parse(["serve", "--config", str(path)])).engine_config
    assert (engine.speculative, engine.num_speculative_tokens) == ("ngram", 2)
    with pytest.raises(ValueError, match="draft_model"):
        cli.serve_config(parse(["serve", "--speculative", "draft"]))
    # A draft model's steps are not mirrored to other processes: refused before start.
    several = ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"]
    with pytest.raises(ValueError, match="one process only"):
        cli.serve_config(parse([*args, "3", *several]))
    assert cli.serve_config(parse(["serve", "--speculative", "ngram", *several])).engine


def _scrape(stats: dict) -> dict[str, float]:
    metrics = Metrics()
    metrics.registry.register(Speculation(lambda: stats))
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {k: float(v) for k, v in (x.split() for x in lines if x.startswith("jaxllm_spec_"))}


def test_speculation_metrics_read_the_engine_stats():
    names = ("draft_tokens", "accepted_tokens", "acceptance_rate", "tokens_per_step")
    stats = dict(zip([f"spec_{n}" for n in names], [40, 30, 0.75, 3.5], strict=True))
    assert _scrape(stats) == {
        "jaxllm_spec_draft_tokens_total": 40,
        "jaxllm_spec_accepted_tokens_total": 30,
        "jaxllm_spec_acceptance_rate": 0.75,
        "jaxllm_spec_tokens_per_step": 3.5,
    }
    assert set(_scrape({}).values()) == {0.0}  # an engine that does not speculate
