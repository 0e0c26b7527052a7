"""The OpenAI-compatible request and response bodies (pydantic), and how a request's fields
become engine inputs.

Every field OpenAI's API defines for ``/v1/completions`` and ``/v1/chat/completions`` is either
honoured or refused with a 400 naming it; a field neither API nor this server knows is refused
too (``extra="forbid"``), so a typo never silently does nothing. Types are strict: ``"5"`` is not
a number and ``1`` is not a boolean, as in OpenAI's own API.

Honoured: ``model``, ``prompt`` (a string, a list of strings, token ids, a list of token-id
lists), ``messages`` (system/developer, user, assistant; text content only), ``max_tokens``,
``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k`` (0 or -1 = off), ``min_p``,
``seed``, ``stop``, ``stop_token_ids``, ``n`` (prompts x n <= the server's capacity),
``logprobs`` / ``top_logprobs`` (0..20), ``echo``, ``stream``, ``stream_options.include_usage``,
``ignore_eos``, ``user`` (accepted and logged; it changes nothing). Accepted only at their
neutral value (anything else is a 400): ``presence_penalty`` / ``frequency_penalty`` (0),
``logit_bias`` (empty), ``best_of`` (= n), ``suffix`` (null), ``tools`` (empty) and
``tool_choice`` (``"none"``). Messages take ``role`` and ``content`` only (no ``name``, tool
calls or images); ``developer`` is rendered as ``system``.

Structured output, on both endpoints, at most one constraint per request (two are a 400 naming
them), each text at most ``ServeConfig.max_structured_chars``: OpenAI's ``response_format``
(``{"type": "text"}`` = free, ``{"type": "json_object"}``, ``{"type": "json_schema",
"json_schema": {"name", "schema", "description", "strict"}}``: the output always matches the
schema, whatever ``strict`` says), and vLLM's extensions ``guided_json`` (a schema object or
its JSON text), ``guided_regex``, ``guided_grammar`` (Lark) and ``structured_outputs``
(``{"json" | "regex" | "grammar" | "json_object": true}``). The extension ``speculative``
(bool) turns speculative decoding off (false) or on (true: the server must have been started
with a speculative method) for one request; left out, the server's setting holds.

Defaults: ``max_tokens`` is ``ServeConfig.default_max_tokens`` for completions (OpenAI: 16)
and the rest of the context for chat (as OpenAI's chat API); ``temperature`` and ``top_p``
are 1. ``echo`` with ``max_tokens: 0`` scores a prompt (with ``logprobs``: its logprobs) and
generates nothing. Logprobs are those of the distribution each token was sampled from (after
temperature, top-k, top-p and min-p; see ``jaxllm.sampling``); at temperature 0 (greedy),
those of the model's own distribution.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxllm import structured
from jaxllm.sampling import SamplingParams
from jaxllm.structured import StructuredOutput

MAX_LOGPROBS = 20
MAX_N = 128

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class BadRequest(Exception):
    """A 400 (or another client error) that names the field at fault, in OpenAI's shape."""

    def __init__(
        self,
        param: str | None,
        message: str,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status, self.code, self.type = param, status, code, type


class _Body(BaseModel):
    model_config = _STRICT


class StreamOptions(_Body):
    include_usage: bool = False
    # vLLM's extension; refused rather than ignored.
    continuous_usage_stats: Literal[False] = False


NonNegInt = Annotated[int, Field(ge=0)]
TokenIds = list[NonNegInt]
# A JSON Schema as an object, or (vLLM's guided_json) its JSON text.
Schema = str | dict[str, Any]


class JsonSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: one of these."""

    json_: Schema | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions.
    guided_json: Schema | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    speculative: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds


# -- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- parsing --------------------------------------------------------------------------------

# What a union-typed field takes, for a message better than pydantic's per-member errors.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
    "guided_json": "a JSON Schema: an object or its JSON text",
    "json": "a JSON Schema: an object or its JSON text",
}
_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
_MODELS += (ChatMessage, TextPart, StreamOptions, ResponseFormat, JsonSchemaFormat)
_MODELS += (StructuredOutputs,)
# As a body spells them (errors name fields by their aliases).
_FIELD_NAMES = {f.alias or name for m in _MODELS for name, f in m.model_fields.items()}


def parse(model: type[_Body], body: bytes) -> Any:
    """Validates a JSON body into ``model``; raises BadRequest naming the first bad field."""
    if not body.strip():
        raise BadRequest(None, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _bad_request(e) from None


def _bad_request(error: ValidationError) -> BadRequest:
    first = error.errors(include_url=False)[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return BadRequest(None, f"the body is not valid JSON ({first['ctx']['error']})")
    if kind == "model_type" and not loc:
        return BadRequest(None, "the body must be a JSON object")
    if kind == "extra_forbidden":
        path = _path(loc, keep_all=True)
        return BadRequest(path, "unsupported field: this server does not know or support it")
    path = _path(loc)
    last = next((p for p in reversed(loc) if isinstance(p, str) and p in _FIELD_NAMES), None)
    # A union's members each report an error (at the field or inside it).
    union_errors = [e for e in error.errors(include_url=False) if _path(e["loc"]).startswith(path)]
    if last in _EXPECTED and len(union_errors) > 1:
        return BadRequest(path, f"must be {_EXPECTED[last]}")
    return BadRequest(path, first["msg"][0].lower() + first["msg"][1:])


def _path(loc: tuple, keep_all: bool = False) -> str:
    """``("messages", 0, "list[TextPart]", 1, "text")`` -> ``messages[0].content``-style
    paths: union member tags (type names) are dropped."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif keep_all and i == len(loc) - 1 or part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out


# -- request fields -> engine inputs --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the served engine allows (from its config) and the server's own caps."""

    context: int  # max_seq_len: prompt + output tokens
    vocab: int
    default_max_tokens: int  # completions without max_tokens (OpenAI: 16)
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_structured_chars: int  # a JSON Schema, regex or grammar text
    speculative: str | None  # the engine's speculative method; None = off


def refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Fields OpenAI defines that this server serves only at their neutral value."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value:  # None or 0
            raise BadRequest(name, f"only 0 is supported (got {value}); penalties are not")
    if req.logit_bias:
        raise BadRequest("logit_bias", "not supported; send {} or leave it out")
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options", "only allowed when stream is true")
    if isinstance(req, CompletionRequest):
        if req.suffix is not None:
            raise BadRequest("suffix", "not supported (no fill-in-the-middle)")
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequest("best_of", f"only best_of == n ({req.n}) is supported")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs", "needs logprobs: true")


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, limits: Limits, prompt_len: int
) -> tuple[SamplingParams, bool]:
    """The engine's SamplingParams for one prompt of ``prompt_len`` tokens, and whether only
    the prompt is wanted back (echo with max_tokens 0: the one generated token is dropped)."""
    refuse_unsupported(req)
    field, max_tokens = "max_tokens", req.max_tokens
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != req.max_completion_tokens:
                raise BadRequest(
                    "max_completion_tokens", "differs from max_tokens; give one of them"
                )
            field, max_tokens = "max_completion_tokens", req.max_completion_tokens
        # OpenAI's chat default: as long as the context allows.
        default = limits.context - prompt_len
    else:
        default = min(limits.default_max_tokens, limits.context - prompt_len)
    echo_only = False
    if max_tokens == 0:
        if isinstance(req, CompletionRequest) and req.echo:
            # Scoring a prompt (echo + logprobs, max_tokens 0): one token is computed and
            # dropped, since the engine always generates at least one.
            echo_only, max_tokens = True, 1
        else:
            raise BadRequest(field, "must be >= 1 (0 only with echo)")
    if max_tokens is None:
        max_tokens = max(default, 1)
    if prompt_len + max_tokens > limits.context:
        raise BadRequest(
            field,
            f"this model's context is {limits.context} tokens; the prompt has {prompt_len} "
            f"and {field} asks for {max_tokens}: lower {field} to at most "
            f"{limits.context - prompt_len}",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    if len(stop) > limits.max_stop_strings:
        raise BadRequest("stop", f"more than {limits.max_stop_strings} stop strings")
    if any(len(s) > limits.max_stop_string_chars for s in stop):
        raise BadRequest("stop", f"a stop string is longer than {limits.max_stop_string_chars}")
    if any(not s for s in stop):
        raise BadRequest("stop", "stop strings must be non-empty")
    stop_ids = list(req.stop_token_ids or ())
    if len(stop_ids) > limits.max_stop_token_ids:
        raise BadRequest("stop_token_ids", f"more than {limits.max_stop_token_ids} token ids")
    if not all(0 <= t < limits.vocab for t in stop_ids):
        raise BadRequest("stop_token_ids", f"token ids must be in [0, {limits.vocab})")
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise BadRequest(name, "must be finite")
    if req.speculative and limits.speculative is None:
        raise BadRequest(
            "speculative",
            "this server runs no speculative decoding (start it with --speculative ngram or "
            "draft); send false or leave it out",
        )
    options: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # -1 (vLLM's "off") and 0 both mean off
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=req.ignore_eos,
        structured=structured_output(req, limits),
        speculative=req.speculative,
    )
    logprobs = wanted_logprobs(req)
    if logprobs is not None:
        options["logprobs"] = logprobs
        if isinstance(req, CompletionRequest) and req.echo:
            options["prompt_logprobs"] = logprobs
    try:
        params = SamplingParams(**options)
    except ValueError as e:  # SamplingParams names the field first ("top_p must be ...")
        raise BadRequest(str(e).split()[0], str(e)) from None
    return params, echo_only


