"""One engine step: the host arrays that describe it, and the jitted function that runs it.

A step computes ``T = Sd + Sp * C`` tokens flattened into one array: first one token for
each of ``Sd`` decode rows, then ``C`` (``EngineConfig.chunk``) tokens for each of ``Sp``
prefill rows (a chunk of one prompt each, padded). The matmuls run over all ``T`` tokens
together; attention reads each row's own pages (``jaxllm.attention.paged``); the last real
token of every row that ends a sequence's known tokens is sampled on the device. ``Sd`` and
``Sp`` are padded to ``EngineConfig``'s buckets: each (Sd, Sp) is one compiled program,
and nothing else about a step (sequence lengths, pages) changes its shape.
"""

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
from jaxllm.scheduler import StepPlan

_GREEDY = SamplingParams(temperature=0.0)
# Decode rows that share one attention loop. Rows are independent, so a group is only a
# trade: fewer (small) loops against short rows looping as long as the group's longest.
# Prefill rows (a chunk of queries each) loop alone.
DECODE_GROUP = 8


def decode_group(rows: int) -> int:
    return math.gcd(rows, DECODE_GROUP)


class StepInput(NamedTuple):
    """Host (numpy) arrays of one step; R = Sd + Sp rows, T = Sd + Sp * C tokens."""

    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] flat pool slot (page * page_size + offset); padding: past the end
    decode_pages: np.ndarray  # [Sd, Pmax]
    decode_kv_len: np.ndarray  # [Sd]
    decode_blocks: np.ndarray  # [Sd // g] attention blocks of each group of g decode rows
    prefill_pages: np.ndarray  # [Sp, Pmax]
    prefill_kv_len: np.ndarray  # [Sp]
    prefill_blocks: np.ndarray  # [Sp] attention blocks of each prefill row
    logit_index: np.ndarray  # [R] the token whose hidden state each row samples from
    sample_step: np.ndarray  # [Rs] index of the token being generated (seeds the draw)
    sampling: SamplingArrays  # [Rs]: R rows padded to a sampler bucket

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.decode_kv_len), len(self.prefill_kv_len)


