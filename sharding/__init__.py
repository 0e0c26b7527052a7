"""Device meshes and logical-axis sharding rules. Imports nothing from jaxllm or serve."""

from sharding.mesh import AXES, MeshSpec, describe_mesh, make_mesh, parse_mesh_spec
from sharding.rules import (
    DATA_PARALLEL,
    DEFAULT_RULES,
    FSDP,
    FSDP_TENSOR,
    LOGICAL_AXES,
    PRESETS,
    TENSOR_PARALLEL,
    ShardingRules,
    constrain,
    get_rules,
)

__all__ = [
    "AXES",
    "DATA_PARALLEL",
    "DEFAULT_RULES",
    "FSDP",
    "FSDP_TENSOR",
    "LOGICAL_AXES",
    "PRESETS",
    "TENSOR_PARALLEL",
    "MeshSpec",
    "ShardingRules",
    "constrain",
    "describe_mesh",
    "get_rules",
    "make_mesh",
    "parse_mesh_spec",
]
