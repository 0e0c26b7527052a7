"""Logical-axis rules: the one place that maps named array dimensions to mesh axes.

Every parameter, activation and cache array names its dimensions with logical names (below);
a ``ShardingRules`` value says which mesh axes each name is split over. A parallelism
strategy is therefore a rules value, not a code path: the same model runs tensor-parallel,
FSDP, as data-parallel replicas, or any mix, by handing it other rules.

Weight names and activation names are kept apart, so that e.g. the model width of weights
(``embed``, split by FSDP) and of activations (``act_embed``, never split) can differ.

Weights:      layers (the stacked decoder layers' leading axis), vocab, embed, q_heads,
              kv_heads, head_dim, mlp, norm, experts (the expert dimension of a
              mixture-of-experts layer's stacked expert weights [E, F, D]), expert_mlp (one
              expert's MLP width F)
Activations:  act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab,
              act_experts (the router logits' expert dimension [T, E]: replicated by every
              preset, since top-k needs all of a token's logits)
KV cache:     cache_layers, cache_batch, cache_pages (the paged pool's pages: replicated by
              every preset, a gather of a sequence's pages never crosses devices),
              cache_kv_heads, cache_sequence, cache_head_dim

Every preset maps ``experts`` to the mesh axis ``expert`` (on a mesh whose ``expert`` axis has
size 1 that is no split at all), and the presets that split MLP channels over ``tensor`` split
``expert_mlp`` likewise; how the expert layer runs on such a split is ``jaxllm.moe``'s business.

Two rules decide what happens where a layout cannot be honoured exactly:
- a dimension that the mesh axes' total size does not divide (a vocabulary of 50257 over
  tensor=4) is replicated along those axes, on purpose, instead of failing deep inside XLA.
  Attention heads never get here: a model pads or copies its heads until ``split_size`` of
  every head axis divides them (``jaxllm.head_layout``);
- two dimensions of one array mapped to the same mesh axis is an error naming both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES: frozenset[str] = frozenset(
    "layers vocab embed q_heads kv_heads head_dim mlp norm experts expert_mlp "
    "act_batch act_length act_embed act_heads act_kv_heads act_mlp act_vocab act_experts "
    "cache_layers cache_batch cache_pages cache_kv_heads cache_sequence cache_head_dim".split()
)

AxisNames = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical dimension names to tuples of mesh axes (empty tuple: replicated).

    Frozen and hashable, so it can sit in a jitted function's static arguments.
    """

    name: str
    table: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        unknown = {logical for logical, _ in self.table} - LOGICAL_AXES
        if unknown:
            raise ValueError(f"rules {self.name!r} name unknown logical axes {sorted(unknown)}")

    @classmethod
    def from_mapping(cls, name: str, mapping: Mapping[str, str | Sequence[str] | None]):
        def as_tuple(axes):
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)

        return cls(name, tuple(sorted((k, as_tuple(v)) for k, v in mapping.items())))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        if logical not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {logical!r}")
        return dict(self.table).get(logical, ())

    def split_size(self, logical: str | None, mesh: Mesh) -> int:
        """How many ways ``logical`` is split on ``mesh`` (1: replicated), when divisible."""
        return int(np.prod([mesh.shape.get(a, 1) for a in self.mesh_axes(logical)]))

    def spec(self, names: AxisNames, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
        """PartitionSpec for an array of ``shape`` whose dimensions are called ``names``."""
        if len(names) != len(shape):
            raise ValueError(f"logical axes {names} do not match shape {tuple(shape)}")
        used: dict[str, str] = {}
        parts: list[str | tuple[str, ...] | None] = []
        for logical, size in zip(names, shape, strict=True):
            axes = tuple(a for a in self.mesh_axes(logical) if mesh.shape.get(a, 1) > 1)
            for axis in axes:
                if axis in used:
                    raise ValueError(
                        f"rules {self.name!r} map both {used[axis]!r} and {logical!r} of one "
                        f"array {names} to mesh axis {axis!r}"
                    )
                used[axis] = logical
            split = int(np.prod([mesh.shape[a] for a in axes]))
            if not axes or size % split:
                parts.append(None)  # replicated: nothing to split, or not evenly splittable
            else:
                parts.append(axes[0] if len(axes) == 1 else axes)
        while parts and parts[-1] is None:
            parts.pop()
        return PartitionSpec(*parts)

    def sharding(self, names: AxisNames, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(names, shape, mesh))


# Expert parallelism is a weight split of its own axis, so it composes with every preset.
_EXPERTS = {"experts": "expert"}

_ACTIVATIONS_TP = {
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_kv_heads": "tensor",
}

TENSOR_PARALLEL = ShardingRules.from_mapping(
    "tensor_parallel",
    {
        "vocab": "tensor",
        "q_heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "act_batch": "data",
        "cache_batch": "data",
        **_EXPERTS,
        **_ACTIVATIONS_TP,
    },
)

FSDP = ShardingRules.from_mapping(
    "fsdp",
    {
        "embed": "fsdp",
        "act_batch": ("data", "fsdp"),
        "cache_batch": ("data", "fsdp"),
        **_EXPERTS,
    },
)

DATA_PARALLEL = ShardingRules.from_mapping(
    "data_parallel", {"act_batch": "data", "cache_batch": "data", **_EXPERTS}
)

FSDP_TENSOR = ShardingRules.from_mapping(
    "fsdp_tensor",
    {
        "vocab": "tensor",
        "embed": "fsdp",
        "q_heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "expert_mlp": "tensor",
        "act_batch": ("data", "fsdp"),
        "cache_batch": ("data", "fsdp"),
        **_EXPERTS,
        **_ACTIVATIONS_TP,
    },
)

PRESETS: dict[str, ShardingRules] = {
    r.name: r for r in (TENSOR_PARALLEL, FSDP, DATA_PARALLEL, FSDP_TENSOR)
}

# FSDP x tensor uses every mesh axis; on a mesh whose fsdp axis has size 1 it is exactly
# tensor parallelism, so it is the right default for any mesh.
DEFAULT_RULES = FSDP_TENSOR


def get_rules(rules: ShardingRules | str | None) -> ShardingRules:
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, ShardingRules):
        return rules
    if rules not in PRESETS:
        raise ValueError(f"unknown sharding preset {rules!r}; presets: {sorted(PRESETS)}")
    return PRESETS[rules]


def constrain(x: jax.Array, names: AxisNames, mesh: Mesh, rules: ShardingRules) -> jax.Array:
    """Pins an activation's layout inside a jitted function (block boundaries)."""
    return jax.lax.with_sharding_constraint(x, rules.sharding(names, x.shape, mesh))
