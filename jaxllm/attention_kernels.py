"""Which attention implementation runs where: one small, explicit chooser.

``choose(backend)`` returns an ``AttentionKernels`` whose ``paged`` and ``causal`` have the
signatures and the semantics of ``jaxllm.attention.paged`` and ``jaxllm.attention.causal``
(keys at positions ``<=`` the query's and ``< kv_len``, within ``window``); only the code that
computes them differs. The defaults, per backend:

- ``cpu``: pure JAX for both (``jaxllm.attention``).
- ``tpu``: decode rows (one query per row) through the Pallas TPU paged-attention kernel
  that ships with JAX (``jax.experimental.pallas.ops.tpu.paged_attention``); prefill rows and
  ``causal`` stay pure JAX, as do decode rows of a float32 pool (the kernel rounds the keys
  and values it loads to bfloat16, exact only for a bfloat16 pool). JAX's
  ``ragged_paged_attention`` would take both row kinds in one call, but it does not run in
  CPU interpret mode (jax 0.10: ``'ReshapeTransform' object has no attribute 'indices'``),
  so it cannot be tested here and is not offered.
- ``gpu`` / ``cuda``: ``causal`` (prefill scoring, training) through
  ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention) where cuDNN
  takes the shapes: bfloat16/float16, head dim a multiple of 8 up to 128, a float KV dtype;
  paged decode stays pure JAX (see below for why), with the Pallas GPU (Triton) paged kernel
  offered as ``decode="pallas_gpu"``.
- any other backend (``rocm``, ...): pure JAX.

Every kernel takes a static fallback to pure JAX where it does not fit (a sliding window, an
int8 pool, prefill rows for a decode kernel, float32 for cuDNN), so a chosen function never
fails a shape the pure one accepts. ``describe()`` states the choice (a start-up log line);
``choose(..., decode=..., causal=...)`` forces a path (tests, benchmarks): the choice is an
argument, not an environment variable, as nothing in ``jaxllm/`` switches on the environment.

The pool layout. Both JAX paged kernels read a layer's pool as ``[K, P, page, H]``; ours is
``[L, P, page, K, H]`` (a token's heads together, which the slot writes of ``kv_cache.write``
want). Adapting is one slice-and-transpose of the layer's whole keys and values per layer per
step: a read and a write of the layer's entire pool (not just the rows' pages) on every decode
step, which for a large pool costs more than the attention it feeds (a 4 GiB pool of 16
layers: 0.5 GiB moved per layer, ~0.6 ms at 1.6 TB/s, ~10 ms a step). A pool stored
``[L, K, P, page, H]`` on TPU (``kv_cache``'s layout chosen with the kernel) is the next step;
until then the TPU default pays the transpose, and on GPU the pure-JAX paged attention stays
the default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm import attention, kv_cache
from jaxllm.attention import RowGroup
from jaxllm.kv_cache import KVPool

# Implementations of each path (the names ``choose`` accepts).
DECODE = ("jax", "pallas_tpu", "pallas_gpu")
CAUSAL = ("jax", "xla", "cudnn")
_GPU = ("gpu", "cuda")
_DEFAULTS = {  # backend -> (decode, causal)
    "cpu": ("jax", "jax"),
    "tpu": ("pallas_tpu", "jax"),
    "gpu": ("jax", "cudnn"),
    "cuda": ("jax", "cudnn"),
}
_WHY = {
    "cpu": "pure JAX on CPU (Pallas only runs there in interpret mode)",
    "tpu": "Pallas TPU paged attention for decode rows; pool transposed per layer per step",
    "gpu": "cuDNN flash attention for causal; paged decode pure JAX (a Pallas kernel would "
    "transpose the whole pool per layer per step)",
}
_WHY["cuda"] = _WHY["gpu"]


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """The attention functions a model runs with; drop-in for ``jaxllm.attention``'s."""

    backend: str
    decode: str  # implementation of paged rows with one query each (DECODE)
    causal_impl: str  # implementation of ``causal`` (CAUSAL)
    interpret: bool  # Pallas kernels run in interpret mode (CPU tests)
    why: str

    @property
    def paged(self) -> Callable:
        """``attention.paged``'s signature: ``(q, rows, pool, layer, window, block_pages)``."""
        if self.decode == "jax":
            return attention.paged
        return functools.partial(_paged_kernel, kernel=self.decode, interpret=self.interpret)

    @property
    def causal(self) -> Callable:
        """``attention.causal``'s signature: ``(q, k, v, positions, window, kv_dtype)``."""
        if self.causal_impl == "jax":
            return attention.causal
        return functools.partial(_causal_dpa, implementation=self.causal_impl)

    def describe(self) -> str:
        mode = ", interpret mode" if self.interpret else ""
        return (
            f"attention on {self.backend}: decode={self.decode}, causal={self.causal_impl}"
            f"{mode} ({self.why})"
        )


