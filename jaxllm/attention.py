"""Attention: the one place that decides how queries read keys and values.

Two functions, both pure JAX (a TPU/GPU kernel, e.g. Pallas ragged paged attention, can take
``paged``'s place behind the same signature):

- ``paged``: rows of queries (a decoding sequence's one token, or a chunk of a prompt) read
  their own sequence's pages of the pool, and only those. Rows are taken in groups of a
  few; a group's pages are visited in blocks of ``block_pages`` pages by a loop whose trip
  count is a traced value (the blocks its longest row needs), so the compiled program does
  not depend on sequence lengths, a short row grouped apart from a long one (the engine
  orders decode rows by length) reads no more than its own length, and softmax is
  computed online (running max and sum); with a sliding window, the loop starts at the
  first block inside the window, so pages older than the window are never read. A block a
  row does not need is fully masked and leaves its running values bit-for-bit unchanged,
  so a row's result does not depend on what else is in the step.
- ``causal``: plain causal attention over the tokens given (scoring, training, pruning).

Queries use grouped-query attention as a reshape ``[K, G]`` of the query heads, never a
repeat of keys and values. Scores and softmax are float32. Shapes use ``jaxllm.config``'s
glossary; ``R`` is rows, ``C`` queries per row, ``S`` keys in a block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm import kv_cache
from jaxllm.kv_cache import KVPool

# Masked scores are -inf; the running max starts at the most negative finite float, so a
# row whose first blocks are all masked (sliding windows) keeps exp(m - m) = 1, never NaN.
_NEG = float(jnp.finfo(jnp.float32).min)
# A layer's sliding window: None (none), a Python int shared by every layer, or, where the
# layers of one model differ (some Qwen2 configs), the scanned layer's own value as a traced
# int32 scalar; NO_WINDOW stands for "none" in such a per-layer array.
Window = int | Int[Array, ""] | None
NO_WINDOW = 2**30


class RowGroup(NamedTuple):
    """Rows of ``C`` queries each, every row reading its own sequence's pages."""

    page_table: Int[Array, "R Pmax"]  # the row's pages, in position order (padding: 0)
    kv_len: Int[Array, " R"]  # keys at positions below this are the sequence's
    positions: Int[Array, "R C"]  # each query's position (causal mask)
    # Blocks of pages the longest row of each group needs (its loop's trip count; 0 for a
    # group of padding rows). Groups are R // Gr consecutive rows.
    group_blocks: Int[Array, " Gr"]


class PagedBatch(NamedTuple):
    """Per-step metadata every layer shares: where each token's key/value is written, and
    the two row groups that read: decode rows (one query, or a token and the drafted tokens
    it verifies) and prefill rows (a chunk)."""

    slots: Int[Array, " T"]  # flat pool slot of each token (past the end: padding, dropped)
    decode: RowGroup  # the step's first Sd * Q tokens, Q per row
    prefill: RowGroup  # the next Sp * C tokens, C per row


def paged(
    q: Float[Array, "R C N H"],
    rows: RowGroup,
    pool: KVPool,
    layer: Int[Array, ""] | int,
    window: Window,
    block_pages: int,
) -> Float[Array, "R C N H"]:
    """Each row's queries attend to its sequence's keys in layer ``layer`` of the pool at
    positions ``<=`` their own (and ``< kv_len``), within ``window`` positions when given."""
    R = q.shape[0]
    groups = rows.group_blocks.shape[0]
    if groups == 0:
        return q
    size = R // groups

    def group(j, out):
        def rows_of(x):
            return jax.lax.dynamic_slice_in_dim(x, j * size, size, 0)

        sub = RowGroup(*(rows_of(x) for x in rows[:3]), rows.group_blocks[j])
        attended = _attend(rows_of(q), sub, pool, layer, window, block_pages)
        return jax.lax.dynamic_update_slice_in_dim(out, attended, j * size, 0)

    if groups == 1:
        return group(0, q)
    return jax.lax.fori_loop(0, groups, group, jnp.zeros_like(q))


