"""Mixture-of-experts layer (Mixtral, Qwen3-MoE): routing, expert dispatch, expert parallelism.

Shapes use the glossary of ``jaxllm.config`` (T tokens, D model width, F one expert's MLP
width) plus ``E`` experts, ``k`` experts per token and ``P = T * k`` (token, expert) pairs.
Expert weights are stacked and stored ``[out, in]`` like every other weight of the project:
``w_gate, w_up [E, F, D]``, ``w_down [E, D, F]``; logical axes ``("experts", "expert_mlp",
"embed")`` and ``("experts", "embed", "expert_mlp")`` (``sharding.rules``).

One call is: ``route`` (softmax over all experts in float32, top-k, optionally renormalised)
then ``experts_mlp`` (each pair's SwiGLU expert, weighted by its routing weight and summed
per token). Every shape is static: the P pairs are sorted by expert, so whatever the routing,
the jitted step compiles once per T. No method materialises every expert for every token
(``[T, E, D]``, ``[T, E, F]``).

Dispatch methods (``METHODS``); ``scripts/bench_moe_dispatch.py`` measures them:
- ``"blocks"``: the sorted pairs are cut into row blocks per expert (a loop over experts, an
  inner loop over that expert's ``ceil(count / block_rows)`` blocks); each block is one
  matmul with that expert's weights, read in place. Experts that got no token cost nothing,
  so a decode step reads only the weights of the experts it uses.
- ``"ragged"``: one ``jax.lax.ragged_dot_general`` per matrix over the sorted rows with the
  per-expert group sizes. TPU and GPU compile it to a grouped matmul; XLA:CPU has no such
  kernel and JAX lowers it to a masked dense product over all experts (``E`` times the
  arithmetic, ``[E, P, D]`` of masked rows), so on CPU it is slow.
- ``"capacity"``: the rows are scattered into a ``[E, T, D]`` buffer (T slots per expert, which
  no expert can overflow because a token's k experts are distinct: exact, nothing dropped) and
  multiplied as one batched matmul; ``E / k`` times the arithmetic of the pairs themselves.

Default (``default_method()``): ``"blocks"`` on CPU and ``"ragged"`` on TPU/GPU (a native
grouped matmul, not measured here). Measured on a quiet machine (one CPU device, float32,
``scripts/bench_moe_dispatch.py``), Mixtral-like E=8 k=2 D=1024 F=2816 at T = 1 / 8 / 64 /
512 tokens: blocks 2.6 / 15.3 / 88 / 188 ms, capacity 8.8 / 34 / 78 / 424 ms, ragged 155 /
171 / 269 / 965 ms; Qwen3-MoE-like E=64 k=8 F=512: blocks 2.1 / 12.5 / 49 / 207 ms, capacity
12 / 64 / 130 / 743 ms, ragged 300 / 348 / 873 ms / not run (825 GFLOP). Blocks is fastest
everywhere but Mixtral-like T=64 (capacity 78 ms; blocks of 32 rows instead of the 16 the
default picks: 72 ms); at T=1 it reads the two experts' weights at 91% of the bandwidth
measured in the same run.

int8 weights (``jaxllm.quantize``: ``q`` int8 plus a float32 scale per output channel, so
``[E, F]`` for ``w_gate``/``w_up`` and ``[E, D]`` for ``w_down``): ``"blocks"`` converts one
expert's matrix inside the loop through ``quantize.linear`` (never the whole stack) and
multiplies the product by the scale; the other methods convert the whole stack per call.

Expert and tensor parallelism (``mesh`` and ``rules``): under ``jax.shard_map`` each device
holds the experts of its ``expert`` shard and the ``F`` channels of its ``tensor`` shard;
tokens are replicated over both axes, every device computes the pairs routed to its own
experts (the rest contribute zero) and the partial outputs are summed over ``expert`` and
``tensor`` (one ``psum``). A dimension the mesh axis does not divide is replicated, as the
rules do everywhere (``sharding.rules``): then every device of that axis computes all of it
and nothing is summed over that axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int, Shaped

from jaxllm import quantize
from sharding import ShardingRules, get_rules

METHODS = ("blocks", "ragged", "capacity")
DEFAULT_METHOD = "blocks"
# Largest row block of the "blocks" method; blocks are sized to the expected rows per expert
# (P / E, as a power of two) up to this.
MAX_BLOCK_ROWS = 256

# The three expert matrices, in the order scales are given as a tuple.
MATRICES = ("w_gate", "w_up", "w_down")
Scales = Mapping[str, Array] | Sequence[Array] | None

WEIGHT_AXES = {
    "w_gate": ("experts", "expert_mlp", "embed"),
    "w_up": ("experts", "expert_mlp", "embed"),
    "w_down": ("experts", "embed", "expert_mlp"),
}
SCALE_AXES = {
    "w_gate": ("experts", "expert_mlp"),
    "w_up": ("experts", "expert_mlp"),
    "w_down": ("experts", "embed"),
}


def default_method(backend: str | None = None) -> str:
    """The dispatch for ``backend`` (default: JAX's): a grouped matmul where the chip has one."""
    backend = backend or jax.default_backend()
    return "ragged" if backend in ("tpu", "gpu", "cuda", "rocm") else DEFAULT_METHOD


def route(
    router_logits: Float[Array, "T E"], top_k: int, normalize: bool
) -> tuple[Float[Array, "T k"], Int[Array, "T k"]]:
    """``(weights [T, k] float32, experts [T, k] int32)``: softmax over all E experts in
    float32, the k largest (experts in descending weight), renormalised to sum 1 when
    ``normalize``. Mixtral always renormalises and keeps the weights in float32; Qwen3-MoE
    renormalises only with ``norm_topk_prob`` and then casts them to the model dtype (do
    ``weights.astype(x.dtype)`` for bit-level parity in bfloat16)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_load(experts: Int[Array, "T k"], num_experts: int) -> Int[Array, " E"]:
    """Tokens routed to each expert (the dispatch's group sizes), for load-balance metrics."""
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


def experts_mlp(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    w_gate: Shaped[Array, "E F D"],
    w_up: Shaped[Array, "E F D"],
    w_down: Shaped[Array, "E D F"],
    scales: Scales = None,
    *,
    method: str | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | str | None = None,
    block_rows: int | None = None,
) -> tuple[Float[Array, "T D"], Int[Array, " E"]]:
    """``(y [T, D], group_sizes [E] int32)``: ``y[t] = sum_j weights[t, j] *
    down(silu(gate(x[t])) * up(x[t]))`` over the token's experts ``experts[t, j]``, in
    ``x``'s dtype (products accumulate in float32); ``group_sizes`` counts the pairs routed
    to each expert. ``scales``: for int8 weights, their float32 per-output-channel scales as
    a ``(gate [E, F], up [E, F], down [E, D])`` tuple or a dict keyed by ``MATRICES``.
    ``mesh``: run expert- and tensor-parallel under ``jax.shard_map`` as ``rules`` lay the
    weights out (see the module docstring). ``method`` and ``block_rows``: see ``METHODS``.
    """
    method = method or default_method()
    if method not in METHODS:
        raise ValueError(f"unknown MoE dispatch {method!r}; methods: {', '.join(METHODS)}")
    num_experts = w_gate.shape[0]
    scale_tuple = _scale_tuple(scales)
    sizes = expert_load(experts, num_experts)
    local = functools.partial(_local_experts_mlp, method=method, block_rows=block_rows)
    with jax.named_scope("moe_experts"):
        if mesh is None:
            y = local(x, weights, experts, w_gate, w_up, w_down, scale_tuple, 0, num_experts)
        else:
            mats = (w_gate, w_up, w_down)
            y = _sharded(local, mesh, get_rules(rules), x, weights, experts, mats, scale_tuple)
    return y, sizes


def _scale_tuple(scales: Scales) -> tuple[Array, Array, Array] | None:
    if scales is None:
        return None
    if isinstance(scales, Mapping):
        missing = set(MATRICES) - set(scales)
        if missing:
            raise ValueError(f"scales need keys {MATRICES}, missing {sorted(missing)}")
        return tuple(scales[m] for m in MATRICES)
    if len(scales) != 3:
        raise ValueError(f"scales: expected 3 arrays ({', '.join(MATRICES)}), got {len(scales)}")
    return tuple(scales)


def _sharded(local, mesh: Mesh, rules: ShardingRules, x, weights, experts, mats, scales):
    """``local`` under ``jax.shard_map``: experts split over the mesh axes of ``experts``,
    F over those of ``expert_mlp``, tokens over those of ``act_batch`` (each only where the
    axes divide it), partial outputs summed over the expert and F axes."""
    num_experts, width = mats[0].shape[:2]
    T = x.shape[0]

    def split(logical: str, size: int, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
        axes = tuple(
            a for a in rules.mesh_axes(logical) if mesh.shape.get(a, 1) > 1 and a not in taken
        )
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()

    ep = split("experts", num_experts)
    tp = split("expert_mlp", width, ep)
    tok = split("act_batch", T, ep + tp)
    local_experts = num_experts // math.prod(mesh.shape[a] for a in ep)

    def part(axes):
        return None if not axes else axes[0] if len(axes) == 1 else axes

    e, f, t = part(ep), part(tp), part(tok)
    mat_specs = (PartitionSpec(e, f, None), PartitionSpec(e, f, None), PartitionSpec(e, None, f))
    scale_specs = (PartitionSpec(e, f), PartitionSpec(e, f), PartitionSpec(e, None))
    scale_specs = None if scales is None else scale_specs
    row = PartitionSpec(t, None)

    def body(x, weights, experts, mats, scales):
        offset = lax.axis_index(ep) * local_experts if ep else 0
        y = local(x, weights, experts, *mats, scales, offset, local_experts)
        return lax.psum(y, ep + tp) if ep + tp else y

    # check_vma=False: the dispatch loops start from fresh zero buffers, which would each need
    # a pcast to the weights' varying axes; the psum below is what makes the result replicated.
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(row, row, row, mat_specs, scale_specs),
        out_specs=row,
        check_vma=False,
    )(x, weights, experts, mats, scales)


def _local_experts_mlp(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    w_gate: Shaped[Array, "El F D"],
    w_up: Shaped[Array, "El F D"],
    w_down: Shaped[Array, "El D F"],
    scales: tuple[Array, Array, Array] | None,
    offset: int | Array,
    num_experts: int,
    *,
    method: str,
    block_rows: int | None,
) -> Float[Array, "T D"]:
    """The pairs routed to experts ``offset .. offset + El - 1`` (the ones held here; the
    rest contribute zero), ``El = w_gate.shape[0]``; ``num_experts`` is the total E."""
    T, k = experts.shape
    held = w_gate.shape[0]
    # Pairs of experts held elsewhere get the key `held` and sort after every local group.
    key = experts.reshape(-1) - offset
    here = (key >= 0) & (key < held)
    key = jnp.where(here, key, held)
    order = jnp.argsort(key, stable=True)  # [P]: pairs grouped by expert
    sizes = jnp.bincount(key, length=held + 1)[:held].astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)  # [P, D]
    sorted_key = jnp.take(key, order)
    if method == "blocks":
        block = block_rows or _block_rows(T, k, num_experts)
        y = _blocks(rows, sizes, w_gate, w_up, w_down, scales, min(block, T))
    elif method == "ragged":
        y = _ragged(rows, sizes, sorted_key, w_gate, w_up, w_down, scales)
    else:
        y = _capacity(rows, sizes, sorted_key, T, w_gate, w_up, w_down, scales)
    # [P, D] back in (token, j) order, weighted; pairs of other devices' experts weigh 0.
    y = jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(T, k, -1)
    w = jnp.where(here.reshape(T, k), weights.astype(jnp.float32), 0.0)
    return jnp.einsum("TkD,Tk->TD", y, w).astype(x.dtype)


def _block_rows(T: int, k: int, num_experts: int) -> int:
    """Rows per block: the expected rows of one expert, rounded up to a power of two."""
    expected = max(1, -(-T * k // num_experts))
    return min(MAX_BLOCK_ROWS, 1 << (expected - 1).bit_length())


def _linear(x: Float[Array, "R I"], w: Shaped[Array, "O I"], scale) -> Float[Array, "R O"]:
    """``x @ w.T`` in float32 for one expert's matrix, a slice of the stack read in place
    (``quantize.linear``'s sliced spelling: one vector-matrix product per row for the few
    rows of a decode-sized block on CPU)."""
    return quantize.linear(x[None], w, scale, out_dtype=jnp.float32, sliced=True)[0]


def _swiglu(x, w_gate, w_up, w_down, scales) -> Array:
    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    gate = _linear(x, w_gate, s_gate)
    up = _linear(x, w_up, s_up)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)  # [R, F]
    return _linear(hidden, w_down, s_down)


def _blocks(
    rows: Float[Array, "P D"],
    sizes: Int[Array, " El"],
    w_gate: Shaped[Array, "El F D"],
    w_up: Shaped[Array, "El F D"],
    w_down: Shaped[Array, "El D F"],
    scales,
    block: int,
) -> Float[Array, "P D"]:
    P, D = rows.shape
    held = w_gate.shape[0]
    starts = jnp.cumsum(sizes) - sizes
    # Each expert's rows are cut into ceil(size / block) blocks; block i belongs to the
    # expert whose cumulative block count first exceeds i. At most P // block + min(E, P)
    # blocks exist; the loop runs over the real ones only (one loop: nested loops over
    # experts and then blocks made XLA copy the weight stacks into the loop state, 10x slower).
    per_expert = (sizes + block - 1) // block
    ends = jnp.cumsum(per_expert)
    most = P // block + min(held, P)
    block_expert = jnp.searchsorted(ends, jnp.arange(most), side="right").astype(jnp.int32)
    block_expert = jnp.minimum(block_expert, held - 1)
    first_block = ends - per_expert
    # A block may run past its group (and past the last row): pad so slices never clamp,
    # and keep only the block's own rows when writing back.
    padded = jnp.concatenate([rows, jnp.zeros((block, D), rows.dtype)])

    def one_block(i, out):
        e = block_expert[i]
        j = i - first_block[e]  # the block's index within its expert
        start = starts[e] + j * block
        expert_scales = None if scales is None else tuple(s[e] for s in scales)
        x = lax.dynamic_slice_in_dim(padded, start, block)
        y = _swiglu(x, w_gate[e], w_up[e], w_down[e], expert_scales)
        mine = (j * block + jnp.arange(block) < sizes[e])[:, None]
        old = lax.dynamic_slice_in_dim(out, start, block)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), start, 0)

    out = jnp.zeros((P + block, D), jnp.float32)
    return lax.fori_loop(0, ends[-1], one_block, out)[:P]


