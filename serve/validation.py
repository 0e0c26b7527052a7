"""Checks every field of a GenerateRequest before anything reaches the engine.

Each problem becomes an ``InvalidRequest`` naming the field, which the servicer answers with
INVALID_ARGUMENT (or UNIMPLEMENTED for a feature this server lacks). Nothing is truncated or
clamped silently. Chat messages are rendered by ``jaxllm.chat.chat_prompt_ids``, the one
function every front end uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import grpc

from jaxllm import structured
from jaxllm.chat import chat_prompt_ids
from jaxllm.engine import Engine
from jaxllm.engine_config import EngineConfig
from jaxllm.sampling import MAX_LOGPROBS, SamplingParams
from jaxllm.structured import StructuredOutput
from jaxllm.tokenizer import Tokenizer
from serve.config import ServeConfig
from serve.proto import jaxllm_pb2 as pb

_MAX_REQUEST_ID_CHARS = 256
# A prompt whose text is this many times the context can only tokenize past it; stop before
# spending tokenizer time on it.
_PROMPT_CHARS_PER_TOKEN = 64
# Most completions one request may ask for (n); each is a sequence of its own in the engine.
MAX_CHOICES = 16


class InvalidRequest(Exception):
    def __init__(self, field: str, message: str, code=grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(f"{field}: {message}")
        self.field, self.code = field, code


@dataclasses.dataclass(frozen=True)
class Validated:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    n: int = 1


def validate(
    request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer, config: ServeConfig
) -> Validated:
    """Turns a request into engine inputs, or raises InvalidRequest naming the field."""
    if len(request.request_id) > _MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {_MAX_REQUEST_ID_CHARS} characters")
    n = check_n(request.n or 1)
    params = sampling_params(
        request.sampling, engine.config, engine.runner.config.vocab_size, config
    )
    prompt_ids = _prompt_ids(request, engine, tokenizer)
    try:
        prompt_ids = engine.check(prompt_ids, params)
    except ValueError as e:
        if refused_for_constraint(engine, prompt_ids, params):
            kind = request.sampling.structured.WhichOneof("constraint")
            field = f"sampling.structured.{kind}"
        else:
            field = "sampling.max_tokens" if "max_tokens" in str(e) else "prompt"
        raise InvalidRequest(field, str(e)) from None
    return Validated(prompt_ids, params, request.request_id, n)


def refused_for_constraint(
    engine: Engine, prompt_ids: Sequence[int], params: SamplingParams
) -> bool:
    """Whether ``engine.check`` refused a request for its output constraint (a schema it
    cannot compile): the same request without one passes. Asked only once it refused."""
    if params.structured is None:
        return False
    try:
        engine.check(prompt_ids, dataclasses.replace(params, structured=None))
    except ValueError:
        return False
    return True


def check_n(n: int) -> int:
    """The number of choices, in [1, MAX_CHOICES], or InvalidRequest naming ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest("n", f"must be an integer in [1, {MAX_CHOICES}], got {n!r}")
    return n


def _prompt_ids(request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer) -> list[int]:
    given = [bool(request.prompt), bool(request.token_ids), bool(request.messages)]
    if sum(given) > 1:
        raise InvalidRequest("prompt", "give one of prompt, token_ids or messages, not both")
    if not any(given):
        raise InvalidRequest("prompt", "empty: give prompt text, token_ids or messages")
    if request.messages:
        return _chat_ids(request, engine, tokenizer)
    has_ids = given[1]
    limit, vocab = engine.config.max_seq_len - 1, engine.runner.config.vocab_size
    if has_ids:
        ids = list(request.token_ids)
        if len(ids) > limit:
            raise InvalidRequest(
                "token_ids", f"{len(ids)} tokens, more than the maximum of {limit}"
            )
        if not all(0 <= t < vocab for t in ids):
            raise InvalidRequest("token_ids", f"token ids must be in [0, {vocab})")
        return ids
    if len(request.prompt) > limit * _PROMPT_CHARS_PER_TOKEN:
        raise InvalidRequest("prompt", f"longer than the context of {limit} tokens")
    ids = tokenizer.encode(request.prompt)
    if not ids:
        raise InvalidRequest("prompt", "tokenizes to no tokens")
    if len(ids) > limit:
        raise InvalidRequest(
            "prompt",
            f"{len(ids)} tokens, more than the maximum of {limit}; prompts are never truncated",
        )
    return ids


