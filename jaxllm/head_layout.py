"""Attention heads laid out so that a tensor-parallel axis always splits them.

A model with N query heads and K key/value heads (G = N // K query heads per KV head)
splits attention over a mesh axis of size t only when t divides K (and so N). Otherwise the
sharding rules would replicate the heads and every device would compute all of attention.
Instead the runtime model gets its own head counts N' and K' (vLLM's approach, generalised):

- each KV head is copied ``r`` times, and zero KV heads are appended until K' is a multiple
  of t; runtime KV head ``j < r * K`` is a copy of stored head ``j // r``;
- the G query heads of a KV head are split into ``r`` contiguous runs of G' = ceil(G / r),
  one per copy, each padded with zero query heads (zero ``wq`` rows, zero ``wo`` columns) to
  G'; the query heads of a zero KV head are zero too. N' = K' * G'.

Runtime query head ``j * G' + i`` serves runtime KV head ``j`` (the model's own grouping), and
it is stored query head ``k * G + c * G' + i`` where ``j = k * r + c``, whose KV head is ``k``:
the same pairs of query and key/value weights meet as in the stored model, and a zero query
head adds nothing (its ``wo`` columns are zero), so the output is exactly the stored model's.
With K' and N' multiples of t, each device holds whole KV heads and the query heads that read
them. ``r`` is chosen to minimise the heads each device holds (query plus KV: attention
weights, work and cache), then the KV heads, then the zero heads.

Checkpoints keep the stored layout (N, K) whatever the mesh: ``expand`` and ``read_block`` turn
stored arrays into runtime ones as they are read into their shards, ``shrink`` turns runtime
arrays back (taking copy 0 of each KV head) for saving. Arrays name their head dimensions by
the logical axes ``q_heads`` and ``kv_heads``; shapes use the glossary in ``jaxllm.config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

Q_AXIS, KV_AXIS = "q_heads", "kv_heads"
# Every logical axis that splits heads: the layout must divide all of them.
HEAD_AXES = (Q_AXIS, KV_AXIS, "act_heads", "act_kv_heads", "cache_kv_heads")

# Per array dimension: runtime head -> stored head (-1: a zero head), None for other dims.
Maps = tuple[np.ndarray | None, ...]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Runtime head counts for a stored model of ``num_heads`` (N) query and ``num_kv_heads``
    (K) KV heads: each KV head copied ``replicas`` (r) times, ``num_runtime_kv_heads`` (K')
    KV heads in all (the rest zero). See the module docstring."""

    num_heads: int
    num_kv_heads: int
    replicas: int
    num_runtime_kv_heads: int

    def __post_init__(self):
        N, K, r, K2 = self.num_heads, self.num_kv_heads, self.replicas, self.num_runtime_kv_heads
        if N % K or r < 1 or K2 < r * K:
            raise ValueError(f"inconsistent head layout {self}")

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def runtime_group_size(self) -> int:  # G'
        return -(-self.group_size // self.replicas)

    @property
    def num_runtime_heads(self) -> int:  # N'
        return self.num_runtime_kv_heads * self.runtime_group_size

    @property
    def is_identity(self) -> bool:
        return (self.num_runtime_heads, self.num_runtime_kv_heads) == (
            self.num_heads,
            self.num_kv_heads,
        )

    @functools.cached_property
    def kv_source(self) -> np.ndarray:
        """[K']: the stored KV head each runtime KV head copies, -1 for a zero head."""
        j = np.arange(self.num_runtime_kv_heads)
        return np.where(j < self.replicas * self.num_kv_heads, j // self.replicas, -1)

    @functools.cached_property
    def q_source(self) -> np.ndarray:
        """[N']: the stored query head each runtime query head is, -1 for a zero head."""
        G, G2 = self.group_size, self.runtime_group_size
        j, i = np.divmod(np.arange(self.num_runtime_heads), G2)  # runtime KV head, index in it
        k, c = np.divmod(j, self.replicas)  # stored KV head, copy
        g = c * G2 + i  # index in the stored group
        return np.where((self.kv_source[j] >= 0) & (g < G), k * G + g, -1)

    def source_index(self, logical: str | None) -> np.ndarray | None:
        """Runtime -> stored head map of a dimension named ``logical`` (None: not heads)."""
        return {Q_AXIS: self.q_source, KV_AXIS: self.kv_source}.get(logical)

    def kept_index(self, logical: str) -> np.ndarray:
        """For each stored head, the runtime head that holds it (copy 0 of a KV head)."""
        source = self.source_index(logical)
        runtime = np.flatnonzero(source >= 0)
        first = np.unique(source[runtime], return_index=True)[1]
        return runtime[first]

    def maps(self, axes: Sequence[str | None]) -> Maps | None:
        """Per dimension of an array with logical ``axes``: its head map, or None if the
        array has no head dimension (or the layout changes nothing)."""
        if self.is_identity:
            return None
        maps = tuple(self.source_index(a) for a in axes)
        return maps if any(m is not None for m in maps) else None

    def source_shape(self, shape: Sequence[int], axes: Sequence[str | None]) -> tuple[int, ...]:
        """The stored shape of a runtime array of ``shape`` with logical ``axes``."""
        stored = {Q_AXIS: self.num_heads, KV_AXIS: self.num_kv_heads}
        return tuple(stored.get(a, n) for a, n in zip(axes, shape, strict=True))

    def describe(self, axes: str, tensor: int) -> str:
        """One line for the load log: what was chosen over mesh ``axes`` of size ``tensor``."""
        N, K = self.num_heads, self.num_kv_heads
        heads = f"{N} query / {_plural(K, 'KV head')}"
        if tensor == 1:
            return f"attention heads: {heads}, not split (no head axis of the mesh exceeds 1)"
        N2, K2, r, G2 = (
            self.num_runtime_heads,
            self.num_runtime_kv_heads,
            self.replicas,
            self.runtime_group_size,
        )
        each = f"each device holds {N2 // tensor} query and {_plural(K2 // tensor, 'KV head')}"
        if self.is_identity:
            return f"attention heads over {axes}: {heads} divide it; {each}"
        how = [f"each KV head copied {r}x"] if r > 1 else []
        if K2 > r * K:
            how.append(f"{_plural(K2 - r * K, 'zero KV head')} added")
        how.append(f"{_plural(G2, 'query head')} per KV head")
        if N2 > N:
            how.append(f"{_plural(N2 - N, 'zero query head')}")
        return (
            f"attention heads over {axes}: {heads} do not divide it; running {N2} query / "
            f"{K2} KV heads ({', '.join(how)}), so {each}"
        )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plan(num_heads: int, num_kv_heads: int, tensor: int) -> HeadLayout:
    """The layout of N = ``num_heads`` query and K = ``num_kv_heads`` KV heads over a mesh
    axis of size ``tensor``: unchanged when ``tensor`` divides K; otherwise the copy count r
    that minimises (N' + K', K', zero heads, r) with K' a multiple of ``tensor``."""
    N, K, t = num_heads, num_kv_heads, tensor
    if K < 1 or N % K or t < 1:
        raise ValueError(f"cannot lay out {N} query / {K} KV heads over {t} devices")
    if K % t == 0:
        return HeadLayout(N, K, 1, K)
    G = N // K
    best = None
    for r in range(1, t + 1):  # more copies than devices never helps
        K2 = -(-r * K // t) * t
        N2 = K2 * -(-G // r)
        key = (N2 + K2, K2, (K2 - r * K) + (N2 - N), r)
        if best is None or key < best[0]:
            best = key, HeadLayout(N, K, r, K2)
    return best[1]


# -- moving arrays between the stored and the runtime layout ------------------------------------


def expand_host(value: np.ndarray, maps: Maps) -> np.ndarray:
    """A stored-layout host array in the runtime layout (copies and zero heads)."""
    for axis, source in enumerate(maps):
        if source is not None:
            value = _take_or_zero(value, source, axis)
    return value


def _take_or_zero(value: np.ndarray, source: np.ndarray, axis: int) -> np.ndarray:
    out = np.take(value, np.maximum(source, 0), axis=axis)
    zero = [None] * out.ndim
    zero[axis] = slice(None)
    return np.where((source < 0)[tuple(zero)], np.zeros((), out.dtype), out)


def read_block(
    read: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...], maps: Maps | None
) -> np.ndarray:
    """The block ``index`` of a runtime-layout array, from ``read(source_index)``, which
    returns a block of the stored array. Only the stored heads that the block needs (the
    range between the lowest and the highest) are read, so each device reads about its share
    (``jax.make_array_from_callback`` hands ``index``)."""
    if maps is None:
        return read(index)
    source_index, takes = list(index), []
    for axis, source in enumerate(maps):
        if source is None:
            continue
        wanted = source[index[axis]]
        real = wanted[wanted >= 0]
        low, high = (int(real.min()), int(real.max()) + 1) if real.size else (0, 1)
        source_index[axis] = slice(low, high)
        takes.append((axis, np.where(wanted >= 0, wanted - low, -1)))
    block = read(tuple(source_index))
    for axis, local in takes:
        block = _take_or_zero(block, local, axis)
    return block


@functools.partial(jax.jit, static_argnames=("source", "axis", "sharding"))
def _gather(x: jax.Array, source: tuple[int, ...], axis: int, sharding: Sharding | None):
    """``x`` indexed by ``source`` along ``axis`` (-1: zeros), laid out by ``sharding``."""
    zero_shape = list(x.shape)
    zero_shape[axis] = 1
    padded = jnp.concatenate([x, jnp.zeros(zero_shape, x.dtype)], axis=axis)
    index = np.asarray(source)
    out = jnp.take(padded, np.where(index < 0, x.shape[axis], index), axis=axis)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def expand(array: jax.Array, maps: Maps, sharding: Sharding) -> jax.Array:
    """A stored-layout device array in the runtime layout, placed in ``sharding``."""
    ((axis, source),) = [(a, m) for a, m in enumerate(maps) if m is not None]
    return _gather(array, tuple(source.tolist()), axis, sharding)


def shrink(array: jax.Array, layout: HeadLayout, axes: Sequence[str | None]) -> jax.Array:
    """A runtime-layout device array back in the stored layout (copy 0 of each KV head),
    sharded as ``array`` is except along its head dimension (which stored counts may not
    divide): what a checkpoint stores, whatever the mesh it was saved from."""
    (axis,) = [i for i, a in enumerate(axes) if layout.source_index(a) is not None]
    kept = tuple(layout.kept_index(axes[axis]).tolist())
    sharding = array.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        parts = list(sharding.spec) + [None] * (array.ndim - len(sharding.spec))
        parts[axis] = None
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*parts))
    else:
        sharding = None
    return _gather(array, kept, axis, sharding)


def shrink_host(value: np.ndarray, layout: HeadLayout, axes: Sequence[str | None]) -> np.ndarray:
    """``shrink`` for a host array."""
    for axis, logical in enumerate(axes):
        if layout.source_index(logical) is not None:
            value = np.take(value, layout.kept_index(logical), axis=axis)
    return value


def tensor_size(split: Callable[[str], int]) -> int:
    """The size the head layout must divide: ``split(axis)`` is how many ways the rules
    split logical ``axis`` on the mesh; all head axes must be divisible."""
    return math.lcm(*(split(a) for a in HEAD_AXES))
