"""Model state: abstract shapes, logical axes -> shardings, and creation straight into shards.

The runtime never holds a live ``nnx.Module``; it keeps the graph definition and the state
pytree apart (``nnx.split``) and hands the state to pure jitted functions.

Two name spaces: the live state stacks every decoder layer's parameter on a leading
``layers`` axis (``layers.attn.wq``, see ``jaxllm.model``), while checkpoints, loaders and
everything else here name layers one by one (``layers.0.attn.wq``), as Hugging Face does.
``ModelSpec.fill`` takes arrays by those per-layer names and writes each into its slot of
the stacked array in place, so a load holds the model plus one tensor; ``named_params``
gives a state's parameters back under the per-layer names, slicing a layer only when read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import cpu_kernels, head_layout, quantize, startup
from jaxllm.config import ModelConfig
from jaxllm.model import Transformer
from sharding import ShardingRules

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, shard and trace a model, without any weights.

    ``config`` may be given as stored (a checkpoint's) or as another spec's runtime config;
    it becomes the runtime config for this mesh and rules: attention heads padded or copied
    (``jaxllm.head_layout``) where the axis that splits heads does not divide them, so that
    attention is split rather than replicated. Everything built from the spec (parameters,
    KV cache sized by ``config.num_kv_heads``) sees the runtime counts; checkpoint readers
    turn stored arrays into runtime ones (``head_maps``), and ``config.stored`` is the
    checkpoint's config."""

    config: ModelConfig
    dtype: Any
    mesh: Mesh
    rules: ShardingRules
    quantized: str | None = None  # "int8", "int4", ...: weights + scales (jaxllm.quantize)
    # False: heads that the tensor axis does not divide are replicated instead of padded and
    # copied (training: a copied KV head would get its own gradient and drift apart).
    split_heads: bool = True
    # Stacked layers run by jax.lax.scan (jaxllm.model); None: default_scan_layers(mesh).
    scan_layers: bool | None = None

    def __post_init__(self):
        quantize.check_method(self.quantized)
        if self.scan_layers is None:
            object.__setattr__(self, "scan_layers", default_scan_layers(self.mesh))
        stored = self.config.stored
        layout = head_layout.plan(stored.num_heads, stored.num_kv_heads, self.head_split)
        if not layout.is_identity:
            stored = dataclasses.replace(
                stored,
                num_heads=layout.num_runtime_heads,
                num_kv_heads=layout.num_runtime_kv_heads,
                head_layout=layout,
            )
        object.__setattr__(self, "config", stored)  # normalised once, at construction
        # Grouped quantization splits each layer weight's last input axis into groups.
        widths = {"hidden size": stored.hidden_size, "head dim": stored.head_dim}
        if not stored.num_experts:  # experts stay int8 per channel (quantize.method_for)
            widths["intermediate size"] = stored.intermediate_size
        quantize.check_widths(self.quantized, widths)

    @property
    def head_split(self) -> int:
        """How many ways the rules split attention heads on this mesh."""
        if not self.split_heads:
            return 1
        return head_layout.tensor_size(lambda axis: self.rules.split_size(axis, self.mesh))

    def describe_heads(self) -> str:
        """One line saying how attention heads are laid out over the mesh."""
        stored = self.config.stored
        layout = self.config.head_layout or head_layout.plan(
            stored.num_heads, stored.num_kv_heads, 1
        )
        axes = sorted(
            {a for x in head_layout.HEAD_AXES for a in self.rules.mesh_axes(x)}
            & {a for a, n in self.mesh.shape.items() if n > 1}
        )
        where = ", ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
        return layout.describe(where, self.head_split)

    @functools.cached_property
    def logical_axes(self) -> dict[str, tuple]:
        """Every parameter's logical axes, by name."""
        return param_axes(self.config, self.quantized)

    def head_maps(self, name: str) -> head_layout.Maps | None:
        """For parameter ``name``, per dimension, the stored head each runtime head comes from
        (-1: a zero head); None when its stored and runtime layouts are the same."""
        layout = self.config.head_layout
        return None if layout is None else layout.maps(self.logical_axes[name])

    def stored_target(self, name: str, target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        """Parameter ``name``'s shape as a checkpoint stores it (``target``: the runtime one),
        sharded by the rules where the stored head count allows."""
        if self.head_maps(name) is None:
            return target
        axes = self.logical_axes[name]
        shape = self.config.head_layout.source_shape(target.shape, axes)
        sharding = self.rules.sharding(axes, shape, self.mesh)
        return jax.ShapeDtypeStruct(shape, target.dtype, sharding=sharding)

    def build(self, seed: int = 0) -> Transformer:
        return Transformer(
            self.config,
            dtype=self.dtype,
            mesh=self.mesh,
            rules=self.rules,
            quantized=self.quantized,
            scan_layers=self.scan_layers,
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
        the array for parameter ``name`` (per layer, e.g. ``"layers.0.attn.wq"``) with the
        target's shape, dtype and sharding. Parameters are made in name order, a stacked
        parameter's layers in layer order, each written into the stacked array in place."""
        log.info(self.describe_heads())
        graphdef, abstract_state = self.abstract()
        shardings = nnx.to_flat_state(self.shardings(abstract_state))
        flat = []
        for (path, var), (_, sharding) in zip(
            nnx.to_flat_state(abstract_state), shardings, strict=True
        ):
            name = ".".join(map(str, path))
            target = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding.get_value())
            if not is_stacked(name):
                flat.append((path, var.replace(make_array(name, target))))
                continue
            layer_target = jax.ShapeDtypeStruct(
                var.shape[1:], var.dtype, sharding=layer_sharding(target.sharding)
            )
            with startup.placing():
                stacked = _zeros(target)
            for i in range(var.shape[0]):
                layer = make_array(layer_name(name, i), layer_target)
                with startup.placing():
                    stacked = _set_layer(stacked, layer, np.int32(i))
                del layer
            flat.append((path, var.replace(stacked)))
        state = nnx.from_flat_state(flat)
        with startup.placing():
            jax.block_until_ready(state)
        return graphdef, state

    def fill_from_float(
        self,
        read: Callable[[str, jax.ShapeDtypeStruct], jax.Array],
        read_quantized: Callable[[str, dict], dict[str, jax.Array] | None] | None = None,
    ) -> tuple[nnx.GraphDef, nnx.State]:
        """``fill`` from a source that holds every weight in float (a Hugging Face folder, a
        float checkpoint): for a quantized spec, each weight is read as float into its shards,
        quantized there and dropped before the next, so no float copy of the model exists.
        ``read_quantized(name, targets)``: a weight and its scale already in this spec's
        format (a GGUF file's Q4_0 blocks), by parameter name, or None: read it as float."""
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
            stored = None if read_quantized is None else read_quantized(weight, targets)
            if stored is not None:
                done.update(stored)
                return done.pop(name)
            target = targets[weight]
            shape = quantize.float_shape(target.shape, target.dtype)
            as_float = jax.ShapeDtypeStruct(shape, self.dtype, sharding=target.sharding)
            float_weight = read(weight, as_float)
            done.update(quantize.quantize_into(float_weight, weight, targets, self.quantized))
            return done.pop(name)

        return self.fill(make)

    def targets(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Every parameter's shape, dtype and sharding, by per-layer name."""
        _, abstract = self.abstract()
        shardings = self.shardings(abstract)
        out = {}
        for (path, var), (_, sharding) in zip(
            nnx.to_flat_state(abstract), nnx.to_flat_state(shardings), strict=True
        ):
            name, sharding = ".".join(map(str, path)), sharding.get_value()
            if not is_stacked(name):
                out[name] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
                continue
            for i in range(var.shape[0]):
                out[layer_name(name, i)] = jax.ShapeDtypeStruct(
                    var.shape[1:], var.dtype, sharding=layer_sharding(sharding)
                )
        return dict(sorted(out.items()))

    def random_state(self, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
        """Random parameters (normal with std 0.02; norm scales 1), each drawn on the host
        and placed into its shards. Host drawing avoids compiling JAX's RNG for every
        parameter shape, which took over 10 s for a 4-layer model on a 2-core CPU. Drawn in
        the stored head layout, so a seed gives the same model on every mesh."""
        rng = np.random.default_rng(seed)

        def draw(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
            shape = self.stored_target(name, target).shape
            if name.endswith("norm.scale"):
                value = np.ones(shape, np.float32)
            else:
                value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
            value = value.astype(target.dtype)
            maps = self.head_maps(name)
            return jax.make_array_from_callback(
                target.shape,
                target.sharding,
                lambda index: head_layout.read_block(value.__getitem__, index, maps),
            )

        return self.fill_from_float(draw)


def param_axes(config: ModelConfig, quantized: str | None = None) -> dict[str, tuple]:
    """Every parameter's logical axes, by per-layer name, for a model of ``config`` (no mesh
    needed)."""
    model = nnx.eval_shape(lambda: Transformer(config, quantized=quantized, rngs=nnx.Rngs(0)))
    return {name: p.axes for name, p in named_params(nnx.state(model)).items()}


LAYERS = "layers."  # parameter names of decoder layers start with this


def default_scan_layers(mesh: Mesh) -> bool:
    """Scan stacked layers (compile time does not grow with depth) wherever each layer's
    weights are read in place: on TPU and GPU, and on a one-device CPU mesh with jaxllm's
    CPU kernels. XLA:CPU alone copies a scanned layer's weights out of their stack before
    its matmuls (``jaxllm.model``), so CPU meshes of several devices run layers unrolled."""
    if jax.default_backend() != "cpu":
        return True
    return mesh.size == 1 and cpu_kernels.registered()


def is_stacked(name: str) -> bool:
    """True for a runtime name of a stacked decoder-layer parameter (``layers.attn.wq``;
    an unscanned model's ``layers.0.attn.wq`` is one layer's)."""
    return name.startswith(LAYERS) and not name[len(LAYERS) :].split(".")[0].isdigit()


def layer_name(name: str, layer: int) -> str:
    """``layers.attn.wq``, 3 -> ``layers.3.attn.wq``: a stacked parameter's layer as
    checkpoints name it."""
    return f"{LAYERS}{layer}.{name[len(LAYERS) :]}"


def layer_sharding(sharding: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked array (the rules never split ``layers``)."""
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


@dataclasses.dataclass(frozen=True)
class NamedParam:
    """One parameter under its per-layer name: a whole array, or layer ``layer`` of a
    stacked one (sliced when ``value()`` is called, so a view of a model costs nothing)."""

    array: Any  # jax.Array, or a ShapeDtypeStruct for an abstract state
    axes: tuple  # logical axes of the (per-layer) value
    layer: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:] if self.layer is not None else self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype

    def value(self) -> jax.Array:
        if self.layer is None:
            return self.array
        out = None
        if isinstance(self.array.sharding, NamedSharding):
            out = layer_sharding(self.array.sharding)
        return _take_layer(self.array, np.int32(self.layer), out)


def named_params(state: nnx.State) -> dict[str, NamedParam]:
    """Flat ``{"layers.0.attn.wq": NamedParam}`` view of a state by per-layer names, in a
    stable order (layers in numeric order)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, value = ".".join(str(k) for k in path), var.get_value()
        axes = tuple(var.get_metadata().get("logical_axes") or ())
        if not is_stacked(name):
            out[name] = NamedParam(value, axes)
            continue
        for i in range(value.shape[0]):
            out[layer_name(name, i)] = NamedParam(value, axes[1:], i)
    return out


def param_bytes(state: nnx.State) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


# Stacking at load: the stacked array starts as zeros in its shards and each layer is
# written into it in place (donated), compiled once per parameter shape.
def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
    return _zeros_in(target.shape, jnp.dtype(target.dtype), target.sharding)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros_in(shape, dtype, sharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


@functools.partial(jax.jit, static_argnums=2)
def _take_layer(stacked: jax.Array, i, out_sharding) -> jax.Array:
    layer = jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)
    if out_sharding is None:
        return layer
    return jax.lax.with_sharding_constraint(layer, out_sharding)
