"""The paged key/value pool on the device: keys and values in ``[P, page_size, K, H]`` pages
for each of ``L`` layers.

A sequence's keys and values live in fixed-size pages of one pool shared by every request
(``jaxllm.kv_pages`` decides which pages are whose). Position ``p`` of a sequence with page
table ``t`` is stored at page ``t[p // page_size]``, offset ``p % page_size``; a write names
that as one flat slot ``page * page_size + offset``, so a whole step's new tokens scatter
with one indexed update per layer, in place when the pool is donated. Two layouts, following
the model's (``jaxllm.model``): a scanned model's pool is one ``[L, ...]`` array per buffer,
carried through the scan, layer ``l`` writing and reading ``pool[l]`` by a traced index; an
unrolled model's is a tuple of per-layer arrays (measured on CPU: a static-index update of
one stacked array made XLA copy the whole pool in every layer, 18x slower decode steps).
``read`` and ``write`` hide the difference. Pages come next, so gathering a sequence's pages
copies contiguous ``page_size * K * H`` blocks; KV heads are split over the ``tensor`` mesh
axis by the cache rules, as the attention heads are.

An int8 pool stores each token's key (and value) of each head as int8 with one float32
scale, ``max|x| / 127`` over the head dim, in ``[L, P, page_size, K]`` buffers beside it: a
token takes ``(H + 4) / 4H`` of the float32 bytes (0.27 at H = 64). Attention applies the
scales to scores and probabilities rather than dequantizing the pages.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from sharding import ShardingRules

POOL_AXES = ("cache_layers", "cache_pages", "cache_sequence", "cache_kv_heads", "cache_head_dim")
SCALE_AXES = POOL_AXES[:4]
DTYPES = ("int8",)  # besides the model's own float dtype


def check_dtype(dtype: str | None) -> str | None:
    """A cache dtype option: None (the model's dtype) or one of ``DTYPES``."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return dtype


def is_int8(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) == jnp.int8


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """Device bytes one token's keys and values take in every layer (scales included)."""
    if is_int8(dtype):
        per_head = head_dim + 4
    else:
        per_head = head_dim * jnp.dtype(dtype).itemsize
    return 2 * num_layers * num_kv_heads * per_head


# One buffer of a pool: stacked [L, P, page, ...], or a tuple of L [P, page, ...] arrays.
Buffer = Array | tuple[Array, ...]


class KVPool(NamedTuple):
    keys: Buffer  # [L, P, page_size, K, H] or L x [P, page_size, K, H]
    values: Buffer
    # int8 pools only: one scale per (layer, page, offset, head); None for a float pool.
    key_scales: Buffer | None = None
    value_scales: Buffer | None = None

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    @property
    def stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """``(P, page_size, K, H)``: one layer's keys."""
        return tuple(self.keys.shape[1:] if self.stacked else self.keys[0].shape)

    @property
    def num_pages(self) -> int:
        return self.layer_shape[0]

    @property
    def page_size(self) -> int:
        return self.layer_shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @staticmethod
    def create(
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype,
        mesh: Mesh,
        rules: ShardingRules,
        stacked: bool = True,
    ) -> KVPool:
        """Zeros laid out by the cache rules, allocated directly in their shards; ``dtype``
        ``"int8"`` makes a quantized pool; ``stacked``: one array per buffer, else one per
        layer."""
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if not stacked:
            shape = shape[1:]
        axes = POOL_AXES if stacked else POOL_AXES[1:]
        copies = 1 if stacked else num_layers

        def buffers(axes, shape, dtype):
            sharding = rules.sharding(axes, shape, mesh)
            if stacked:
                return sharding, lambda: jnp.zeros(shape, dtype)
            return (sharding,) * copies, lambda: tuple(
                jnp.zeros(shape, dtype) for _ in range(copies)
            )

        parts = [buffers(axes, shape, jnp.int8 if is_int8(dtype) else dtype)] * 2
        if is_int8(dtype):
            parts += [buffers(axes[:-1], shape[:-1], jnp.float32)] * 2
        shardings = KVPool(*(sharding for sharding, _ in parts))
        return jax.jit(lambda: KVPool(*(make() for _, make in parts)), out_shardings=shardings)()


def write(
    pool: KVPool,
    layer: Int[Array, ""] | int,
    new_keys: Float[Array, "T K H"],
    new_values: Float[Array, "T K H"],
    slots: Int[Array, " T"],
) -> KVPool:
    """Stores token t of layer ``layer`` (a static int for a per-layer pool) at flat slot
    ``slots[t]`` (page * page_size + offset), quantized for an int8 pool; a slot past the
    pool's end (padding tokens) is dropped."""
    P, page = pool.layer_shape[:2]

    def put(buffer, new):
        if isinstance(buffer, tuple):
            one = buffer[layer]
            flat = one.reshape(P * page, *one.shape[2:])
            flat = flat.at[slots].set(new.astype(one.dtype), mode="drop")
            return (*buffer[:layer], flat.reshape(one.shape), *buffer[layer + 1 :])
        flat = buffer.reshape(buffer.shape[0], P * page, *buffer.shape[3:])
        flat = flat.at[layer, slots].set(new.astype(buffer.dtype), mode="drop")
        return flat.reshape(buffer.shape)

    if not pool.quantized:
        return KVPool(put(pool.keys, new_keys), put(pool.values, new_values))
    qk, sk = quantize_heads(new_keys)
    qv, sv = quantize_heads(new_values)
    return KVPool(
        put(pool.keys, qk),
        put(pool.values, qv),
        put(pool.key_scales, sk),
        put(pool.value_scales, sv),
    )


def read(buffer: Buffer, layer: Int[Array, ""] | int, pages: Int[Array, ...]) -> Array:
    """Layer ``layer``'s ``pages`` of one pool buffer: ``[*pages.shape, page_size, ...]``."""
    if isinstance(buffer, tuple):
        return buffer[layer][pages]
    return buffer[layer, pages]


def quantize_heads(x: Float[Array, "... H"]) -> tuple[Array, Array]:
    """int8 values and one float32 scale per vector over the last (head) dim."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale
