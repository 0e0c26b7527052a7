"""Prompt logprobs: each prompt token's log-probability given the tokens before it.

The paged step computes logits only where a row samples, so prompt logprobs come from one
dense causal pass over the whole prompt (``ModelRunner.forward``, the pass ``LLM.logits``
uses), then one small jitted call for ``log_softmax``, the prompt tokens' entries and the
``MAX_LOGPROBS`` most likely tokens of every position. Only ``[T]`` and ``[T, K]`` arrays
reach the host. The model's distribution is reported unmodified (no temperature or filters),
as vLLM and the OpenAI API do for ``echo`` with logprobs.

Prompts are padded to ``padding.powers_of_two(max_seq_len, 16)``: one pair of programs per
bucket, shared with ``LLM.logits``. They are compiled at warm-up only when asked
(``Engine(..., warm_up_prompt_logprobs=True)``, ``LLM.load(..., warm_up_prompt_logprobs=True)``);
otherwise the first request of each bucket compiles it on the engine thread.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from jaxllm import padding
from jaxllm.request_output import TokenLogprob
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import MAX_LOGPROBS

log = logging.getLogger(__name__)


def _score(
    logits: Float[Array, "1 T V"], tokens: Int[Array, "1 T"]
) -> tuple[Float[Array, " T"], Int[Array, "T K"], Float[Array, "T K"]]:
    """Row t: the logprob of tokens[t + 1] and the top K of the distribution at t."""
    lsm = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # [T, V]
    following = jnp.roll(tokens[0], -1)  # the last entry wraps around; the host drops it
    chosen = jnp.take_along_axis(lsm, following[:, None], axis=-1)[:, 0]
    k = min(MAX_LOGPROBS, lsm.shape[-1])
    top, top_ids = lax.top_k(lsm, k)
    return chosen, top_ids.astype(jnp.int32), top


class PromptScorer:
    def __init__(self, runner: ModelRunner, max_seq_len: int, kv_dtype: str | None):
        self.runner, self.kv_dtype = runner, kv_dtype
        self.buckets = padding.powers_of_two(max_seq_len, 16)
        self._score = jax.jit(_score)
        self._compiled: set[int] = set()

    def warm_up(self) -> None:
        for bucket in self.buckets:
            self._run(np.zeros(bucket, np.int32))

    def __call__(self, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
        """One entry per prompt token: None for the first, then each token's logprob given
        the ones before it with the ``k`` most likely tokens at that position."""
        bucket = padding.bucket_for(len(prompt_ids), self.buckets)
        if bucket not in self._compiled:
            log.warning(
                "compiling prompt-logprob scoring for prompts of up to %d tokens on the "
                "engine thread; warm_up_prompt_logprobs=True compiles it at warm-up",
                bucket,
            )
        chosen, top_ids, top = self._run(padding.pad_to(prompt_ids, bucket))
        out: list[TokenLogprob | None] = [None]
        for t in range(1, len(prompt_ids)):
            row = t - 1  # the position whose logits predict token t
            out.append(
                TokenLogprob.from_row(prompt_ids[t], float(chosen[row]), top_ids[row], top[row], k)
            )
        return out

    def _run(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positions = np.arange(len(tokens), dtype=np.int32)[None]
        logits = self.runner.forward(
            self.runner.params, tokens[None], positions, kv_dtype=self.kv_dtype
        )
        chosen, top_ids, top = self._score(logits, tokens[None])
        self._compiled.add(len(tokens))
        return np.asarray(chosen), np.asarray(top_ids), np.asarray(top)
