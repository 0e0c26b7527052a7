"""Speculative decoding: proposing tokens that one engine step verifies together.

A decode row normally computes one token, and a small batch's step is bound by reading the
weights, not by arithmetic; a row that also carries ``k`` drafted tokens costs little more and
can keep up to ``k + 1`` tokens (``jaxllm.step``: every token of the row is sampled, and
``Scheduler.update`` keeps the drafts up to the first one its sample disagrees with, plus that
sample). Two proposers, both on the engine thread before the step is built:

- ``NgramDrafter`` (prompt lookup): the longest suffix of the sequence, of at most
  ``prompt_lookup_max`` tokens and at least ``prompt_lookup_min``, that occurred earlier in
  the prompt or output proposes the tokens that followed its latest occurrence. No second
  model; it pays off where output repeats its input (editing, quoting, extraction, code).
- ``DraftModelDrafter``: a smaller model with the same tokenizer proposes ``k`` tokens
  greedily, one step each, with its own KV pool addressed by the target's page tables.

Why the output distribution is unchanged. Both proposers are deterministic (a point mass
``q`` on the drafted token x). The standard rule for verifying a draft from q, accept with
probability ``min(1, p(x) / q(x)) = p(x)``, else draw from ``norm(max(0, p - q))`` (p
without x), gives each token exactly probability ``p``; so does drawing ``y ~ p`` and keeping
x iff ``y == x``, which is what the verify step does, with the same random key per generated
token as decoding one token at a time. Each position's logits are the true conditional as
long as every earlier draft was kept, so greedy output is token-identical and sampled output
uses the very draws non-speculative decoding would (identical given equal logits).

When drafts keep failing (no kept token in a verify), a sequence stops proposing for a while
(1, 2, 4, ... up to ``_MAX_BACKOFF`` steps): a verifying step costs more than a plain one, so
text that does not repeat itself should not pay for it. A draft model's drafts stay on (its
cache must follow every step).
"""

from __future__ import annotations

import logging
import weakref

import jax
import numpy as np

from jaxllm import padding, step
from jaxllm.engine_config import EngineConfig
from jaxllm.kv_cache import KVPool
from jaxllm.runtime import ModelRunner
from jaxllm.scheduler import Sequence, StepPlan

log = logging.getLogger(__name__)

_MAX_BACKOFF = 16  # steps a sequence whose drafts all failed waits at most before proposing


def ngram_draft(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
    of ``tokens`` (of ``max_n`` down to ``min_n`` tokens); [] if none occurred."""
    length = len(tokens)
    longest = min(max_n, length - 1)
    # One scan of the history per step: earlier positions of the newest token are where an
    # occurrence of the suffix can end; each then only needs its few preceding tokens checked.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if longest < min_n or not len(ends):
        return []
    matched = np.ones(len(ends), np.int32)  # suffix tokens each candidate end matches
    for back in range(1, longest):
        before = ends - back
        alive = (matched == back) & (before >= 0)
        alive[alive] = tokens[before[alive]] == tokens[length - 1 - back]
        matched += alive
    for n in range(longest, min_n - 1, -1):
        hits = np.flatnonzero(matched >= n)
        if len(hits):
            start = ends[hits[-1]] + 1
            return tokens[start : start + k].tolist()
    return []


class Drafter:
    """What the engine asks of a proposer: how many drafts a sequence wants (the scheduler
    holds pages for them), the drafts themselves, and the verify outcome."""

    def __init__(self, config: EngineConfig):
        self.k = config.num_speculative_tokens
        self._backoff: weakref.WeakKeyDictionary[Sequence, list[int]] = (
            weakref.WeakKeyDictionary()
        )  # seq -> [failures in a row, steps left to wait]

    def wanted(self, seq: Sequence) -> int:
        """Drafted tokens ``seq`` may verify in the next step (``Scheduler.speculate``)."""
        params = seq.payload.output.params
        if params.speculative is False or params.structured is not None:
            return 0
        state = self._backoff.get(seq)
        if state is not None and state[1] > 0:
            state[1] -= 1
            return 0
        return self.k

    def propose(self, plan: StepPlan) -> None:
        """Sets ``draft`` (at most ``draft_room`` tokens) of the plan's decodes."""
        raise NotImplementedError

    def verified(self, plan: StepPlan) -> None:
        """After ``Scheduler.update``: backs off sequences whose drafts all failed."""
        for seq in plan.decodes:
            if not seq.draft:
                continue
            state = self._backoff.setdefault(seq, [0, 0])
            if seq.accepted:
                state[0] = 0
            else:
                state[0] += 1
                state[1] = min(_MAX_BACKOFF, 2 ** (state[0] - 1))


class NgramDrafter(Drafter):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, plan: StepPlan) -> None:
        for seq in plan.decodes:
            if seq.draft_room:
                tokens = np.asarray(seq.tokens, np.int32)
                seq.draft = ngram_draft(tokens, seq.draft_room, self.min_n, self.max_n)


