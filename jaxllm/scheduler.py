"""The scheduler: which tokens each engine step computes, and which pages they go to.

Pure Python (no JAX), owned by the engine thread. Every step it packs a token budget:
1. every running sequence whose prompt is done decodes one token (they always run);
2. running sequences still in their prompt get their next chunk (``chunk`` tokens at most);
3. waiting requests are admitted first-come first-served, each reusing the cached pages of
   its longest cached prefix and starting on its next chunk,
as long as prefill rows fit ``max_step_tokens`` (a step always has room for one chunk, so
prompts never starve) and ``max_num_seqs`` sequences run. A chunk always starts where the
sequence's computed tokens end and is never cut to fit the budget, so how a prompt is split
does not depend on load.

When a running sequence needs a page and none is free, the most recently admitted running
sequence is preempted: its pages are released (its full pages stay cached) and it waits at
the front of the queue; when it is admitted again its prompt and the output so far are
prefilled anew, mostly from the cache. No request fails because the pool is full.

A model whose every layer attends within the same sliding window (``window``: Mistral,
Mixtral, Qwen2/3 with windows on all layers) never reads a key older than the window of a
sequence's next query, so after each step the pages wholly older than that are given back
(they stay cached for prefix hits) and their places in the sequence's page list become
``FREED``: a long sequence holds about ``window / page_size`` pages, not its length's worth.
Models that mix windowed and global layers (Gemma 3) keep every page: the global layers read
them all.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from collections.abc import Sequence as Seq

from jaxllm.kv_pages import KVPages, page_key

FREED = -1  # a page list entry given back: wholly older than every layer's window


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request as the scheduler sees it. ``tokens`` is the prompt then the output."""

    id: str
    tokens: list[int]
    num_prompt: int
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    done: Callable[[], bool] = lambda: False  # stopped elsewhere (cancel, stop string)
    payload: object = None  # the engine's own request object
    computed: int = 0  # leading tokens whose keys/values are in the pool
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # of pages[:len(keys)]
    finished: bool = False  # max_tokens or a stop token reached
    # Speculative decoding, for the step being planned: drafted tokens may follow the newest
    # one up to ``draft_room`` (pages are held for them); after the step, ``accepted`` of
    # the ``draft`` matched what the model sampled.
    draft_room: int = 0
    draft: list[int] = dataclasses.field(default_factory=list)
    accepted: int = 0

    @property
    def remaining(self) -> int:
        """Tokens not yet computed; the last one's logits give the next token."""
        return len(self.tokens) - self.computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``length`` tokens of ``seq`` from position ``start``; samples when it reaches the end."""

    seq: Sequence
    start: int
    length: int
    samples: bool


@dataclasses.dataclass
class StepPlan:
    # Longest first, so the step's attention groups rows of similar length (jaxllm.step).
    decodes: list[Sequence] = dataclasses.field(default_factory=list)
    prefills: list[Chunk] = dataclasses.field(default_factory=list)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        pages: KVPages,
        *,
        max_num_seqs: int,
        max_step_tokens: int,
        chunk: int,
        max_prefill_rows: int,
        window: int | None = None,
        speculate: Callable[[Sequence], int] | None = None,
        max_draft_rows: int = 0,
    ):
        """``window``: the sliding window every layer of the model shares (None: none, or
        not every layer has one); pages older than it are given back (module docstring).
        ``speculate(seq)``: how many drafted tokens ``seq`` wants verified after its newest
        (speculative decoding; 0: none), asked for each decode of a step with at most
        ``max_draft_rows`` of them."""
        self.pages = pages
        self.window = window
        self.speculate, self.max_draft_rows = speculate, max_draft_rows
        # Drafted tokens verified, how many of them were kept, in how many decode rows.
        self.drafted_tokens = self.accepted_tokens = self.verify_rows = 0
        self.page_size = pages.page_size
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.chunk, self.max_prefill_rows = chunk, max_prefill_rows
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self.preemptions = 0
        # Prompt tokens of admitted requests, and how many of them came from the cache.
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self._reap()
        plan = StepPlan()
        i = 0
        while i < len(self.running):  # preemption shortens the list from the end
            seq = self.running[i]
            if seq.remaining == 1 and self._grow(seq, seq.computed + 1, plan):
                plan.decodes.append(seq)
            i += 1
        spare = (self.max_step_tokens - len(plan.decodes)) // self.chunk
        rows = min(self.max_prefill_rows, max(1, spare))
        i = 0
        while i < len(self.running) and len(plan.prefills) < rows:
            seq = self.running[i]
            if seq.remaining > 1:
                n = min(self.chunk, seq.remaining)
                if self._grow(seq, seq.computed + n, plan):
                    plan.prefills.append(Chunk(seq, seq.computed, n, n == seq.remaining))
            i += 1
        while (
            self.waiting
            and len(self.running) < self.max_num_seqs
            and len(plan.prefills) < rows
            and self._admit(self.waiting[0], plan)
        ):
            self.waiting.popleft()
        plan.decodes.sort(key=lambda s: -s.computed)  # stable: ties keep admission order
        self._make_room_for_drafts(plan)
        return plan

    def _make_room_for_drafts(self, plan: StepPlan) -> None:
        """Sets each decode's ``draft_room`` (0 unless speculating) and holds pages for it.
        Drafts take only free pages and never preempt: room that does not fit is not drafted.
        A sequence never drafts past ``max_tokens``: a step adds at most room + 1 tokens."""
        speculating = self.speculate is not None and len(plan.decodes) <= self.max_draft_rows
        for seq in plan.decodes:
            seq.draft, seq.accepted = [], 0
            room = 0
            if speculating:
                room = min(self.speculate(seq), seq.max_tokens - seq.num_generated - 1)
            if room > 0:
                needed = -(-(seq.computed + 1 + room) // self.page_size) - len(seq.pages)
                got = self.pages.allocate(needed) if needed > 0 else []
                if got is None:
                    room = len(seq.pages) * self.page_size - seq.computed - 1
                else:
                    seq.pages.extend(got)
            seq.draft_room = max(0, room)

    def update(
        self, plan: StepPlan, decoded: Seq[Seq[int]], prefilled: Seq[int]
    ) -> list[tuple[Sequence, int, int]]:
        """Records a step's results: ``decoded[i]`` holds the tokens sampled at the plan's
        i-th decode row (its newest token's, then each draft's), ``prefilled[i]`` the token
        of its i-th chunk (ignored unless the chunk samples). A decode keeps its drafts up to
        the first that differs from the token sampled before it, and that sample: each kept
        token is what decoding one step at a time would have sampled. Returns each new
        (sequence, token, offset in its row); a sequence that reached max_tokens or a stop
        token is finished (later tokens of its row are dropped) and its pages released."""
        new = []
        for seq, sampled in zip(plan.decodes, decoded, strict=True):
            kept = 0
            while kept < len(seq.draft) and sampled[kept] == seq.draft[kept]:
                kept += 1
            seq.accepted = kept
            seq.computed += 1 + kept
            new.extend((seq, int(sampled[j]), j) for j in range(kept + 1))
            if seq.draft:
                self.verify_rows += 1
                self.drafted_tokens += len(seq.draft)
                self.accepted_tokens += kept
        for chunk, token in zip(plan.prefills, prefilled, strict=True):
            chunk.seq.computed += chunk.length
            if chunk.samples:
                new.append((chunk.seq, int(token), 0))
        kept_new = []
        for seq, token, offset in new:
            if seq.finished:  # a stop inside a verified row: what follows was never generated
                seq.computed = min(seq.computed, len(seq.tokens))
                continue
            seq.tokens.append(token)
            kept_new.append((seq, token, offset))
            if seq.num_generated >= seq.max_tokens or token in seq.stop_ids:
                seq.finished = True
        for seq in [*plan.decodes, *(chunk.seq for chunk in plan.prefills)]:
            self._register_full_pages(seq)
            self._free_out_of_window(seq)
        self._reap()
        return kept_new

    def abort_all(self) -> list[Sequence]:
        """Removes every sequence, releasing its pages; returns them."""
        seqs = list(self.running) + list(self.waiting)
        for seq in self.running:
            self._release(seq)
        self.running.clear()
        self.waiting.clear()
        return seqs

    # -- internals --------------------------------------------------------------------------

    def _reap(self) -> None:
        """Frees sequences that finished or were stopped elsewhere."""
        keep = []
        for seq in self.running:
            if seq.finished or seq.done():
                self._release(seq)
            else:
                keep.append(seq)
        self.running = keep
        if any(seq.done() for seq in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if not s.done())

    def _grow(self, seq: Sequence, upto: int, plan: StepPlan) -> bool:
        """Gives ``seq`` pages for positions below ``upto``, preempting the newest running
        sequences if needed; False if ``seq`` itself had to be preempted."""
        needed = -(-upto // self.page_size) - len(seq.pages)
        while needed > 0:
            got = self.pages.allocate(needed)
            if got is not None:
                seq.pages.extend(got)
                return True
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, plan: StepPlan) -> bool:
        """Starts the first waiting request if the pages for its first chunk are free
        (admission never preempts); False leaves it waiting."""
        if seq.done():
            return True  # dropped from the queue
        cached, keys = self.pages.match_prefix(seq.tokens)
        seq.pages, seq.keys, seq.computed = cached, keys, len(cached) * self.page_size
        n = min(self.chunk, seq.remaining)
        fresh = self.pages.allocate(-(-(seq.computed + n) // self.page_size) - len(cached))
        if fresh is None:
            self.pages.release(cached)
            seq.pages, seq.keys, seq.computed = [], [], 0
            return False
        seq.pages.extend(fresh)
        self.prompt_tokens += len(seq.tokens)
        self.cached_tokens += seq.computed
        self.running.append(seq)
        plan.prefills.append(Chunk(seq, seq.computed, n, n == seq.remaining))
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        plan.decodes = [s for s in plan.decodes if s is not seq]
        plan.prefills = [c for c in plan.prefills if c.seq is not seq]
        plan.preempted.append(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.pages.release([page for page in seq.pages if page != FREED])
        seq.pages, seq.keys, seq.computed = [], [], 0

    def _free_out_of_window(self, seq: Sequence) -> None:
        """Gives back the pages wholly older than the window of ``seq``'s next query (at
        position ``computed``, seeing keys from ``computed - window + 1`` on). They were
        full, so already registered for prefix hits: they stay cached until evicted."""
        if self.window is None:
            return
        dead = min(max(0, seq.computed - self.window + 1) // self.page_size, len(seq.pages))
        # Freed entries are a prefix of the list: walk back from the newest dead page only
        # as far as the last step freed (a long sequence's list is not rescanned each step).
        first = dead
        while first > 0 and seq.pages[first - 1] != FREED:
            first -= 1
        self.pages.release(seq.pages[first:dead])  # newest evicted first, as for any release
        seq.pages[first:dead] = [FREED] * (dead - first)

    def _register_full_pages(self, seq: Sequence) -> None:
        size = self.page_size
        for i in range(len(seq.keys), seq.computed // size):
            parent = seq.keys[-1] if seq.keys else None
            key = page_key(parent, seq.tokens[i * size : (i + 1) * size])
            self.pages.register(seq.pages[i], key)
            seq.keys.append(key)
