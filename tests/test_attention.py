"""Paged attention on its own: each row reads only its own pages, agrees with a dense
softmax, and gives the same bits whether it runs alone or grouped with longer rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import attention
from jaxllm.attention import RowGroup
from jaxllm.kv_cache import KVPool

PAGE, BLOCK_PAGES, PAGES, K, G, H = 4, 2, 160, 2, 3, 8
BLOCK = PAGE * BLOCK_PAGES
WIDTH = 40  # page-table width: 160 positions
LAYERS, LAYER = 3, 1  # the pool stacks layers; the tests read the middle one


def pool(rng):
    keys = rng.standard_normal((LAYERS, PAGES, PAGE, K, H), dtype=np.float32)
    values = rng.standard_normal((LAYERS, PAGES, PAGE, K, H), dtype=np.float32)
    return KVPool(jnp.asarray(keys), jnp.asarray(values))


def rows(rng, lengths, C):
    """Rows whose last C queries end at their length; pages drawn at random, disjoint."""
    order = rng.permutation(PAGES)
    table = np.zeros((len(lengths), WIDTH), np.int32)
    used = 0
    for r, n in enumerate(lengths):
        count = -(-n // PAGE)
        table[r, :count] = order[used : used + count]
        used += count
    lengths = np.asarray(lengths, np.int32)
    positions = lengths[:, None] - C + np.arange(C)[None]
    return table, lengths, np.maximum(positions, 0).astype(np.int32)


def run(q, table, lengths, positions, group, pages, window=None):
    """``paged`` with rows in groups of ``group``, each looping over its longest row."""
    blocks = -(-lengths // BLOCK)
    group_blocks = blocks.reshape(-1, group).max(axis=1).astype(np.int32)
    step = RowGroup(
        jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(positions), jnp.asarray(group_blocks)
    )
    fn = jax.jit(attention.paged, static_argnames=("window", "block_pages"))
    layer = jnp.int32(LAYER)  # traced, as in the model's scan over layers
    out = fn(jnp.asarray(q), step, pages, layer, window=window, block_pages=BLOCK_PAGES)
    return np.asarray(out)


def dense(q, table, lengths, positions, pages, window=None):
    keys, values = np.asarray(pages.keys[LAYER]), np.asarray(pages.values[LAYER])
    out = np.zeros_like(q)
    for r, n in enumerate(lengths):
        slots = table[r, np.arange(n) // PAGE] * PAGE + np.arange(n) % PAGE
        k = keys.reshape(-1, K, H)[slots]  # [S, K, H]
        v = values.reshape(-1, K, H)[slots]
        for c, pos in enumerate(positions[r]):
            visible = np.arange(n) <= pos
            if window is not None:
                visible &= np.arange(n) > pos - window
            qr = q[r, c].reshape(K, G, H)
            s = np.einsum("KGH,SKH->KGS", qr, k) * H**-0.5
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[r, c] = np.einsum("KGS,SKH->KGH", p, v).reshape(K * G, H)
    return out


@pytest.mark.parametrize("C, window", [(1, None), (3, None), (1, 12)])
def test_rows_grouped_with_longer_ones_give_the_same_bits_as_alone(C, window):
    rng = np.random.default_rng(C)
    pages = pool(rng)
    # Longest first, as the scheduler orders decodes: one long row leads a group of short ones.
    lengths = [150, 9, 7, 5, 60, 58, 3, 1]
    table, lengths, positions = rows(rng, lengths, C)
    q = rng.standard_normal((len(lengths), C, K * G, H), dtype=np.float32)
    grouped = run(q, table, lengths, positions, 4, pages, window)
    np.testing.assert_allclose(
        grouped, dense(q, table, lengths, positions, pages, window), atol=2e-5
    )
    for r in range(len(lengths)):
        one = slice(r, r + 1)
        alone = run(q[one], table[one], lengths[one], positions[one], 1, pages, window)
        np.testing.assert_array_equal(grouped[one], alone)


def test_a_group_of_padding_rows_runs_no_block_and_stays_finite():
    rng = np.random.default_rng(0)
    pages = pool(rng)
    table, lengths, positions = rows(rng, [20, 3], 1)
    q = rng.standard_normal((4, 1, K * G, H), dtype=np.float32)
    table = np.concatenate([table, np.zeros((2, WIDTH), np.int32)])
    lengths = np.concatenate([lengths, [0, 0]]).astype(np.int32)  # 0 blocks for the padding
    positions = np.concatenate([positions, [[0], [0]]]).astype(np.int32)
    out = run(q, table, lengths, positions, 2, pages)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[2:], 0.0)
    np.testing.assert_allclose(
        out[:2], dense(q[:2], table[:2], lengths[:2], positions[:2], pages), atol=2e-5
    )


@pytest.mark.parametrize("C", [1, 3])
def test_a_sliding_window_reads_no_page_older_than_the_window(C):
    """Pages that lie wholly before every query's window hold NaN: had the loop read them
    (even masked), the NaN would reach the output through the value product."""
    rng = np.random.default_rng(7)
    window = 12
    table, lengths, positions = rows(rng, [150, 60], C)
    q = rng.standard_normal((2, C, K * G, H), dtype=np.float32)
    clean = pool(rng)
    keys, values = np.array(clean.keys), np.array(clean.values)
    for r in range(2):
        oldest = positions[r, 0] - window + 1
        first_block = oldest // BLOCK
        assert first_block >= 1  # something to skip
        stale = table[r, : first_block * BLOCK_PAGES]
        keys[LAYER, stale], values[LAYER, stale] = np.nan, np.nan
    poisoned = KVPool(jnp.asarray(keys), jnp.asarray(values))
    got = run(q, table, lengths, positions, 1, poisoned, window)
    np.testing.assert_array_equal(got, run(q, table, lengths, positions, 1, clean, window))
