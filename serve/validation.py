"""Checks every field of a GenerateRequest before anything reaches the engine.

Each problem becomes an ``InvalidRequest`` naming the field, which the servicer answers with
INVALID_ARGUMENT (or UNIMPLEMENTED for a feature this server lacks). Nothing is truncated or
clamped silently.
"""

from __future__ import annotations

import dataclasses
import math

import grpc

from jaxllm.engine import Engine
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import Tokenizer
from serve.config import ServeConfig
from serve.proto import jaxllm_pb2 as pb

_MAX_REQUEST_ID_CHARS = 256
# A prompt whose text is this many times the context can only tokenize past it; stop before
# spending tokenizer time on it.
_PROMPT_CHARS_PER_TOKEN = 64


class InvalidRequest(Exception):
    def __init__(self, field: str, message: str, code=grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(f"{field}: {message}")
        self.field, self.code = field, code


@dataclasses.dataclass(frozen=True)
class Validated:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


def validate(
    request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer, config: ServeConfig
) -> Validated:
    """Turns a request into engine inputs, or raises InvalidRequest naming the field."""
    if len(request.request_id) > _MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {_MAX_REQUEST_ID_CHARS} characters")
    params = sampling_params(request.sampling, engine, config)
    prompt_ids = _prompt_ids(request, engine, tokenizer)
    try:
        prompt_ids = engine.check(prompt_ids, params)
    except ValueError as e:
        field = "sampling.max_tokens" if "max_tokens" in str(e) else "prompt"
        raise InvalidRequest(field, str(e)) from None
    return Validated(prompt_ids, params, request.request_id)


def _prompt_ids(request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer) -> list[int]:
    has_text, has_ids = bool(request.prompt), bool(request.token_ids)
    if has_text and has_ids:
        raise InvalidRequest("prompt", "give prompt or token_ids, not both")
    if not (has_text or has_ids):
        raise InvalidRequest("prompt", "empty: give prompt text or token_ids")
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


def sampling_params(s: pb.SamplingParams, engine: Engine, config: ServeConfig) -> SamplingParams:
    if s.num_logprobs < 0:
        raise InvalidRequest("sampling.num_logprobs", "must be >= 0")
    if s.num_logprobs > 0:
        raise InvalidRequest(
            "sampling.num_logprobs",
            "log-probabilities are not supported by this server yet",
            grpc.StatusCode.UNIMPLEMENTED,
        )
    if s.max_tokens < 0:
        raise InvalidRequest(
            "sampling.max_tokens", f"must be >= 0 (0 = default), got {s.max_tokens}"
        )
    context = engine.config.max_seq_len
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
    vocab = engine.runner.config.vocab_size
    if not all(0 <= t < vocab for t in s.stop_token_ids):
        raise InvalidRequest("sampling.stop_token_ids", f"token ids must be in [0, {vocab})")
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
        )
    except ValueError as e:
        # SamplingParams names the offending field first ("top_p must be in ...").
        raise InvalidRequest(f"sampling.{str(e).split()[0]}", str(e)) from None
