"""The continuous-batching engine: many requests share one model through fixed decode slots.

One request's way through:
  ``submit`` (validate, queue) -> engine thread: a free slot -> ``prefill_insert`` (prompt
  padded to its bucket, one jitted call that also writes the prompt's keys/values into the
  slot and samples the first token) -> ``generate`` (one jitted decode step over every slot,
  cache donated, sampling on device) -> the step's tokens, one packed ``[steps, B]`` array,
  start copying to the host -> detokenizer thread: ``RequestOutput`` applies stop tokens,
  stop strings and max_tokens and pushes text to the request's stream -> a finished or
  cancelled request's slot is freed at the engine's next iteration.

The engine thread never waits for tokens: it dispatches the next step while the detokenizer
reads the previous one. A bounded hand-off queue keeps it at most a few steps ahead, so
finished requests are noticed quickly.

Every shape the device sees is fixed at start-up (slots, cache length, prefill buckets), and
``warm_up`` compiles all of them, so serving compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from jaxllm import kv_cache, padding
from jaxllm.kv_cache import KVCache
from jaxllm.request import Request
from jaxllm.request_output import RequestOutput
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import SamplingArrays, SamplingParams, sample
from jaxllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # B: requests decoded together
    max_seq_len: int = 1024  # S: prompt + output tokens per request
    max_prompt_len: int | None = None  # longest prompt; default max_seq_len - 1
    min_bucket: int = padding.MIN_BUCKET
    steps_per_call: int = 1  # decode steps per jitted generate call
    max_in_flight: int = 2  # generate calls dispatched ahead of the detokenizer
    prefill_batch: int = 8  # most waiting prompts of one bucket prefilled in one call
    prefill_tokens: int = 512  # padded tokens a batched prefill call may hold
    min_attend_len: int = 256  # shortest cache prefix a decode step reads (powers of 2 up)
    kv_cache_dtype: str | None = None  # None: the model's dtype; "int8": quantized cache

    def __post_init__(self):
        kv_cache.check_dtype(self.kv_cache_dtype)
        if min(self.max_slots, self.steps_per_call, self.prefill_batch, self.prefill_tokens) < 1:
            raise ValueError(f"invalid engine config {self}")
        if self.max_seq_len < 2:
            raise ValueError(f"invalid engine config {self}")
        if not 1 <= self.prompt_limit < self.max_seq_len:
            raise ValueError("max_prompt_len must be in [1, max_seq_len)")

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_len or self.max_seq_len - 1

    @property
    def buckets(self) -> tuple[int, ...]:
        return padding.prefill_buckets(self.prompt_limit, self.min_bucket)

    def prefill_rows(self, bucket: int) -> int:
        """Prompts of ``bucket`` prefilled together when several wait (one alone runs as 1)."""
        return padding.prefill_rows(
            bucket, min(self.prefill_batch, self.max_slots), self.prefill_tokens
        )

    @property
    def prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        """Every ``(rows, bucket)`` prompt batch that is compiled."""
        return tuple(
            (rows, bucket)
            for bucket in self.buckets
            for rows in sorted({1, self.prefill_rows(bucket)})
        )

    @property
    def attend_lengths(self) -> tuple[int, ...]:
        """Cache prefixes decode steps are compiled for."""
        return padding.attend_lengths(self.max_seq_len, self.min_attend_len)

    def attend_len_for(self, end: int) -> int:
        """The shortest compiled prefix holding positions below ``end``."""
        return next((n for n in self.attend_lengths if n >= end), self.max_seq_len)

    @property
    def start_rows(self) -> int:
        """Rows of the first-token sampler: the widest prefill, so it compiles once."""
        return max(rows for rows, _ in self.prefill_shapes)


class DecodeState(NamedTuple):
    """Everything the decode step reads and writes, one row per slot; lives on the device."""

    cache: KVCache
    tokens: Int[Array, " B"]  # each slot's latest token, the next step's input
    positions: Int[Array, " B"]  # the position that token takes
    steps: Int[Array, " B"]  # index of the next generated token (seeds the sampler)
    sampling: SamplingArrays


class _Handoff(NamedTuple):
    """Tokens of one device call and, per row, the request they belong to."""

    tokens: jax.Array  # [steps, rows], or [rows] for a prefill
    owners: Sequence[tuple[int, Request]]  # (row, request)


class PrefillBatch(NamedTuple):
    """Host arrays for one prefill call of ``rows`` prompts padded to one bucket, and for the
    first-token sampler, whose row count is ``start_rows``. Padding rows name the slot
    ``max_slots``, which every device-side write drops."""

    tokens: np.ndarray  # [rows, bucket]
    lengths: np.ndarray  # [rows]
    slots: np.ndarray  # [rows]
    lengths_padded: np.ndarray  # [start_rows]
    slots_padded: np.ndarray  # [start_rows]
    sampling: SamplingArrays  # [start_rows]

    @classmethod
    def of(
        cls, chunk: Sequence[tuple[int, Request]], rows: int, bucket: int, config: EngineConfig
    ) -> PrefillBatch:
        width = config.start_rows
        tokens = np.zeros((rows, bucket), np.int32)
        lengths = np.ones((width,), np.int32)
        slots = np.full((width,), config.max_slots, np.int32)
        params = [SamplingParams(temperature=0.0)] * width
        seeds = [0] * width
        for row, (slot, request) in enumerate(chunk):
            ids = request.prompt_ids
            tokens[row, : len(ids)] = ids
            lengths[row], slots[row] = len(ids), slot
            params[row], seeds[row] = request.output.params, request.seed
        sampling = SamplingArrays.from_params(params, seeds)
        return cls(tokens, lengths[:rows], slots[:rows], lengths, slots, sampling)

    @classmethod
    def empty(cls, rows: int, bucket: int, config: EngineConfig) -> PrefillBatch:
        """All padding: compiles a shape without touching any slot."""
        return cls.of([], rows, bucket, config)


class Mirror(Protocol):
    """Told each device call's arguments before the engine makes it, so that other processes
    of a multi-host mesh can make the same call (``jaxllm.lockstep.Leader``)."""

    def prefill(self, batch: PrefillBatch) -> None: ...

    def generate(self, attend_len: int) -> None: ...


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self._state = self._initial_state()
        # Every step returns the state with exactly the shardings it came in with, so warm-up
        # and serving hit the same compiled programs (a fresh numpy state or an XLA-chosen
        # output layout would each be a new cache key: a compile in the middle of serving).
        state_shardings = jax.tree.map(lambda x: x.sharding, self._state)
        # Sampled tokens are replicated: on a mesh spanning several processes the host can
        # only read an array whose every element is on its own devices.
        replicated = NamedSharding(runner.spec.mesh, PartitionSpec())
        keep = (state_shardings, replicated)
        jit = functools.partial(jax.jit, donate_argnames="state", out_shardings=keep)
        # Each prefill shape is its own program; pinning the logits' layout keeps the one
        # first-token sampler they all feed from seeing a new input sharding (a recompile).
        self._prefill_insert = jax.jit(
            self._prefill_insert_impl,
            donate_argnames="state",
            out_shardings=(state_shardings, replicated),
        )
        self._start_slots = jit(self._start_slots_impl)
        self._generate = jit(self._generate_impl, static_argnames="attend_len")
        self._slots: list[Request | None] = [None] * config.max_slots
        # Host copy of each slot's next decode position, to pick the attention prefix.
        self._next_position = [0] * config.max_slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._handoff: queue.Queue[_Handoff | None] = queue.Queue(config.max_in_flight)
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.failure: BaseException | None = None
        self.mirror: Mirror | None = None  # set on the leader of a multi-host server
        # (rows, bucket) -> prefill calls of that shape: what batching achieved, for metrics.
        self.prefill_calls: collections.Counter[tuple[int, int]] = collections.Counter()

    # -- public API -------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> Engine:
        if warm_up:
            self.warm_up()
        self._threads = [
            threading.Thread(target=self._engine_loop, name="jaxllm-engine", daemon=True),
            threading.Thread(target=self._detokenize_loop, name="jaxllm-detok", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._fail(RuntimeError("engine stopped"), record=False)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_update: Callable[[], None] | None = None,
    ) -> Request:
        """Queues a request; raises ValueError at once for input that cannot be served.
        ``on_update`` is called (from an engine thread) after each new token and at the end."""
        prompt_ids = self.check(prompt_ids, params)
        if self.failure is not None:
            raise RuntimeError(f"engine failed: {self.failure}")
        if self._stopping:
            raise RuntimeError("engine is stopped")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        output = RequestOutput(self.tokenizer, params, prompt_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, output, seed, on_update)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify_all()
        return request

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        limit, context = self.config.prompt_limit, self.config.max_seq_len
        vocab = self.runner.config.vocab_size
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) > limit:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than the maximum of {limit}; "
                "prompts are never truncated"
            )
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + params.max_tokens > context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {context} tokens; lower max_tokens to at most {context - len(ids)}"
            )
        return ids

    @property
    def slots_in_use(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the decode KV cache (all slots, with an int8 cache's scales)."""
        return self._state.cache.nbytes

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's B x S positions that running requests hold."""
        held = sum(
            len(r.prompt_ids) + len(r.output.token_ids) for r in list(self._slots) if r is not None
        )
        return held / (self.config.max_slots * self.config.max_seq_len)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Blocks until no request is queued or holds a slot (finished slots are freed)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._waiting or any(self._slots):
                self._free_finished_slots()
                if not (self._waiting or any(self._slots)):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine still busy after {timeout} s")
                self._wake.wait(0.01)

    def warm_up(self) -> None:
        """Compiles every prefill shape, the slot start and the decode step by running each
        once (into the first slots, which are reset afterwards)."""
        start = time.perf_counter()
        for rows, bucket in self.config.prefill_shapes:
            batch = PrefillBatch.empty(rows, bucket, self.config)
            self._state, logits = self._prefill_insert(
                self.runner.params, self._state, batch.tokens, batch.lengths, batch.slots
            )
        self._state, first = self._start_slots(
            self._state, logits, batch.lengths_padded, batch.slots_padded, batch.sampling
        )
        for attend_len in self.config.attend_lengths:
            self._state, tokens = self._generate(self.runner.params, self._state, attend_len)
        np.asarray(first), np.asarray(tokens)
        self._state = self._initial_state()
        log.info(
            "warm-up compiled %d prefill shapes and %d decode steps in %.1f s",
            len(self.config.prefill_shapes),
            len(self.config.attend_lengths),
            time.perf_counter() - start,
        )

    def abort(self, error: BaseException) -> None:
        """Fails every queued and running request with ``error`` and refuses new ones (a lost
        peer process: the device loop cannot go on)."""
        self._fail(error)

    # -- device calls: the engine thread makes them; a multi-host follower replays them ----

    def run_prefill(self, batch: PrefillBatch) -> Int[Array, " R"]:
        """One prefill call and the first-token sampler; returns the ``start_rows`` tokens."""
        if self.mirror is not None:
            self.mirror.prefill(batch)
        self._state, logits = self._prefill_insert(
            self.runner.params, self._state, batch.tokens, batch.lengths, batch.slots
        )
        self._state, first = self._start_slots(
            self._state, logits, batch.lengths_padded, batch.slots_padded, batch.sampling
        )
        return first

    def run_generate(self, attend_len: int) -> Int[Array, "n B"]:
        """One generate call over every slot; returns the tokens ``[steps_per_call, B]``."""
        if self.mirror is not None:
            self.mirror.generate(attend_len)
        self._state, tokens = self._generate(self.runner.params, self._state, attend_len)
        return tokens

    # -- device steps (pure, jitted) ----------------------------------------------------

    def _initial_state(self) -> DecodeState:
        B = self.config.max_slots
        replicated = NamedSharding(self.runner.spec.mesh, PartitionSpec())
        rows = [jax.device_put(np.zeros((B,), np.int32), replicated) for _ in range(3)]
        return DecodeState(
            cache=self.runner.new_cache(B, self.config.max_seq_len, self.config.kv_cache_dtype),
            tokens=rows[0],
            positions=rows[1],
            steps=rows[2],
            sampling=jax.device_put(SamplingArrays.neutral(B), replicated),
        )

    def _prefill_insert_impl(
        self,
        params,
        state: DecodeState,
        tokens: Int[Array, "P T"],
        lengths: Int[Array, " P"],
        slots: Int[Array, " P"],
    ):
        """Runs ``P`` padded prompts of one bucket and writes each one's keys/values into its
        slot (a slot index of ``max_slots`` marks a padding row, whose write is dropped).
        Returns the logits ``[start_rows, V]`` that predict each prompt's first token, padded
        to the sampler's fixed row count."""
        cfg = self.runner.config
        rows, bucket = tokens.shape
        local = kv_cache.empty(
            cfg.num_layers, rows, bucket, cfg.num_kv_heads, cfg.head_dim, state.cache.keys[0].dtype
        )
        positions = jnp.broadcast_to(jnp.arange(bucket), (rows, bucket))
        logits, local = self.runner._forward_at(params, tokens, positions, local, lengths - 1)
        cache = kv_cache.insert(state.cache, local, slots)
        logits = jnp.pad(logits, ((0, self.config.start_rows - rows), (0, 0)))
        return state._replace(cache=cache), logits

    def _start_slots_impl(
        self,
        state: DecodeState,
        logits: Float[Array, "R V"],
        lengths: Int[Array, " R"],
        slots: Int[Array, " R"],
        sampling: SamplingArrays,
    ):
        """Samples prefilled requests' first tokens and arms their slots for decoding (rows
        whose slot is ``max_slots`` are padding and change nothing).

        Kept apart from the per-shape prefill so the sampler compiles once, not per bucket.
        """
        first = sample(logits, sampling, jnp.zeros(slots.shape, jnp.int32))

        def arm(column, values):
            return column.at[slots].set(values, mode="drop")

        state = DecodeState(
            cache=state.cache,
            tokens=arm(state.tokens, first),
            positions=arm(state.positions, lengths),
            steps=arm(state.steps, jnp.ones_like(lengths)),
            sampling=jax.tree.map(arm, state.sampling, sampling),
        )
        return state, first

    def _generate_impl(self, params, state: DecodeState, attend_len: int):
        """``steps_per_call`` decode steps over every slot -> new state, tokens ``[n, B]``.
        Attention reads cache positions below ``attend_len`` (static), which must cover every
        running request's positions in this call."""

        def step(state: DecodeState, _):
            last = jnp.zeros_like(state.tokens)
            tokens, positions = state.tokens[:, None], state.positions[:, None]
            logits, cache = self.runner._forward_at(
                params, tokens, positions, state.cache, last, attend_len
            )
            tokens = sample(logits, state.sampling, state.steps)
            new = DecodeState(cache, tokens, state.positions + 1, state.steps + 1, state.sampling)
            return new, tokens

        return jax.lax.scan(step, state, None, length=self.config.steps_per_call)

    # -- host loops ---------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._free_finished_slots()
                    while not self._stopping and not self._waiting and not any(self._slots):
                        self._wake.wait(0.05)
                        self._free_finished_slots()
                    if self._stopping:
                        break
                    admitted = self._take_admissions()
                self._prefill(admitted)
                owners = [(row, r) for row, r in enumerate(self._slots) if r is not None]
                if owners:
                    self._decode(owners)
        except BaseException as e:  # a device or compiler failure: fail requests, never hang
            log.exception("engine loop failed")
            self._fail(e)
        finally:
            self._handoff.put(None)

    def _decode(self, owners: list[tuple[int, Request]]) -> None:
        """Dispatches one generate call over every slot; its tokens go to the detokenizer."""
        steps = self.config.steps_per_call
        # Positions this call writes end below end + steps; finished rows need not fit.
        end = max((self._next_position[row] for row, r in owners if not r.done), default=0)
        attend_len = self.config.attend_len_for(end + steps)
        for row, _ in owners:
            self._next_position[row] += steps
        tokens = self.run_generate(attend_len)
        tokens.copy_to_host_async()
        self._handoff.put(_Handoff(tokens, owners))

    def _take_admissions(self) -> list[tuple[int, Request]]:
        admitted = []
        free = [i for i, r in enumerate(self._slots) if r is None]
        while free and self._waiting:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            slot = free.pop(0)
            self._slots[slot] = request
            admitted.append((slot, request))
        return admitted

    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """Prefills newly admitted requests, several prompts of one bucket per call."""
        by_bucket: dict[int, list[tuple[int, Request]]] = {}
        for slot, request in admitted:
            bucket = padding.bucket_for(len(request.prompt_ids), self.config.buckets)
            by_bucket.setdefault(bucket, []).append((slot, request))
        for bucket, group in by_bucket.items():
            rows = self.config.prefill_rows(bucket)
            for i in range(0, len(group), rows):
                chunk = group[i : i + rows]
                shape = (1 if len(chunk) == 1 else rows, bucket)
                self.prefill_calls[shape] += 1
                batch = PrefillBatch.of(chunk, shape[0], bucket, self.config)
                first = self.run_prefill(batch)
                first.copy_to_host_async()
                self._handoff.put(_Handoff(first, [(row, r) for row, (_, r) in enumerate(chunk)]))
                for slot, request in chunk:
                    self._next_position[slot] = len(request.prompt_ids)

    def _free_finished_slots(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.done:
                self._slots[slot] = None

    def _detokenize_loop(self) -> None:
        while (item := self._handoff.get()) is not None:
            try:
                tokens = np.asarray(item.tokens)
                tokens = tokens.reshape(-1, tokens.shape[-1])  # on the host: no device op
            except BaseException as e:
                self._fail(e)
                continue
            for row_tokens in tokens:
                for row, request in item.owners:
                    if not request.done:
                        request._push(int(row_tokens[row]))
            with self._wake:
                self._wake.notify_all()

    def _fail(self, error: BaseException, record: bool = True) -> None:
        """Ends every queued and running request with ``error``; they never hang."""
        if record:
            self.failure = error
        with self._wake:
            pending = list(self._waiting) + [r for r in self._slots if r is not None]
            self._waiting.clear()
        for request in pending:
            request._finish("error", error)