def _chat_ids(request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer) -> list[int]:
    limit = engine.config.max_seq_len - 1
    chars = sum(len(m.content) + len(m.role) for m in request.messages)
    if chars > limit * _PROMPT_CHARS_PER_TOKEN:
        raise InvalidRequest("messages", f"longer than the context of {limit} tokens")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        ids = chat_prompt_ids(tokenizer, messages)
    except ValueError as e:
        raise InvalidRequest("messages", str(e)) from None
    if len(ids) > limit:
        raise InvalidRequest(
            "messages",
            f"{len(ids)} tokens once rendered, more than the maximum of {limit}; "
            "prompts are never truncated",
        )
    return ids


def _logprobs(wanted: bool, k: int, field: str) -> int | None:
    """SamplingParams' logprobs value for a (bool, count) pair of proto fields."""
    if not 0 <= k <= MAX_LOGPROBS:
        raise InvalidRequest(field, f"must be in [0, {MAX_LOGPROBS}], got {k}")
    return k if wanted or k > 0 else None


def sampling_params(
    s: pb.SamplingParams, engine_config: EngineConfig, vocab: int, config: ServeConfig
) -> SamplingParams:
    """The engine's SamplingParams for ``s``, checked against the engine's options and the
    server's limits; raises InvalidRequest naming the field."""
    logprobs = _logprobs(s.logprobs, s.num_logprobs, "sampling.num_logprobs")
    prompt_logprobs = _logprobs(
        s.prompt_logprobs, s.num_prompt_logprobs, "sampling.num_prompt_logprobs"
    )
    if s.max_tokens < 0:
        raise InvalidRequest(
            "sampling.max_tokens", f"must be >= 0 (0 = default), got {s.max_tokens}"
        )
    context = engine_config.max_seq_len
    max_tokens = s.max_tokens or min(config.default_max_tokens, context - 1)
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(s, name)
        if not math.isfinite(value):
            raise InvalidRequest(f"sampling.{name}", f"must be finite, got {value}")
    if len(s.stop) > config.max_stop_strings:
        raise InvalidRequest("sampling.stop", f"more than {config.max_stop_strings} stop strings")
    if any(len(x) > config.max_stop_string_chars for x in s.stop):
        raise InvalidRequest(
            "sampling.stop", f"a stop string is longer than {config.max_stop_string_chars} chars"
        )
    if len(s.stop_token_ids) > config.max_stop_token_ids:
        raise InvalidRequest(
            "sampling.stop_token_ids", f"more than {config.max_stop_token_ids} stop token ids"
        )
    if not all(0 <= t < vocab for t in s.stop_token_ids):
        raise InvalidRequest("sampling.stop_token_ids", f"token ids must be in [0, {vocab})")
    speculative = s.speculative if s.HasField("speculative") else None
    if speculative and engine_config.speculative is None:
        raise InvalidRequest(
            "sampling.speculative",
            "this server runs no speculative decoding (start it with --speculative ngram or "
            "draft); send false or leave it unset",
        )
    structured = structured_output(s, config.max_structured_chars)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
            speculative=speculative,
        )
    except ValueError as e:
        # SamplingParams names the offending field first ("top_p must be in ...").
        raise InvalidRequest(f"sampling.{str(e).split()[0]}", str(e)) from None


def structured_output(s: pb.SamplingParams, max_chars: int) -> StructuredOutput | None:
    """``s.structured`` as the engine takes it (None: unset, free text), or InvalidRequest
    naming the field. Whether the engine can compile it, ``Engine.check`` says."""
    if not s.HasField("structured"):
        return None
    kind = s.structured.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequest(
            "sampling.structured", "set one of json_schema, json_object, regex or grammar"
        )
    field, value = f"sampling.structured.{kind}", getattr(s.structured, kind)
    if kind == "json_object":
        if not value:
            raise InvalidRequest(field, "must be true (leave structured unset for free text)")
        return StructuredOutput(json_object=True)
    try:
        return structured.from_request(kind, value, max_chars)
    except ValueError as e:
        raise InvalidRequest(field, str(e)) from None