def build(
    plan: StepPlan, config: EngineConfig, num_pages: int, shape: tuple[int, int] | None = None
) -> StepInput:
    """The arrays for ``plan``, padded to its (Sd, Sp) bucket (or to ``shape``). A
    sequence's ``payload`` is the engine's request (``output.params``, ``seed``)."""
    Sd, Sp = shape or (
        padding.bucket_for(len(plan.decodes), config.decode_buckets),
        padding.bucket_for(len(plan.prefills), config.prefill_buckets),
    )
    C, size, width = config.chunk, config.page_size, config.max_pages_per_seq
    T, R = Sd + Sp * C, Sd + Sp
    Rs = padding.bucket_for(R, config.sampler_rows)
    dropped = num_pages * size
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, dropped, np.int32)
    pages = np.zeros((R, width), np.int32)
    kv_len = np.ones(R, np.int32)
    # Padding rows sample from a token of their own; their results are never read.
    logit_index = np.concatenate([np.arange(Sd), Sd + C * np.arange(Sp)]).astype(np.int32)
    sample_step = np.zeros(Rs, np.int32)
    params = [_GREEDY] * Rs
    seeds = [0] * Rs

    def place(row: int, seq, start: int, length: int, first: int) -> None:
        """Row ``row`` computes ``seq.tokens[start : start + length]`` as flat tokens from
        ``first``; its padding tokens repeat the last position (they see real keys)."""
        span = np.arange(start, start + length)
        # Pages given back out of a sliding window (scheduler.FREED) are never read: any id.
        table = np.maximum(np.asarray(seq.pages, np.int32), 0)
        tokens[first : first + length] = seq.tokens[start : start + length]
        positions[first : first + length] = span
        slots[first : first + length] = table[span // size] * size + span % size
        pages[row, : len(table)] = table
        kv_len[row] = start + length
        logit_index[row] = first + length - 1
        sample_step[row] = seq.num_generated
        params[row], seeds[row] = seq.payload.output.params, seq.payload.seed

    for row, seq in enumerate(plan.decodes):
        place(row, seq, seq.computed, 1, row)
    for i, chunk in enumerate(plan.prefills):
        first = Sd + i * C
        place(Sd + i, chunk.seq, chunk.start, chunk.length, first)
        positions[first + chunk.length : first + C] = chunk.start + chunk.length - 1

    # Attention blocks each group of rows loops over: its longest real row's (padding: 0).
    # The scheduler lists decodes longest first, so a group's rows have similar lengths.
    needed = -(-kv_len // config.attention_block)
    needed[len(plan.decodes) : Sd] = 0
    needed[Sd + len(plan.prefills) :] = 0
    size = decode_group(Sd)
    decode_blocks = needed[:Sd].reshape(Sd // size, size).max(axis=1, initial=0)

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


def padding_only(shape: tuple[int, int], config: EngineConfig, num_pages: int) -> StepInput:
    """A step of ``shape`` that writes nothing and whose tokens are ignored (warm-up)."""
    return build(StepPlan(), config, num_pages, shape)


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
        self._sample = jax.jit(sample_with_logprobs, out_shardings=replicated)
        self._compiled: dict[str, jax.stages.Compiled] = {}

    def __call__(self, params, pool: KVPool, inp: StepInput) -> tuple[Sampled, KVPool, jax.Array]:
        """The step's draws, the updated pool, and the step's tokens routed to each expert
        of each layer (``[L, E]``; ``[L, 0]`` for a dense model)."""
        Sd, Sp = inp.shape
        model = self._compiled.get(f"model-{Sd}x{Sp}", self._model)
        sample = self._compiled.get(f"sampler-{inp.sample_step.shape[0]}", self._sample)
        logits, pool, load = model(params, pool, inp._replace(sampling=None, sample_step=None))
        return sample(logits, inp.sampling, inp.sample_step), pool, load

    def lowerings(
        self, params, pool: KVPool, inp: StepInput
    ) -> dict[str, Callable[[], jax.stages.Lowered]]:
        """The two programs a call with ``inp``'s shapes runs, by name, each as a function
        that lowers it (for compiling ahead of time at warm-up). Shapes that share a sampler
        bucket share its name."""
        Sd, Sp = inp.shape
        rows = inp.sample_step.shape[0]
        logits = jax.ShapeDtypeStruct(
            (rows, self.runner.config.vocab_size), jnp.float32, sharding=self._replicated
        )
        model_inp = inp._replace(sampling=None, sample_step=None)
        return {
            f"model-{Sd}x{Sp}": lambda: self._model.lower(params, pool, model_inp),
            f"sampler-{rows}": lambda: self._sample.lower(logits, inp.sampling, inp.sample_step),
        }

    def use(self, compiled: dict[str, jax.stages.Compiled]) -> None:
        """Calls run these executables (by ``lowerings`` name) instead of tracing the jitted
        functions (compiled at warm-up)."""
        self._compiled.update(compiled)

    def _logits(self, params, pool: KVPool, inp: StepInput):
        """Logits ``[Rs, V]`` of each row's sampled token (padding rows: zeros), the pool
        with the step's keys and values written, and the expert load of the real tokens."""
        Sd, Sp = inp.decode_kv_len.shape[0], inp.prefill_kv_len.shape[0]
        positions = inp.positions
        batch = PagedBatch(
            slots=inp.slots,
            decode=RowGroup(
                inp.decode_pages, inp.decode_kv_len, positions[:Sd, None], inp.decode_blocks
            ),
            prefill=RowGroup(
                inp.prefill_pages,
                inp.prefill_kv_len,
                positions[Sd:].reshape(Sp, self.config.chunk),
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
        rows = padding.bucket_for(Sd + Sp, self.config.sampler_rows)
        return jnp.pad(logits, ((0, rows - Sd - Sp), (0, 0))), pool, load
