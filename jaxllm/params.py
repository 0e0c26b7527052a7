"""Model state: abstract shapes, logical axes -> shardings, and creation straight into shards.

The runtime never holds a live ``nnx.Module``; it keeps the graph definition and the state
pytree apart (``nnx.split``) and hands the state to pure jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxllm.config import ModelConfig
from jaxllm.model import Transformer
from sharding import ShardingRules


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, shard and trace a model, without any weights."""

    config: ModelConfig
    dtype: Any
    mesh: Mesh
    rules: ShardingRules

    def build(self, seed: int = 0) -> Transformer:
        return Transformer(
            self.config, dtype=self.dtype, mesh=self.mesh, rules=self.rules, rngs=nnx.Rngs(seed)
        )

    def abstract(self) -> tuple[nnx.GraphDef, nnx.State]:
        """Graph definition and a state of ``ShapeDtypeStruct`` leaves (no memory used)."""
        return nnx.split(nnx.eval_shape(self.build))

    def shardings(self, abstract_state: nnx.State) -> nnx.State:
        """The ``NamedSharding`` of every parameter, from the logical axes it declared."""
        return jax.tree.map(
            lambda p: p.replace(
                self.rules.sharding(p.get_metadata()["logical_axes"], p.shape, self.mesh)
            ),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    def random_state(self, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
        """Randomly initialised parameters, created inside jit directly into their shards."""
        graphdef, abstract_state = self.abstract()
        shardings = self.shardings(abstract_state)
        state = jax.jit(lambda: nnx.split(self.build(seed))[1], out_shardings=shardings)()
        return graphdef, state


def named_params(state: nnx.State) -> dict[str, nnx.Variable]:
    """Flat ``{"layers.0.attn.wq": Param}`` view of a state, in a stable order."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def param_bytes(state: nnx.State) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def sharding_of(array: jax.Array) -> NamedSharding:
    return array.sharding  # type: ignore[return-value]


def as_dtype(name: str | Any | None, default=jnp.float32):
    if name is None:
        return default
    return jnp.dtype(name)
