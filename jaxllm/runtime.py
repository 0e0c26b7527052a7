"""Pure jitted model calls over split-once state.

The module is split into a graph definition and a flat list of parameter arrays once; each
call is a plain ``jax.jit`` function of (arrays, inputs) that rebuilds the module at trace
time only. The engine's step (``jaxllm.step``) builds on ``model``; ``forward`` is the plain
causal pass used for scoring.
"""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm.kv_cache import KVPool
from jaxllm.model import Transformer
from jaxllm.params import ModelSpec


class ModelRunner:
    def __init__(self, spec: ModelSpec, graphdef: nnx.GraphDef, state: nnx.State):
        self.spec = spec
        self.config = spec.config
        self.graphdef = graphdef
        self.params, self._treedef = jax.tree.flatten(state)
        self.forward = jax.jit(self._forward, static_argnames="kv_dtype")

    @property
    def state(self) -> nnx.State:
        return jax.tree.unflatten(self._treedef, self.params)

    def model(self, params) -> Transformer:
        """The module over ``params`` (inside a traced function: no arrays are copied)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, params))

    def _forward(
        self, params, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], kv_dtype=None
    ) -> Float[Array, "B T V"]:
        """float32 logits at every position of a causal pass over ``tokens``."""
        model = self.model(params)
        hidden, _ = model(tokens, positions, kv_dtype=kv_dtype)
        return model.logits(hidden)

    def new_pool(self, num_pages: int, page_size: int, dtype: str | None = None) -> KVPool:
        """An empty KV pool; ``dtype`` None holds the model's dtype, ``"int8"`` quantizes."""
        cfg, spec = self.config, self.spec
        return KVPool.create(
            cfg.num_layers,
            num_pages,
            page_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype or spec.dtype,
            spec.mesh,
            spec.rules,
            stacked=spec.scan_layers,
        )
