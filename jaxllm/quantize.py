"""int8 weights: per-output-channel quantization, and the matmul that reads int8 directly.

A quantized weight ``w [out..., in...]`` is stored as ``q = round(w / s)`` in int8 with one
float32 scale per output channel, ``s = max|w[o, :]| / 127``, so ``x @ w.T == (x @ q.T) * s``
up to the rounding of ``q``. The scale is a parameter of its own (``<weight>_scale``, with
the weight's output axes), so quantized weights shard by the same logical rules as float
ones, and a checkpoint stores them like any other parameter.

Which matmul: the weight stays int8 in memory and is converted inside the jitted step.
Measured on XLA:CPU (jax 0.10, 12 [2816, 1024] matrices, calls interleaved in one process):
- one row (batch-1 decode) written as ``v @ q.astype(f32).T`` with ``v`` a vector: XLA fuses
  the conversion into its own vector-matrix loop and reads the int8 bytes once, 2.0 ms against
  5.5 ms for the float32 matvec. Other spellings of the same product (an einsum over
  ``[B, T, D]``, ``q @ v``) miss that fusion and convert the whole matrix first: 55 ms.
- a few rows: one such vector product per row beats float32 up to 8 rows (4 rows: 10.8 ms
  against 25.4 ms for float32 under the same load), because small float32 matmuls stream
  their weights slowly on this backend.
- many rows (prefill, wide decode batches): a loop converts 256 weight rows at a time and
  multiplies them as an ordinary float matmul; at 16-256 rows that was as fast as float32 or
  faster (converting the whole matrix up front was 2.5-13x slower).
On GPU and TPU the conversion is left to the compiler, which fuses it into the matmul.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

INT8 = "int8"
METHODS = (INT8,)
# Rows (B * T) up to which the CPU product runs one vector-matrix loop per row (see above).
ROW_LOOP_MAX_ROWS = 8
# The same for a float weight that is a slice of a stacked array (a scanned layer, an
# expert): XLA:CPU transposes such a slice before a matmul of 2-4 rows. Measured, 16 sliced
# [2816, 1024] float32 weights in a scan: 2 rows 12.4 ms as a matmul against 8.2 ms as row
# products, 4 rows 13.3 against 9.6, 1 row 5.5 either way; in a MoE layer's experts
# (T=64, blocks of 4-8 rows) 8-row products lost to the matmul again.
SLICED_ROW_LOOP_MAX_ROWS = 4
# Weight rows converted to float together when many rows multiply (see _blockwise).
BLOCK_ROWS = 256

# Parameter name endings that hold a linear layer's weight, with how many trailing
# dimensions are the input (contracted) ones; the rest are output channels.
_WEIGHT_INPUT_DIMS = {
    "attn.wq": 1,
    "attn.wk": 1,
    "attn.wv": 1,
    "attn.wo": 2,  # [D, N, H]: the heads are the input
    "mlp.w_gate": 1,
    "mlp.w_up": 1,
    "mlp.w_down": 1,
    # Mixture-of-Experts [E, out, in]: one scale per expert and output channel. The router
    # stays in float: it is tiny, and its rounding would move tokens between experts.
    "moe.w_gate": 1,
    "moe.w_up": 1,
    "moe.w_down": 1,
    "embed": 1,  # rows are looked up, and a tied head multiplies by it: one scale per row
    "lm_head": 1,
}
SCALE_SUFFIX = "_scale"


def check_method(method: str | None) -> str | None:
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; supported: {', '.join(METHODS)}")
    return method


def input_dims(name: str) -> int | None:
    """Trailing input dims of parameter ``name`` if it is a quantizable weight, else None."""
    last = name.split(".")
    for ending, dims in _WEIGHT_INPUT_DIMS.items():
        if last[-len(ending.split(".")) :] == ending.split("."):
            return dims
    return None


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


@functools.partial(jax.jit, static_argnames="in_dims")
def quantize(w: Float[Array, "*dims"], in_dims: int = 1) -> tuple[Int8[Array, "*dims"], Array]:
    """``(q, scale)`` with ``q`` int8 like ``w`` and ``scale`` float32 over its output dims."""
    axes = tuple(range(w.ndim - in_dims, w.ndim))
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes) / 127.0
    # An all-zero channel keeps scale 0 (its values are 0); divide by 1 there instead.
    safe = jnp.where(scale > 0, scale, 1.0).reshape(scale.shape + (1,) * in_dims)
    q = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
    return q, scale


def quantize_into(w: Array, name: str, targets: dict) -> dict[str, Array]:
    """Parameter ``name``'s int8 weight and its scale from the float ``w``, each placed in
    its sharding from ``targets`` (name -> ShapeDtypeStruct), keyed by parameter name."""
    q, scale = quantize(w, input_dims(name))
    scale_key = scale_name(name)
    return {
        name: jax.device_put(q, targets[name].sharding),
        scale_key: jax.device_put(scale, targets[scale_key].sharding),
    }


def dequantize(q: Int8[Array, "*dims"], scale: Array, dtype=jnp.float32) -> Array:
    """The float weight ``q`` stands for (tests, and scoring the rounding error)."""
    in_dims = q.ndim - scale.ndim
    return (q.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * in_dims)).astype(dtype)


def linear(
    x: Float[Array, "B T I"],
    w: Array,
    scale: Array | None,
    in_dims: int = 1,
    out_dtype=None,
    sliced: bool = False,
) -> Array:
    """``x @ w.T`` for a weight ``w [*out, *in]`` stored ``[out, in]`` (its last ``in_dims``
    dims flattened are ``I``), float or int8 (then ``scale [*out]``); returns
    ``[B, T, *out]`` in ``out_dtype`` (default: ``x``'s). Products accumulate in float32
    whatever the operands (bfloat16 on TPU/GPU). An int8 weight is never copied to float
    whole for few rows (see the module docstring). ``sliced``: ``w`` is a scanned layer's
    slice of a stacked array, which XLA:CPU reads in place for one row only when the product
    is spelled ``x @ w.T`` (an einsum copies the slice first: a 24-layer decode step took
    193 ms against 67 ms); for whole arrays the einsum streams faster (54 ms against 75 ms)."""
    out_dtype = out_dtype or x.dtype
    out_shape = w.shape[: w.ndim - in_dims]
    w2 = w.reshape(math.prod(out_shape), x.shape[-1])
    B, T, _ = x.shape
    x2 = x.reshape(B * T, x.shape[-1])
    if scale is None:
        if sliced and jax.default_backend() == "cpu" and B * T <= SLICED_ROW_LOOP_MAX_ROWS:
            y = _row_products(x2, w2)
        elif sliced:
            y = jnp.matmul(x2, w2.T, preferred_element_type=jnp.float32)
        else:
            y = jnp.einsum("BTI,OI->BTO", x, w2, preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(B, T, *out_shape)
    if jax.default_backend() != "cpu":
        # GPU/TPU compilers fuse the conversion into the matmul.
        y = jnp.matmul(x2, w2.astype(x.dtype).T, preferred_element_type=jnp.float32)
    elif B * T <= ROW_LOOP_MAX_ROWS:
        # One vector @ matrix.T per row: the spelling XLA:CPU fuses with the conversion.
        y = _row_products(x2, w2.astype(x.dtype))
    else:
        y = _blockwise(x2, w2)
    y = y.astype(jnp.float32) * scale.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype).reshape(B, T, *out_shape)


def _blockwise(x: Float[Array, "R I"], w: Int8[Array, "O I"]) -> Float[Array, "R O"]:
    """``x @ w.T`` converting ``BLOCK_ROWS`` weight rows at a time inside a loop, so the
    float copy of a block stays in cache and is reused; converting the whole matrix first
    ran at ~0.25 G elements/s here (fresh buffers), slower than the float32 matmul itself."""
    out, width = w.shape
    block = max(d for d in range(1, min(out, BLOCK_ROWS) + 1) if out % d == 0)
    blocks = w.reshape(out // block, block, width)
    y = jax.lax.map(lambda b: x @ b.astype(x.dtype).T, blocks)  # [O // block, R, block]
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], out)


def _row_products(x: Float[Array, "R I"], w: Array) -> Float[Array, "R O"]:
    """``x @ w.T`` as one vector @ matrix.T per row, on a materialised ``x``: the spelling
    in which XLA:CPU reads ``w`` once per row, in place (no transpose, no float copy of an
    int8 ``w``: the conversion fuses into the loop)."""
    x = _materialized(x)
    return jnp.stack([x[r] @ w.T for r in range(x.shape[0])])


def _materialized(x: Array) -> Array:
    """``x``, computed once into a buffer of its own. XLA:CPU fuses the elementwise ops that
    produce a vector (RMS norm, SiLU, the attention output's reshape) into the vector-matrix
    loop that consumes it, which then recomputes them for every output channel: measured,
    that made the down and output projections 2-4x slower (profile of a decode step, hidden
    1024: 0.8 -> 0.38 ms and 0.65 -> 0.16 ms per layer with this). A scatter is a fusion
    boundary that XLA keeps; an optimization barrier and a max of two copies were both
    simplified away."""
    return jnp.zeros_like(x).at[:, jnp.arange(x.shape[1])].set(x)


def embed(table: Array, scale: Array | None, tokens: Array, dtype) -> Array:
    """Rows of an embedding table, float or int8 with one scale per row."""
    rows = jnp.take(table, tokens, axis=0)
    if scale is None:
        return rows
    return rows.astype(dtype) * jnp.take(scale, tokens, axis=0)[..., None].astype(dtype)