def choose(
    backend: str | None = None,
    *,
    decode: str | None = None,
    causal: str | None = None,
    interpret: bool = False,
) -> AttentionKernels:
    """The attention implementations for ``backend`` (default ``jax.default_backend()``);
    ``decode`` / ``causal`` force one (``DECODE`` / ``CAUSAL``); ``interpret`` runs Pallas
    kernels in interpret mode, so a TPU or GPU kernel can be checked on CPU."""
    backend = (backend or jax.default_backend()).lower()
    default_decode, default_causal = _DEFAULTS.get(backend, ("jax", "jax"))
    why = _WHY.get(backend, f"pure JAX: no kernel chosen for {backend!r}")
    if decode is not None or causal is not None:
        why = "forced by the caller"
    decode, causal = decode or default_decode, causal or default_causal
    if decode not in DECODE:
        raise ValueError(f"decode={decode!r}; the implementations are {DECODE}")
    if causal not in CAUSAL:
        raise ValueError(f"causal={causal!r}; the implementations are {CAUSAL}")
    return AttentionKernels(backend, decode, causal, interpret, why)


# -- paged decode rows through a Pallas kernel ---------------------------------------------


def _paged_kernel(
    q: Float[Array, "R C N H"],
    rows: RowGroup,
    pool: KVPool,
    layer: Int[Array, ""] | int,
    window,
    block_pages: int,
    *,
    kernel: str,
    interpret: bool,
) -> Float[Array, "R C N H"]:
    R, C, N, H = q.shape
    groups = rows.group_blocks.shape[0]
    # The kernels take one query per row, no window and float pages (their int8 format is
    # not ours): anything else, a window traced per layer included, is the pure-JAX path's,
    # decided at trace time.
    # The TPU kernel rounds what it loads to bfloat16, exact only for a bfloat16 pool (TPU's).
    dtype = (pool.keys if pool.stacked else pool.keys[0]).dtype
    rounds = kernel == "pallas_tpu" and dtype != jnp.bfloat16
    if C != 1 or window is not None or pool.quantized or groups == 0 or rounds:
        return attention.paged(q, rows, pool, layer, window, block_pages)
    Pmax = rows.page_table.shape[1]
    page_size = pool.page_size
    # A row sees keys below min(kv_len, position + 1) and, like the pure path, only the
    # blocks its group loops over; a row that sees none (padding) gives zeros, as there.
    blocks = jnp.repeat(rows.group_blocks, R // groups)  # [R]
    lengths = jnp.minimum(rows.kv_len, rows.positions[:, 0] + 1)
    lengths = jnp.minimum(lengths, blocks * block_pages * page_size)
    lengths = jnp.clip(lengths, 0, Pmax * page_size).astype(jnp.int32)
    # [K, P, page, H]: the kernels' layout; a copy of the layer's whole pool (module docstring).
    keys = jnp.transpose(pool.keys[layer], (2, 0, 1, 3))  # either layout: layer l's pool
    values = jnp.transpose(pool.values[layer], (2, 0, 1, 3))
    # The kernels do not scale scores; the pure path scales by H**-0.5.
    scaled = (q[:, 0].astype(jnp.float32) * H**-0.5).astype(q.dtype)  # [R, N, H]
    table = rows.page_table.astype(jnp.int32)
    if kernel == "pallas_tpu":
        out = _tpu_paged(scaled, keys, values, lengths, table, block_pages, interpret)
    else:  # Triton's dots take one dtype
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        out = _gpu_paged(scaled, keys, values, lengths, table, block_pages, interpret)
    out = jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)
    return out[:, None]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _tpu_paged(q, keys, values, lengths, table, block_pages, interpret):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    per_block = _largest_divisor(table.shape[1], block_pages)
    call = functools.partial(paged_attention, pages_per_compute_block=per_block)
    if not interpret:
        return call(q, keys, values, lengths, table)
    with pltpu.force_tpu_interpret_mode():
        return call(q, keys, values, lengths, table)


def _gpu_paged(q, keys, values, lengths, table, block_pages, interpret):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    Pmax = table.shape[1]
    k_splits = _largest_divisor(Pmax, 16)  # the kernel's default split count, or less
    per_block = _largest_divisor(Pmax // k_splits, block_pages)
    return paged_attention(
        q,
        keys,
        values,
        table,
        lengths,
        k_splits=k_splits,
        pages_per_compute_block=per_block,
        interpret=interpret,
    )


# -- causal attention through jax.nn.dot_product_attention ----------------------------------


def cudnn_fits(dtype, head_dim: int, kv_dtype) -> bool:
    """Whether cuDNN's flash attention takes these (else the pure-JAX path runs)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and not kv_cache.is_int8(kv_dtype)
    )


def _causal_dpa(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
    window,
    kv_dtype=None,
    *,
    implementation: str,
) -> Float[Array, "B T N H"]:
    """``attention.causal`` by ``jax.nn.dot_product_attention``, whose causal mask and
    window are by index: the same rule as the positions' wherever a row's positions are
    consecutive (``start + arange(T)``), as every caller builds them (scoring, training,
    pruning). An int8 KV dtype (rounding as the pool does) and a window traced per layer
    (dot_product_attention's is static) stay on the pure path."""
    H = q.shape[-1]
    if (
        kv_cache.is_int8(kv_dtype)
        or not (window is None or isinstance(window, int))
        or (implementation == "cudnn" and not cudnn_fits(q.dtype, H, kv_dtype))
    ):
        return attention.causal(q, k, v, positions, window, kv_dtype)
    # A key is visible when query - window < key <= query: (window - 1) to the left.
    local = None if window is None else (window - 1, 0)
    out = jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        scale=1.0 / math.sqrt(H),
        is_causal=True,
        local_window_size=local,
        implementation=implementation,
    )
    return out.astype(q.dtype)