_RAGGED_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # rows [P, I] . weights [G, O, I]
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


def _ragged(rows, sizes, sorted_key, w_gate, w_up, w_down, scales) -> Array:
    held = w_gate.shape[0]
    # Per-row scales of the row's expert (rows of other devices' experts are zero anyway).
    row_expert = jnp.minimum(sorted_key, held - 1)

    def matmul(x, w, scale):
        y = lax.ragged_dot_general(
            x, w.astype(x.dtype), sizes, _RAGGED_DIMS, preferred_element_type=jnp.float32
        )
        return y if scale is None else y * jnp.take(scale, row_expert, axis=0)

    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    hidden = jax.nn.silu(matmul(rows, w_gate, s_gate)) * matmul(rows, w_up, s_up)
    return matmul(hidden.astype(rows.dtype), w_down, s_down)


def _capacity(rows, sizes, sorted_key, T: int, w_gate, w_up, w_down, scales) -> Array:
    held = w_gate.shape[0]
    starts = jnp.cumsum(sizes) - sizes
    # Slot of each sorted row within its expert; rows of other devices' experts (key `held`)
    # fall outside the buffer and are dropped.
    slot = jnp.arange(rows.shape[0]) - jnp.take(jnp.append(starts, 0), sorted_key)
    buffer = jnp.zeros((held, T, rows.shape[1]), rows.dtype)
    buffer = buffer.at[sorted_key, slot].set(rows, mode="drop")  # [E, T, D]

    def matmul(x, w, scale):
        y = jnp.einsum("ECI,EOI->ECO", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y if scale is None else y * scale[:, None, :]

    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    hidden = jax.nn.silu(matmul(buffer, w_gate, s_gate)) * matmul(buffer, w_up, s_up)
    out = matmul(hidden.astype(rows.dtype), w_down, s_down)  # [E, T, D]
    return out.at[sorted_key, slot].get(mode="fill", fill_value=0)


def weight_specs(
    rules: ShardingRules | str | None, shapes: Mapping[str, Sequence[int]], mesh: Mesh
) -> dict[str, PartitionSpec]:
    """PartitionSpecs of the expert matrices (and ``<name>_scale``s) of the given shapes as
    ``rules`` lay them out on ``mesh``, for placing weights where ``experts_mlp`` reads them."""
    rules = get_rules(rules)
    specs = {}
    for name, shape in shapes.items():
        base = name.removesuffix(quantize.SCALE_SUFFIX)
        axes = SCALE_AXES[base] if name != base else WEIGHT_AXES[base]
        specs[name] = rules.spec(axes, tuple(shape), mesh)
    return specs