def _attend(
    q: Float[Array, "R C N H"],
    rows: RowGroup,  # one group: group_blocks is a scalar
    pool: KVPool,
    layer: Int[Array, ""] | int,
    window: Window,
    block_pages: int,
) -> Float[Array, "R C N H"]:
    R, C, N, H = q.shape
    _, page_size, K, _ = pool.layer_shape
    G = N // K
    S = block_pages * page_size
    # [R, C, K, G, H]: each key/value head serves a group of G query heads.
    q = q.reshape(R, C, K, G, H)
    positions = rows.positions[:, :, None]  # [R, C, 1]

    def gather(buffer, ids):  # [R, block_pages] page ids of this layer -> [R, S, ...]
        pages = kv_cache.read(buffer, layer, ids)  # [R, block_pages, page_size, ...]
        return pages.reshape(R, S, *pages.shape[3:])

    def block(i, carry):
        m, total, acc = carry  # [R, K, G, C], same, [R, K, G, C, H]
        ids = jax.lax.dynamic_slice_in_dim(rows.page_table, i * block_pages, block_pages, 1)
        keys = gather(pool.keys, ids).astype(q.dtype)  # [R, S, K, H]
        scores = jnp.einsum("RCKGH,RSKH->RKGCS", q, keys, preferred_element_type=jnp.float32)
        scores = scores * H**-0.5
        if pool.quantized:  # int8: scale each key's scores, not its bytes
            key_scales = gather(pool.key_scales, ids)  # [R, S, K]
            scores = scores * jnp.swapaxes(key_scales, 1, 2)[:, :, None, None, :]
        key_pos = (i * S + jnp.arange(S))[None, None, :]  # [1, 1, S]
        visible = (key_pos <= positions) & (key_pos < rows.kv_len[:, None, None])  # [R, C, S]
        if window is not None:
            visible &= key_pos > positions - window
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        probs = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        total = total * alpha + jnp.sum(probs, axis=-1)
        if pool.quantized:
            value_scales = gather(pool.value_scales, ids)
            probs = probs * jnp.swapaxes(value_scales, 1, 2)[:, :, None, None, :]
        values = gather(pool.values, ids).astype(q.dtype)
        update = jnp.einsum(
            "RKGCS,RSKH->RKGCH", probs.astype(q.dtype), values, preferred_element_type=jnp.float32
        )
        return m_new, total, acc * alpha[..., None] + update

    init = (
        jnp.full((R, K, G, C), _NEG, jnp.float32),
        jnp.zeros((R, K, G, C), jnp.float32),
        jnp.zeros((R, K, G, C, H), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(_first_block(rows, window, S), rows.group_blocks, block, init)
    # A real row always sees one key (total >= 1); a padding group ran no block (total 0).
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [R, K, G, C, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(R, C, N, H).astype(q.dtype)


def _first_block(rows: RowGroup, window: Window, S: int) -> Int[Array, ""] | int:
    """The first block of ``S`` keys that a query of the group can see: 0 without a window;
    with one, the block of the oldest key inside the window of the group's earliest query
    (a row's first query), so a sliding-window layer reads its window and nothing before it.
    Padding rows (``kv_len`` 0) do not count."""
    if window is None:
        return 0
    oldest = rows.positions[:, 0] - window + 1  # [R]
    oldest = jnp.min(jnp.where(rows.kv_len > 0, oldest, jnp.iinfo(jnp.int32).max))
    return jnp.minimum(jnp.maximum(oldest, 0) // S, rows.group_blocks)


def causal(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
    window: Window,
    kv_dtype=None,
) -> Float[Array, "B T N H"]:
    """Causal attention of the tokens over themselves. ``kv_dtype="int8"`` rounds keys and
    values as an int8 pool stores them, so scores show the pool's rounding."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scale_k = scale_v = None
    if kv_cache.is_int8(kv_dtype):
        k, scale_k = kv_cache.quantize_heads(k)  # [B, T, K, H] int8, [B, T, K]
        v, scale_v = kv_cache.quantize_heads(v)
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = scores * H**-0.5
    if scale_k is not None:
        scores = scores * jnp.swapaxes(scale_k, 1, 2)[:, :, None, None, :]
    visible = positions[:, None, :] <= positions[:, :, None]  # [B, T, S]
    if window is not None:
        visible &= positions[:, None, :] > positions[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if scale_v is not None:
        probs = probs * jnp.swapaxes(scale_v, 1, 2)[:, :, None, None, :]
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH",
        probs.astype(q.dtype),
        v.astype(q.dtype),
        preferred_element_type=jnp.float32,
    )
    return out.astype(q.dtype).reshape(B, T, N, H)
