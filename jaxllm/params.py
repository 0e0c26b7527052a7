"""Model state: abstract shapes, logical axes -> shardings, and creation straight into shards.

The runtime never holds a live ``nnx.Module``; it keeps the graph definition and the state
pytree apart (``nnx.split``) and hands the state to pure jitted functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm import quantize
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
    quantized: str | None = None  # "int8": weights int8 + scales (jaxllm.quantize)

    def __post_init__(self):
        quantize.check_method(self.quantized)

    def build(self, seed: int = 0) -> Transformer:
        return Transformer(
            self.config,
            dtype=self.dtype,
            mesh=self.mesh,
            rules=self.rules,
            quantized=self.quantized,
            rngs=nnx.Rngs(seed),
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

    def fill(
        self, make_array: Callable[[str, jax.ShapeDtypeStruct], jax.Array]
    ) -> tuple[nnx.GraphDef, nnx.State]:
        """Builds the state one parameter at a time: ``make_array(name, target)`` returns
        the array for parameter ``name`` (e.g. ``"layers.0.attn.wq"``) with the target's
        shape, dtype and sharding. Parameters are made in name order."""
        graphdef, abstract_state = self.abstract()
        shardings = nnx.to_flat_state(self.shardings(abstract_state))
        flat = []
        for (path, var), (_, sharding) in zip(
            nnx.to_flat_state(abstract_state), shardings, strict=True
        ):
            target = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding.get_value())
            flat.append((path, var.replace(make_array(".".join(map(str, path)), target))))
        return graphdef, nnx.from_flat_state(flat)

    def fill_from_float(
        self, read: Callable[[str, jax.ShapeDtypeStruct], jax.Array]
    ) -> tuple[nnx.GraphDef, nnx.State]:
        """``fill`` from a source that holds every weight in float (a Hugging Face folder, a
        float checkpoint): for a quantized spec, each weight is read as float into its shards,
        quantized there and dropped before the next, so no float copy of the model exists."""
        if self.quantized is None:
            return self.fill(read)
        done: dict[str, jax.Array] = {}
        targets = self.targets()
        float_names = {}  # scale name -> its weight's name
        for name in targets:
            if quantize.input_dims(name) is not None:
                float_names[quantize.scale_name(name)] = name

        def make(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
            if name in done:
                return done.pop(name)
            weight = float_names.get(name, name)
            if quantize.input_dims(weight) is None:  # norms, biases
                return read(name, target)
            target = targets[weight]
            as_float = jax.ShapeDtypeStruct(target.shape, self.dtype, sharding=target.sharding)
            done.update(quantize.quantize_into(read(weight, as_float), weight, targets))
            return done.pop(name)

        return self.fill(make)

    def targets(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Every parameter's shape, dtype and sharding, by name."""
        _, abstract = self.abstract()
        shardings = named_params(self.shardings(abstract))
        return {
            name: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[name].get_value())
            for name, var in named_params(abstract).items()
        }

    def random_state(self, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
        """Random parameters (normal with std 0.02; norm scales 1), each drawn on the host
        and placed into its shards. Host drawing avoids compiling JAX's RNG for every
        parameter shape, which took over 10 s for a 4-layer model on a 2-core CPU."""
        rng = np.random.default_rng(seed)

        def draw(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
            if name.endswith("norm.scale"):
                value = np.ones(target.shape, np.float32)
            else:
                value = rng.standard_normal(target.shape, np.float32) * np.float32(0.02)
            value = value.astype(target.dtype)
            return jax.make_array_from_callback(target.shape, target.sharding, value.__getitem__)

        return self.fill_from_float(draw)


def named_params(state: nnx.State) -> dict[str, nnx.Variable]:
    """Flat ``{"layers.0.attn.wq": Param}`` view of a state, in a stable order."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def param_bytes(state: nnx.State) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