class DraftModelDrafter(Drafter):
    """Drafts with a smaller model. Its KV pool has the target's page count and page size
    and is addressed by the target's page tables, so a sequence's pages hold both models'
    keys; it computes every prompt chunk the target computes (in its first call of a step)
    and, for each drafting row, the tokens it has not seen (at most ``1 + k``: the newest
    and the last kept draft, normally) and then one token per call. Where it missed tokens
    (steps with more decode rows than speculation runs for, prefix-cache hits on pages it
    computed a token short) its cache is stale there: it proposes worse, never wrongly."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, num_pages: int, kv_dtype):
        super().__init__(config)
        self.config, self.runner, self.num_pages = config, runner, num_pages
        self.pool: KVPool = runner.new_pool(num_pages, config.page_size, kv_dtype)
        self._step = step.StepFunction(runner, config, self.pool)
        # Leading tokens of each sequence whose keys are in the draft pool.
        self._seen: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()

    def wanted(self, seq: Sequence) -> int:
        params = seq.payload.output.params
        return 0 if params.speculative is False or params.structured is not None else self.k

    def verified(self, plan: StepPlan) -> None:
        for seq in plan.decodes:  # drafts past the kept ones were not the sequence's
            self._seen[seq] = min(self._seen.get(seq, 0), seq.computed)

    def lowerings(self, shapes) -> dict:
        """The draft model's programs (for warm-up) among the target's step ``shapes``: the
        verify shapes (its first call of a step) and single-token decode shapes, for the
        decode buckets speculation runs at."""
        out = {}
        for Sd, Sp, Q in shapes:
            if Sd in self.config.verify_buckets and (Q > 1 or Sp == 0):
                inp = step.padding_only((Sd, Sp, Q), self.config, self.num_pages)
                named = self._step.lowerings(self.runner.params, self.pool, inp)
                out |= {f"draft-{name}": lower for name, lower in named.items()}
        return out

    def use(self, compiled: dict) -> None:
        prefix = "draft-"
        self._step.use({k[len(prefix) :]: v for k, v in compiled.items() if k.startswith(prefix)})

    def propose(self, plan: StepPlan) -> None:
        drafting = [seq for seq in plan.decodes if seq.draft_room]
        if not drafting and not plan.prefills:
            return
        width = self.config.verify_width
        rows = []
        for seq in drafting:
            seen = max(self._seen.get(seq, 0), len(seq.tokens) - width)
            rows.append(step.DecodeRow(seq, seen, seq.tokens[seen:]))
        # The first call catches up: its prompt chunks, and each row's unseen tokens.
        tokens = self._run(plan, rows, width)
        for chunk in plan.prefills:
            self._seen[chunk.seq] = chunk.start + chunk.length
        drafts = {seq: [tokens[i]] for i, seq in enumerate(drafting)}
        for j in range(1, max((seq.draft_room for seq in drafting), default=0)):
            going = [seq for seq in drafting if seq.draft_room > j]
            if not going:
                break
            rows = [step.DecodeRow(s, len(s.tokens) + j - 1, [drafts[s][-1]]) for s in going]
            tokens = self._run(StepPlan(), rows, 1)
            for i, seq in enumerate(going):
                drafts[seq].append(tokens[i])
        for seq in drafting:
            seq.draft = drafts[seq]
            # Keys in the pool: up to the newest token and every draft but the last.
            self._seen[seq] = len(seq.tokens) + len(seq.draft) - 1

    def _run(self, plan: StepPlan, rows: list[step.DecodeRow], Q: int) -> list[int]:
        """One greedy step of the draft model; the token after each row's last token."""
        shape = (
            padding.bucket_for(len(rows), self.config.decode_buckets),
            padding.bucket_for(len(plan.prefills), self.config.prefill_buckets),
            Q,
        )
        inp = step.build(plan, self.config, self.num_pages, shape, rows, greedy=True)
        sampled, self.pool, _ = self._step(self.runner.params, self.pool, inp)
        sampled = np.asarray(jax.device_get(sampled.tokens))
        return [int(sampled[i * Q + len(row.tokens) - 1]) for i, row in enumerate(rows)]
