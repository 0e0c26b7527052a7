"""Pure jitted model steps over split-once state.

The module is split into a graph definition and a flat list of parameter arrays once; each
step is a plain ``jax.jit`` function of (arrays, tokens, positions, cache) that rebuilds the
module at trace time only. The cache argument is donated, so XLA updates it in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm.kv_cache import KVCache
from jaxllm.params import ModelSpec


class ModelRunner:
    def __init__(self, spec: ModelSpec, graphdef: nnx.GraphDef, state: nnx.State):
        self.spec = spec
        self.config = spec.config
        self.graphdef = graphdef
        self.params, self._treedef = jax.tree.flatten(state)
        self.forward = jax.jit(self._forward, donate_argnames="cache")
        self.forward_at = jax.jit(
            self._forward_at, donate_argnames="cache", static_argnames="attend_len"
        )

    @property
    def state(self) -> nnx.State:
        return jax.tree.unflatten(self._treedef, self.params)

    def _model(self, params):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, params))

    def _forward(
        self, params, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: KVCache
    ) -> tuple[Float[Array, "B T V"], KVCache]:
        """Logits at every position (scoring); writes the tokens' keys/values to the cache."""
        model = self._model(params)
        hidden, cache = model(tokens, positions, cache)
        return model.logits(hidden), cache

    def _forward_at(
        self,
        params,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: KVCache,
        last: Int[Array, " B"],
        attend_len: int | None = None,
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """Logits of one position per row (``last``: the row's final real token), so a
        padded prompt or a decode step never computes the vocabulary head for every token.
        ``attend_len``: see ``Transformer.__call__``."""
        model = self._model(params)
        hidden, cache = model(tokens, positions, cache, attend_len)
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
        return model.logits(picked)[:, 0], cache

    def new_cache(self, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty cache; ``dtype`` None holds the model's dtype, ``"int8"`` quantizes."""
        cfg, spec = self.config, self.spec
        return KVCache.create(
            cfg.num_layers,
            batch,
            max_len,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype or spec.dtype,
            spec.mesh,
            spec.rules,
        )
