"""Requests submitted to the engine but not yet given to the scheduler.

Pure Python, no locking of its own: every caller holds the engine's lock. Three ways in:
- ``put``: a plain request, ready for the scheduler, unless it asked for prompt logprobs:
  then it waits for the engine thread to score its prompt first (``next_to_score``,
  ``scored``);
- ``hold``: choices 2..n of an ``n > 1`` request wait until the first choice has computed
  the prompt (``release_held``), so that they start from its cached KV pages.
"""

from __future__ import annotations

import collections

from jaxllm.scheduler import Sequence


def _wants_scores(seq: Sequence) -> bool:
    return seq.payload.output.params.prompt_logprobs is not None


class Intake:
    def __init__(self):
        self._ready: collections.deque[Sequence] = collections.deque()
        self._to_score: collections.deque[Sequence] = collections.deque()
        self._held: list[tuple[Sequence, list[Sequence]]] = []

    def __len__(self) -> int:
        held = sum(len(followers) for _, followers in self._held)
        return len(self._ready) + len(self._to_score) + held

    def put(self, seq: Sequence) -> None:
        (self._to_score if _wants_scores(seq) else self._ready).append(seq)

    def hold(self, leader: Sequence, followers: list[Sequence]) -> None:
        """``followers`` go in once ``leader`` (already put) has computed its prompt."""
        self._held.append((leader, followers))

    @property
    def scoring(self) -> bool:
        """Some request waits for its prompt logprobs (the engine scores before it steps)."""
        return bool(self._to_score)

    def next_to_score(self) -> Sequence | None:
        return self._to_score.popleft() if self._to_score else None

    def scored(self, seq: Sequence) -> None:
        self._ready.append(seq)

    def take_ready(self) -> list[Sequence]:
        """Everything the scheduler may have now, releasing held choices whose first choice
        has a token (its prompt is in the pool) or has ended."""
        keep = []
        for leader, followers in self._held:
            if leader.num_generated == 0 and not leader.finished and not leader.done():
                keep.append((leader, followers))
                continue
            scores = leader.payload.output.prompt_logprobs
            for seq in followers:
                output = seq.payload.output
                if _wants_scores(seq) and len(scores) == seq.num_prompt:
                    output.prompt_logprobs = list(scores)  # the same prompt: scored once
                    self._ready.append(seq)
                else:
                    self.put(seq)
        self._held = keep
        ready, self._ready = list(self._ready), collections.deque()
        return ready

    def drain(self) -> list[Sequence]:
        """Empties every queue; returns what was in them (to fail them)."""
        held = [s for _, followers in self._held for s in followers]
        out = [*self._ready, *self._to_score, *held]
        self._ready.clear()
        self._to_score.clear()
        self._held.clear()
        return out
