"""One engine step: the host arrays that describe it, and the jitted function that runs it.

A step computes ``T = Sd * Q + Sp * C`` tokens flattened into one array: first ``Q`` tokens
for each of ``Sd`` decode rows (``Q = 1``; with speculative decoding, ``1 + k`` when some row
verifies drafted tokens: its newest token and the drafts, each sampled, so that the engine
keeps the drafts the samples agree with), then ``C`` (``EngineConfig.chunk``) tokens for each
of ``Sp`` prefill rows (a chunk of one prompt each, padded). The matmuls run over all ``T``
tokens together; attention reads each row's own pages (``jaxllm.attention.paged``); the last
real token of every prefill row is sampled on the device. ``Sd`` and ``Sp`` are padded to
``EngineConfig``'s buckets: each (Sd, Sp, Q) is one compiled program, and nothing else about
a step (sequence lengths, pages, how many drafts a row has) changes its shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import padding
from jaxllm.attention import PagedBatch, RowGroup
from jaxllm.engine_config import EngineConfig
from jaxllm.kv_cache import KVPool
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import Sampled, SamplingArrays, SamplingParams, sample_with_logprobs
from jaxllm.scheduler import Sequence, StepPlan
from jaxllm.structured import apply_mask, mask_words

_GREEDY = SamplingParams(temperature=0.0)
# Decode rows that share one attention loop. Rows are independent, so a group is only a
# trade: fewer (small) loops against short rows looping as long as the group's longest.
# Prefill rows (a chunk of queries each) loop alone.
DECODE_GROUP = 8


def decode_group(rows: int) -> int:
    return math.gcd(rows, DECODE_GROUP)


class StepInput(NamedTuple):
    """Host (numpy) arrays of one step: Sd decode rows of Q tokens each (one, or a token and
    the drafted tokens it verifies), Sp prefill rows of C; T = Sd * Q + Sp * C tokens. Every
    decode token and each prefill row's last token gives a logits row: R = Sd * Q + Sp."""

    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] flat pool slot (page * page_size + offset); padding: past the end
    decode_pages: np.ndarray  # [Sd, Pmax]
    decode_kv_len: np.ndarray  # [Sd]
    decode_blocks: np.ndarray  # [Sd // g] attention blocks of each group of g decode rows
    prefill_pages: np.ndarray  # [Sp, Pmax]
    prefill_kv_len: np.ndarray  # [Sp]
    prefill_blocks: np.ndarray  # [Sp] attention blocks of each prefill row
    logit_index: np.ndarray  # [R] the token whose hidden state each logits row is taken at
    sample_step: np.ndarray  # [Rs] index of the token being generated (seeds the draw)
    sampling: SamplingArrays  # [Rs]: R rows padded to a sampler bucket

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Sd, Sp, Q): what the compiled program depends on."""
        Sd, Sp = len(self.decode_kv_len), len(self.prefill_kv_len)
        return Sd, Sp, (len(self.logit_index) - Sp) // Sd


class DecodeRow(NamedTuple):
    """A decode row: ``tokens`` from position ``start`` of ``seq`` (whose pages, sampling
    parameters and seed it uses); the first is the sequence's newest token, any others
    are drafts to verify."""

    seq: Sequence
    start: int
    tokens: list[int]


def build(
    plan: StepPlan,
    config: EngineConfig,
    num_pages: int,
    shape: tuple[int, ...] | None = None,
    decode_rows: list[DecodeRow] | None = None,
    greedy: bool = False,
) -> StepInput:
    """The arrays for ``plan``, padded to its (Sd, Sp, Q) bucket (or to ``shape``; a
    two-element shape means Q = 1). Decode rows are the plan's (each sequence's newest token
    and its ``draft``) unless ``decode_rows`` are given (a draft model's steps). A sequence's
    ``payload`` is the engine's request (``output.params``, ``seed``); ``greedy`` samples every
    row by argmax instead."""
    if decode_rows is None:
        decode_rows = [
            DecodeRow(s, s.computed, [s.tokens[s.computed], *s.draft]) for s in plan.decodes
        ]
    if shape is None:
        width = max((len(row.tokens) for row in decode_rows), default=1)
        Q = 1 if width == 1 else config.verify_width
        shape = (
            padding.bucket_for(len(decode_rows), config.decode_buckets),
            padding.bucket_for(len(plan.prefills), config.prefill_buckets),
            Q,
        )
    Sd, Sp, Q = (*shape, 1)[:3]
    C, size, width = config.chunk, config.page_size, config.max_pages_per_seq
    T, R = Sd * Q + Sp * C, Sd * Q + Sp
    Rs = padding.bucket_for(R, config.sampler_rows)
    dropped = num_pages * size
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, dropped, np.int32)
    pages = np.zeros((Sd + Sp, width), np.int32)
    kv_len = np.ones(Sd + Sp, np.int32)
    # Padding rows sample from a token of their own; their results are never read.
    logit_index = np.concatenate([np.arange(Sd * Q), Sd * Q + C * np.arange(Sp)]).astype(np.int32)
    sample_step = np.zeros(Rs, np.int32)
    params = [_GREEDY] * Rs
    seeds = [0] * Rs

    def place(row: int, seq, start: int, ids: list[int], first: int, room: int) -> None:
        """Row ``row`` computes ``ids`` at positions from ``start`` as flat tokens from
        ``first``; its padding tokens (up to ``room``) repeat the last position (they see real
        keys and write nothing)."""
        span = np.arange(start, start + len(ids))
        # Pages given back out of a sliding window (scheduler.FREED) are never read: any id.
        table = np.maximum(np.asarray(seq.pages, np.int32), 0)
        end = first + len(ids)
        tokens[first:end] = ids
        positions[first:end] = span
        positions[end : first + room] = span[-1]
        slots[first:end] = table[span // size] * size + span % size
        pages[row, : len(table)] = table
        kv_len[row] = start + len(ids)

    def sample_from(index: int, seq, token: int, generated: int) -> None:
        logit_index[index] = token
        sample_step[index] = generated
        if not greedy:
            params[index], seeds[index] = seq.payload.output.params, seq.payload.seed

    for i, row in enumerate(decode_rows):
        place(i, row.seq, row.start, row.tokens, i * Q, Q)
        # Every token of a decode row is sampled: the j-th gives generated token n + j.
        for j in range(len(row.tokens)):
            sample_from(i * Q + j, row.seq, i * Q + j, row.seq.num_generated + j)
    for i, chunk in enumerate(plan.prefills):
        first = Sd * Q + i * C
        ids = chunk.seq.tokens[chunk.start : chunk.start + chunk.length]
        place(Sd + i, chunk.seq, chunk.start, ids, first, C)
        sample_from(Sd * Q + i, chunk.seq, first + chunk.length - 1, chunk.seq.num_generated)

    # Attention blocks each group of rows loops over: its longest real row's (padding: 0).
    # The scheduler lists decodes longest first, so a group's rows have similar lengths.
    needed = -(-kv_len // config.attention_block)
    needed[len(decode_rows) : Sd] = 0
    needed[Sd + len(plan.prefills) :] = 0
    group = decode_group(Sd)
    decode_blocks = needed[:Sd].reshape(Sd // group, group).max(axis=1, initial=0)

    return StepInput(
        tokens=tokens,
        positions=positions,
        slots=slots,
        decode_pages=pages[:Sd],
        decode_kv_len=kv_len[:Sd],
        decode_blocks=decode_blocks.astype(np.int32),
        prefill_pages=pages[Sd:],
        prefill_kv_len=kv_len[Sd:],
        prefill_blocks=needed[Sd:],
        logit_index=logit_index,
        sample_step=sample_step,
        sampling=SamplingArrays.from_params(params, seeds),
    )


def padding_only(shape: tuple[int, ...], config: EngineConfig, num_pages: int) -> StepInput:
    """A step of ``shape`` that writes nothing and whose tokens are ignored (warm-up)."""
    return build(StepPlan(), config, num_pages, shape)


def program_name(shape: tuple[int, int, int]) -> str:
    Sd, Sp, Q = shape
    return f"model-{Sd}x{Sp}" + (f"x{Q}" if Q > 1 else "")


class StepFunction:
    """``(params, pool, StepInput) -> (Sampled [Rs], pool)``: the model, jitted once per step
    shape with the pool donated (updated in place) and its shardings pinned, so warm-up and
    serving hit the same programs; then the sampler, jitted once per sampler bucket (it
    takes longer to compile than a small model, so it is not compiled into every step
    shape). The sampler returns the tokens and, computed in the same call only when some
    row asked (``SamplingArrays.logprobs``), their logprobs and the top alternatives
    (``jaxllm.sampling.Sampled``). Its outputs are replicated: on a mesh spanning processes
    the host can only read an array whose every element is on its own devices."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, pool: KVPool):
        self.runner, self.config = runner, config
        pool_shardings = jax.tree.map(lambda x: x.sharding, pool)
        self._replicated = replicated = NamedSharding(runner.spec.mesh, PartitionSpec())
        self._model = jax.jit(
            self._logits,
            donate_argnames="pool",
            out_shardings=(replicated, pool_shardings, replicated),
        )
        self._sample = jax.jit(_sample, out_shardings=replicated)
        self._words = mask_words(runner.config.vocab_size)
        self._free: dict[int, np.ndarray] = {}  # all-allowed masks by row count (read only)
        self._compiled: dict[str, jax.stages.Compiled] = {}

    def __call__(
        self,
        params,
        pool: KVPool,
        inp: StepInput,
        masks: Callable[[], np.ndarray | None] | None = None,
    ) -> tuple[Sampled, KVPool, jax.Array]:
        """The step's draws, the updated pool, and the step's tokens routed to each expert
        of each layer (``[L, E]``; ``[L, 0]`` for a dense model). ``masks()``, called once the
        model's call is dispatched (so the host computes it while the device runs), gives
        the tokens each sampler row may draw (``jaxllm.structured``: ``[Rs, W]`` bits), or
        None when no row is constrained (the sampler then skips masking)."""
        rows = inp.sample_step.shape[0]
        model = self._compiled.get(program_name(inp.shape), self._model)
        logits, pool, load = model(params, pool, inp._replace(sampling=None, sample_step=None))
        allowed = masks() if masks is not None else None
        constrained = allowed is not None
        if not constrained:
            allowed = self._free.get(rows)
            if allowed is None:
                allowed = self._free[rows] = np.full((rows, self._words), -1, np.int32)
                allowed.flags.writeable = False
        sample = self._compiled.get(f"sampler-{rows}", self._sample)
        sampled = sample(logits, inp.sampling, inp.sample_step, allowed, np.bool_(constrained))
        return sampled, pool, load

    def lowerings(
        self, params, pool: KVPool, inp: StepInput
    ) -> dict[str, Callable[[], jax.stages.Lowered]]:
        """The two programs a call with ``inp``'s shapes runs (the model, the sampler), by
        name, each as a function that lowers it (for compiling ahead of time at warm-up).
        Shapes that share a sampler bucket share its name."""
        rows = inp.sample_step.shape[0]
        logits = jax.ShapeDtypeStruct(
            (rows, self.runner.config.vocab_size), jnp.float32, sharding=self._replicated
        )
        masks = jax.ShapeDtypeStruct((rows, self._words), jnp.int32)
        constrained = jax.ShapeDtypeStruct((), jnp.bool_)
        model_inp = inp._replace(sampling=None, sample_step=None)
        sampling, step = inp.sampling, inp.sample_step
        return {
            program_name(inp.shape): lambda: self._model.lower(params, pool, model_inp),
            f"sampler-{rows}": lambda: self._sample.lower(
                logits, sampling, step, masks, constrained
            ),
        }

    def use(self, compiled: dict[str, jax.stages.Compiled]) -> None:
        """Calls run these executables (by ``lowerings`` name) instead of tracing the jitted
        functions (compiled at warm-up)."""
        self._compiled.update(compiled)

    def _logits(self, params, pool: KVPool, inp: StepInput):
        """Logits ``[Rs, V]`` of each row's sampled token (padding rows: zeros), the pool
        with the step's keys and values written, and the expert load of the real tokens."""
        Sd, Sp, Q = inp.shape
        positions = inp.positions
        batch = PagedBatch(
            slots=inp.slots,
            decode=RowGroup(
                inp.decode_pages,
                inp.decode_kv_len,
                positions[: Sd * Q].reshape(Sd, Q),
                inp.decode_blocks,
            ),
            prefill=RowGroup(
                inp.prefill_pages,
                inp.prefill_kv_len,
                positions[Sd * Q :].reshape(Sp, self.config.chunk),
                inp.prefill_blocks,
            ),
        )
        model = self.runner.model(params)
        # Padding tokens write to a slot past the pool's end (dropped): they are not counted.
        P, page_size = pool.layer_shape[:2]
        real = (inp.slots < P * page_size)[None]
        hidden, pool, load = model.forward(
            inp.tokens[None],
            positions[None],
            pool,
            batch,
            block_pages=self.config.block_pages,
            token_mask=real,
        )
        logits = model.logits(hidden[:, inp.logit_index])[0]  # [R, V]
        R = inp.logit_index.shape[0]
        rows = padding.bucket_for(R, self.config.sampler_rows)
        return jnp.pad(logits, ((0, rows - R), (0, 0))), pool, load


def _sample(logits, sampling: SamplingArrays, sample_step, masks, constrained) -> Sampled:
    """``sample_with_logprobs``, over the tokens ``masks`` allow when ``constrained``
    (structured output: the logprobs are those of the distribution drawn from, disallowed
    tokens -inf). One program for both: a second sampler per bucket would double the slowest
    compiles of warm-up; a step without constrained rows skips the masking (``lax.cond``)."""
    logits = jax.lax.cond(constrained, lambda: apply_mask(logits, masks), lambda: logits)
    return sample_with_logprobs(logits, sampling, sample_step)