def wanted_logprobs(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """How many alternatives per token the response shows, or None for no logprobs."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


def _constraints(req: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, str, Any]]:
    """Every output constraint the request gives, as (field, StructuredOutput field, value)."""
    given = []
    fmt = req.response_format
    if fmt is not None:
        if (fmt.type == "json_schema") != (fmt.json_schema is not None):
            raise BadRequest(
                "response_format.json_schema", "give it with type json_schema, and only then"
            )
        if fmt.type == "json_object":
            given.append(("response_format", "json_object", True))
        elif fmt.type == "json_schema":
            given.append(
                ("response_format.json_schema.schema", "json_schema", fmt.json_schema.schema_)
            )
    for kind in ("json", "regex", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            given.append((f"guided_{kind}", "json_schema" if kind == "json" else kind, value))
    outputs = req.structured_outputs
    if outputs is not None:
        inner = [
            ("structured_outputs.json", "json_schema", outputs.json_),
            ("structured_outputs.regex", "regex", outputs.regex),
            ("structured_outputs.grammar", "grammar", outputs.grammar),
            ("structured_outputs.json_object", "json_object", outputs.json_object or None),
        ]
        inner = [c for c in inner if c[2] is not None]
        if not inner:
            raise BadRequest(
                "structured_outputs", "give one of json, regex, grammar or json_object: true"
            )
        given += inner
    if len(given) > 1:
        names = ", ".join(field for field, _, _ in given)
        raise BadRequest(given[-1][0], f"give at most one output constraint; got {names}")
    return given


def structured_output(
    req: CompletionRequest | ChatCompletionRequest, limits: Limits
) -> StructuredOutput | None:
    """The request's output constraint (see the module's docstring), or None for free text;
    raises BadRequest naming the field for two constraints, an oversized text or a schema
    that is not a JSON object. Whether the engine can compile it, ``Engine.check`` says."""
    given = _constraints(req)
    if not given:
        return None
    field, kind, value = given[0]
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    text = json.dumps(value) if isinstance(value, dict) else value
    try:
        return structured.from_request(kind, text, limits.max_structured_chars)
    except ValueError as e:
        raise BadRequest(field, str(e)) from None


def constraint_field(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The field that gave the request's output constraint (checked by ``structured_output``
    before), for an error the engine raises about it."""
    given = _constraints(req)
    return given[0][0] if given else None
