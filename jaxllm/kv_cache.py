"""The key/value cache: one contiguous ``[B, K, S, H]`` buffer per layer for keys and values.

Slot-major and contiguous per slot (as JetStream lays it out): cache index ``s`` holds the
token at absolute position ``s`` of the sequence in slot ``b``. Within a slot, each KV head's
positions are contiguous (``[K, S, H]``), which is the order attention reads them in: with
``[B, S, K, H]`` XLA's CPU backend transposed every layer's whole cache on every decode step
(a read and a write of the cache per layer, as much traffic as the weights at 64 slots).
Writes scatter each new token to ``[b, :, position]``, which XLA performs in place when the
cache is donated; measured here, that is far cheaper than a vmapped dynamic_update_slice over
a non-leading axis. This module is the only place that knows the layout, so a paged cache can
replace it later.

An int8 cache stores each token's key (and value) of each head as int8 with one float32
scale, ``max|x| / 127`` over the head dim, in ``[B, K, S]`` scale buffers beside it: for
head dim H a slot takes ``(H + 4) / 4H`` of the float32 bytes (0.27 at H = 64), so the same
memory holds ~3.8x the slots. Attention applies the scales to the scores and probabilities
rather than dequantizing the cache (``LayerCache`` carries them to the model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from sharding import ShardingRules

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_sequence", "cache_head_dim")
SCALE_AXES = CACHE_AXES[:3]
DTYPES = ("int8",)  # besides the model's own float dtype


def check_dtype(dtype: str | None) -> str | None:
    """A cache dtype option: None (the model's dtype) or one of ``DTYPES``."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return dtype


class LayerCache(NamedTuple):
    """One layer's cache as attention sees it; scales are None for a float cache."""

    keys: Array  # [B, K, S, H]
    values: Array
    key_scales: Float[Array, "B K S"] | None = None
    value_scales: Float[Array, "B K S"] | None = None


class KVCache(NamedTuple):
    keys: tuple[Float[Array, "B K S H"], ...]  # one per layer
    values: tuple[Float[Array, "B K S H"], ...]
    # int8 caches only: one scale per (slot, head, position); empty for a float cache.
    key_scales: tuple[Float[Array, "B K S"], ...] = ()
    value_scales: tuple[Float[Array, "B K S"], ...] = ()

    @property
    def quantized(self) -> bool:
        return bool(self.key_scales)

    def layer(self, i: int) -> LayerCache:
        if not self.quantized:
            return LayerCache(self.keys[i], self.values[i])
        return LayerCache(self.keys[i], self.values[i], self.key_scales[i], self.value_scales[i])

    @staticmethod
    def of_layers(layers: list[LayerCache]) -> KVCache:
        keys, values, key_scales, value_scales = zip(*layers, strict=True)
        if key_scales[0] is None:
            return KVCache(keys, values)
        return KVCache(keys, values, key_scales, value_scales)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @staticmethod
    def create(
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype,
        mesh: Mesh,
        rules: ShardingRules,
    ) -> KVCache:
        """Zeros laid out by the cache rules, allocated directly in their shards; ``dtype``
        ``"int8"`` makes a quantized cache."""
        shape = (batch, num_kv_heads, max_len, head_dim)
        sharding = rules.sharding(CACHE_AXES, shape, mesh)
        per_layer = (sharding,) * num_layers
        out = KVCache(per_layer, per_layer)
        if _is_int8(dtype):
            scales = (rules.sharding(SCALE_AXES, shape[:3], mesh),) * num_layers
            out = KVCache(per_layer, per_layer, scales, scales)
        make = jax.jit(
            lambda: empty(num_layers, batch, max_len, num_kv_heads, head_dim, dtype),
            out_shardings=out,
        )
        return make()


def _is_int8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def empty(
    num_layers: int,
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> KVCache:
    """A cache built inside a jitted step (a prefill's own, or a training step's), laid out
    by the cache rules when a mesh and rules are given."""
    shape = (batch, num_kv_heads, max_len, head_dim)

    def zeros(shape, dtype, axes):
        x = jnp.zeros(shape, dtype)
        if mesh is None or rules is None:
            return x
        return jax.lax.with_sharding_constraint(x, rules.sharding(axes, shape, mesh))

    def layers(shape, dtype, axes):
        return tuple(zeros(shape, dtype, axes) for _ in range(num_layers))

    if not _is_int8(dtype):
        return KVCache(layers(shape, dtype, CACHE_AXES), layers(shape, dtype, CACHE_AXES))
    return KVCache(
        layers(shape, jnp.int8, CACHE_AXES),
        layers(shape, jnp.int8, CACHE_AXES),
        layers(shape[:3], jnp.float32, SCALE_AXES),
        layers(shape[:3], jnp.float32, SCALE_AXES),
    )


def write(
    cache: LayerCache,
    new_keys: Float[Array, "B T K H"],
    new_values: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
) -> LayerCache:
    """Stores each new token at its absolute position (quantized for an int8 cache);
    positions past the end are dropped (padding of a bucketed prompt that reaches beyond
    the cache)."""
    rows = jnp.arange(cache.keys.shape[0])[:, None]
    # Indices on axes 0 and 2 around a slice: the update is laid out [B, T, K, H].
    at = (rows, slice(None), positions)

    def put(buffer, new):
        return buffer.at[at].set(new.astype(buffer.dtype), mode="drop")

    if cache.key_scales is None:
        return LayerCache(put(cache.keys, new_keys), put(cache.values, new_values))
    qk, sk = _quantize_heads(new_keys)
    qv, sv = _quantize_heads(new_values)
    return LayerCache(
        put(cache.keys, qk),
        put(cache.values, qv),
        put(cache.key_scales, sk),
        put(cache.value_scales, sv),
    )


def _quantize_heads(x: Float[Array, "B T K H"]):
    """int8 values and one float32 scale per (token, head)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0  # [B, T, K]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale


def prefix(cache: LayerCache, length: int | None) -> LayerCache:
    """The first ``length`` positions of every slot (all of them for None)."""
    if length is None or length >= cache.keys.shape[2]:
        return cache
    return LayerCache(*(x if x is None else x[:, :, :length] for x in cache))


def insert(cache: KVCache, local: KVCache, slots: Int[Array, " P"]) -> KVCache:
    """Copies each row of ``local`` (prefilled prompts, positions from 0) into its slot of
    ``cache``; a slot index past the last slot marks a padding row, whose write is dropped."""
    P, _, T, _ = local.keys[0].shape
    at = (slots[:, None], slice(None), jnp.broadcast_to(jnp.arange(T), (P, T)))

    def put(full, new):
        # [P, K, T, ...] -> [P, T, K, ...], the order of an update indexed on axes 0 and 2.
        new = jnp.swapaxes(new, 1, 2)
        return full.at[at].set(new.astype(full.dtype), mode="drop")

    return jax.tree.map(put, cache, local)
