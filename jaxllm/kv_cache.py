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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from sharding import ShardingRules

CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_sequence", "cache_head_dim")


class KVCache(NamedTuple):
    keys: tuple[Float[Array, "B K S H"], ...]  # one per layer
    values: tuple[Float[Array, "B K S H"], ...]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.keys, *self.values))

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
        """Zeros laid out by the cache rules, allocated directly in their shards."""
        shape = (batch, num_kv_heads, max_len, head_dim)
        sharding = rules.sharding(CACHE_AXES, shape, mesh)
        make = jax.jit(
            lambda: empty(num_layers, batch, max_len, num_kv_heads, head_dim, dtype),
            out_shardings=KVCache((sharding,) * num_layers, (sharding,) * num_layers),
        )
        return make()


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

    def zeros():
        x = jnp.zeros(shape, dtype)
        if mesh is None or rules is None:
            return x
        return jax.lax.with_sharding_constraint(x, rules.sharding(CACHE_AXES, shape, mesh))

    return KVCache(
        tuple(zeros() for _ in range(num_layers)), tuple(zeros() for _ in range(num_layers))
    )


def write(
    cache: Float[Array, "B K S H"], new: Float[Array, "B T K H"], positions: Int[Array, "B T"]
) -> Float[Array, "B K S H"]:
    """Stores each new token at its absolute position; positions past the end are dropped
    (padding of a bucketed prompt that reaches beyond the cache)."""
    rows = jnp.arange(cache.shape[0])[:, None]
    # Indices on axes 0 and 2 around a slice: the update is laid out [B, T, K, H].
    return cache.at[rows, :, positions].set(new.astype(cache.dtype), mode="drop")


def prefix(cache: Float[Array, "B K S H"], length: int | None) -> Float[Array, "B K L H"]:
    """The first ``length`` positions of every slot (all of them for None)."""
    if length is None or length >= cache.shape[2]:
        return cache
    return cache[:, :, :length]


def insert(cache: KVCache, local: KVCache, slots: Int[Array, " P"]) -> KVCache:
    """Copies each row of ``local`` (prefilled prompts, positions from 0) into its slot of
    ``cache``; a slot index past the last slot marks a padding row, whose write is dropped."""
    P, _, T, _ = local.keys[0].shape
    at = (slots[:, None], slice(None), jnp.broadcast_to(jnp.arange(T), (P, T)))

    def put(full, new):
        # [P, K, T, H] -> [P, T, K, H], the order of an update indexed on axes 0 and 2.
        return full.at[at].set(new.transpose(0, 2, 1, 3).astype(full.dtype), mode="drop")

    return KVCache(
        tuple(put(c, n) for c, n in zip(cache.keys, local.keys, strict=True)),
        tuple(put(c, n) for c, n in zip(cache.values, local.values, strict=True)),
    )
