"""Turns one request's sampled token ids into text: detokenizing, stop conditions, finish.

Host-side only. Stop strings are never shown to the user: text that could still become a
stop string is held back until it either completes one (and is dropped) or cannot.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely tokens of the same distribution.

    For generated tokens the distribution is the one the token was drawn from (temperature,
    top-k, top-p and min-p applied and renormalised; greedy requests report the unmodified
    model distribution); for prompt tokens it is the model's, unmodified. ``top`` holds up to
    k ``(token_id, logprob)`` pairs, most likely first; tokens the filters removed (logprob
    -inf) are left out, so it is shorter than k when fewer than k tokens were kept.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_row(
        cls,
        token_id: int,
        logprob: float,
        ids: Sequence[int] | np.ndarray,
        logprobs: Sequence[float] | np.ndarray,
        k: int,
    ) -> TokenLogprob:
        """From a device row: ``ids``/``logprobs`` are the most likely tokens, best first."""
        top = tuple(
            (int(i), float(lp))
            for i, lp in zip(
                np.asarray(ids)[:k].tolist(), np.asarray(logprobs)[:k].tolist(), strict=True
            )
            if lp != -math.inf
        )
        return cls(int(token_id), float(logprob), top)


class RequestOutput:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids=()):
        self.params = params
        self.token_ids: list[int] = []
        # Aligned with token_ids when params.logprobs is set; else empty.
        self.logprobs: list[TokenLogprob] = []
        # Aligned with the prompt's ids (the first has none) when params.prompt_logprobs is
        # set, filled before the first token arrives; else empty.
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.text = ""  # emitted so far
        self.finish_reason: str | None = None  # "stop" or "length" once finished
        self._held = ""  # decoded but not yet emitted: might be the start of a stop string
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_ids = set(params.stop_token_ids)
        # Structured output ends at EOS whatever ignore_eos says: once the text is complete
        # its grammar allows nothing else.
        if not params.ignore_eos or params.structured is not None:
            self.stop_ids |= set(tokenizer.eos_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, logprob: TokenLogprob | None = None) -> str:
        """Takes the next sampled token (and its logprob, when asked for); returns the text it
        makes visible (maybe "")."""
        if self.finished:
            raise RuntimeError("request already finished")
        if logprob is not None:
            # Before the token: a reader on another thread that sees n token ids then finds
            # at least n logprobs.
            self.logprobs.append(logprob)
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            return self._finish("stop", self._detok.flush())
        piece = self._emit(self._detok.add(token_id))
        if self.finished:
            return piece
        if len(self.token_ids) >= self.params.max_tokens:
            return piece + self._finish("length", self._detok.flush())
        return piece

    def _emit(self, new_text: str) -> str:
        pending = self._held + new_text
        stops = self.params.stop
        if not stops:
            self._held = ""
            self.text += pending
            return pending
        # A stop string may straddle already-emitted text only within the held-back tail,
        # and the held tail is always a proper prefix of some stop string.
        cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.text += pending[:cut]
            self.finish_reason = "stop"
            return pending[:cut]
        keep = max(
            (n for s in stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0
        )
        ready, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += ready
        return ready

    def _finish(self, reason: str, tail: str) -> str:
        piece = self._emit(tail)
        if self.finished:  # the flushed tail completed a stop string
            return piece
        piece += self._held
        self.text += self._held
        self._held = ""
        self.finish_reason = reason
        return piece
