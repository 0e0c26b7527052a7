"""The Llama-family transformer (Llama 2/3/3.1, Mistral, Qwen2) in Flax NNX.

Why NNX: parameters are plain attributes that carry their logical axis names as metadata
(``logical_axes``) where they are created, and ``nnx.split`` turns the module into a static
graph definition plus a state pytree. The serving runtime splits once and calls a pure
``jax.jit`` function of that state (measured: ~0.1 ms per call against ~1.5 ms for
``nnx.jit``), so NNX's convenience costs nothing on the hot path.

Weights are stored ``[out, in]``, as Hugging Face and PyTorch store them, with heads as their
own dimension (``wq: [N, H, D]``), so every einsum names its dimensions and sharding rules can
address heads directly. ``[out, in]`` because XLA's CPU backend streams a weight 17-25% faster
that way at 1-32 rows (measured here, interleaved in one process; 10% slower at 64 rows), and
small-batch decode is bound by streaming the weights. Shapes use the glossary in
``jaxllm.config``.

Layers are scanned (``scan_layers``, the default wherever layers are read in place): every
decoder layer's parameter is one array with a leading ``layers`` axis (``layers.attn.wq:
[L, N, H, D]``), and ``jax.lax.scan`` runs one traced copy of the layer over it, so a
program's size and compile time do not grow with depth. XLA:CPU copies a layer's slice out
of a stacked weight before each matmul (measured: a 24-layer 1.1 GB model's decode step 193
ms scanned against 71 ms unrolled), so the scan hands each layer its linear weights whole,
with the layer's index, and on one CPU device jaxllm's kernels (``jaxllm.cpu_kernels``)
read the layer where it lies; on CPU meshes of several devices, where a custom kernel cannot
run, layers are unrolled by default: one array per layer and a Python loop
(``layers.0.attn.wq``). Either way the KV pool is one ``[L, ...]`` array, indexed by layer,
updated in place (in the scan's carry when scanned). Checkpoints name layers one by one;
``jaxllm.params`` stacks them at load when the model scans.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from jaxllm import attention, attention_kernels, kv_cache, moe, quantize, rope
from jaxllm.config import ModelConfig
from sharding import ShardingRules, constrain

_init = jax.nn.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_init) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Layout:
    """Mesh and rules used to pin activations at block boundaries (None: no constraints).

    Held by the module as a static attribute, so it is fixed at trace time like the shapes.
    """

    def __init__(self, mesh: Mesh | None, rules: ShardingRules | None):
        self.mesh, self.rules = mesh, rules
        # One device: custom kernels (jaxllm.cpu_kernels), which XLA cannot split, may run.
        self.local = mesh is None or mesh.size == 1

    def __call__(self, x: Array, *names: str | None) -> Array:
        if self.mesh is None or self.rules is None:
            return x
        return constrain(x, names, self.mesh, self.rules)


class RMSNorm(nnx.Module):
    """RMSNorm over the last dimension (the model width, or a head's for query/key norms).

    ``plus_one`` (Gemma): the output is multiplied by ``1 + scale`` in float32 and then cast;
    otherwise (Llama) the normalised input is cast first and multiplied by ``scale``, each as
    its Hugging Face reference rounds in bfloat16."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, plus_one: bool = False):
        init = jax.nn.initializers.zeros if plus_one else jax.nn.initializers.ones
        self.scale = _param(rngs, (dim,), ("norm",), dtype, init)
        self.eps, self.plus_one = eps, plus_one

    def __call__(self, x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
        # Normalise in float32 whatever the activation dtype, as Hugging Face does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        if self.plus_one:
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale * x32.astype(x.dtype)


def _norm(cfg: ModelConfig, dim: int, dtype, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, dtype, rngs, plus_one=cfg.norm_plus_one)


def _weight(
    rngs: nnx.Rngs, shape, axes, dtype, quantized: str | None, in_dims: int = 1
) -> tuple[nnx.Param, nnx.Param | None]:
    """A linear layer's weight and, when ``quantized`` (a ``jaxllm.quantize`` method), its
    scale: per output channel (int8) over the weight's output axes, or per group of input
    channels (int4, ``-gN``) over all its axes, the last counting groups."""
    if quantized is None:
        return _param(rngs, shape, axes, dtype), None
    q, scale = quantize.quantize(_init(rngs.params(), shape, jnp.float32), in_dims, quantized)
    scale_axes = axes if scale.ndim == len(shape) else axes[: len(shape) - in_dims]
    return nnx.Param(q, logical_axes=axes), nnx.Param(scale, logical_axes=scale_axes)


def _int8(quantized: str | None) -> str | None:
    """The method of weights that stay int8 per channel (``quantize.method_for``)."""
    return quantize.INT8 if quantized else None


def _scale(p: nnx.Param | None):
    return None if p is None else p[...]


def _linear(module, x, weight: nnx.Param, scale: nnx.Param | None, layer, in_dims: int = 1):
    """``quantize.linear`` of a layer's weight, as its module is laid out: ``layer`` of the
    stacked weight when the module is a scanned model's stack of layers."""
    return quantize.linear(
        x,
        weight[...],
        _scale(scale),
        in_dims,
        kernel=module.layout.local,
        layer=layer if module.stacked else None,
    )


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layout: Layout,
        dtype,
        quantized,
        rngs,
        kernels: attention_kernels.AttentionKernels,
        stacked: bool = False,
    ):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = ("q_heads", "head_dim", "embed"), ("kv_heads", "head_dim", "embed")
        self.wq, self.wq_scale = _weight(rngs, (N, H, D), q, dtype, quantized)
        self.wk, self.wk_scale = _weight(rngs, (K, H, D), kv, dtype, quantized)
        self.wv, self.wv_scale = _weight(rngs, (K, H, D), kv, dtype, quantized)
        o = ("embed", "q_heads", "head_dim")
        self.wo, self.wo_scale = _weight(rngs, (D, N, H), o, dtype, quantized, in_dims=2)
        self.qkv_bias = cfg.qkv_bias
        if cfg.qkv_bias:
            self.bq = _param(rngs, (N, H), ("q_heads", "head_dim"), dtype)
            self.bk = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype)
            self.bv = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype)
        self.o_bias = cfg.o_bias
        if cfg.o_bias:
            self.bo = _param(rngs, (D,), ("embed",), dtype)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one scale per head dimension, shared by every head
            self.q_norm = _norm(cfg, H, dtype, rngs)
            self.k_norm = _norm(cfg, H, dtype, rngs)
        # Queries are pre-multiplied so that the attention functions' H**-0.5 gives the
        # model's own scale (Gemma 3: query_pre_attn_scalar**-0.5); None: H**-0.5 is it.
        scalar = cfg.query_pre_attn_scalar
        self.query_scale = None if scalar is None else (H / scalar) ** 0.5
        self.num_kv_heads, self.head_dim = K, H
        self.layout = layout
        self.kernels = kernels  # which attention code runs (jaxllm.attention_kernels)
        self.stacked = stacked  # weights hold every layer (_linear; Transformer._scan_layers)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        cos: Float[Array, "B T H"],
        sin: Float[Array, "B T H"],
        pool: kv_cache.KVPool | None,
        layer: Int[Array, ""] | int,
        step: attention.PagedBatch | None,
        block_pages: int,
        kv_dtype,
        window: attention.Window,
    ) -> tuple[Float[Array, "B T D"], kv_cache.KVPool | None]:
        """This layer's attention; with a pool and a step, writes the step's keys and values
        into layer ``layer`` of the pool and reads each row's pages from it."""
        # [B, T, N or K, H]: the weights are read in their stored [out, in] order.
        q = _linear(self, x, self.wq, self.wq_scale, layer)
        k = _linear(self, x, self.wk, self.wk_scale, layer)
        v = _linear(self, x, self.wv, self.wv_scale, layer)
        if self.qkv_bias:
            q, k, v = q + self.bq[None, None], k + self.bk[None, None], v + self.bv[None, None]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope.apply_rotary(q, cos, sin)
        k = rope.apply_rotary(k, cos, sin)
        if self.query_scale is not None:
            q = q * jnp.asarray(self.query_scale, q.dtype)
        q = self.layout(q, "act_batch", "act_length", "act_heads", None)
        B, T, N, H = q.shape

        if step is None:  # no pool: the tokens attend to themselves
            out = self.kernels.causal(q, k, v, positions, window, kv_dtype)
        else:  # one engine step: B == 1, the step's tokens flattened on T
            pool = kv_cache.write(pool, layer, k[0], v[0], step.slots)
            # Decode rows carry Q queries each: one, or a token and its drafts to verify.
            Sd, Q = step.decode.positions.shape
            Sp, C = step.prefill.positions.shape
            parts = []
            if Sd:
                rows = q[0, : Sd * Q].reshape(Sd, Q, N, H)
                attend = self.kernels.paged
                parts.append(attend(rows, step.decode, pool, layer, window, block_pages))
            if Sp:
                rows = q[0, Sd * Q :].reshape(Sp, C, N, H)
                # A kernel chosen for decode rows falls back to pure JAX for these.
                attend = self.kernels.paged
                parts.append(attend(rows, step.prefill, pool, layer, window, block_pages))
            out = jnp.concatenate([p.reshape(-1, N, H) for p in parts])[None]
        # [B, T, N*H] @ [D, N*H].T, merged explicitly: left to einsum, XLA's CPU backend picked
        # the contraction order (H, N) and transposed all of wo on every decode step.
        out = out.reshape(B, T, N * H)
        out = _linear(self, out, self.wo, self.wo_scale, layer, 2)
        if self.o_bias:
            out = out + self.bo[None, None]
        return out, pool


class MLP(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, layout: Layout, dtype, quantized, rngs: nnx.Rngs, stacked=False
    ):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.w_gate, self.w_gate_scale = _weight(rngs, (F, D), ("mlp", "embed"), dtype, quantized)
        self.w_up, self.w_up_scale = _weight(rngs, (F, D), ("mlp", "embed"), dtype, quantized)
        self.w_down, self.w_down_scale = _weight(rngs, (D, F), ("embed", "mlp"), dtype, quantized)
        self.activation = cfg.mlp_activation
        self.layout = layout
        self.stacked = stacked  # weights hold every layer (_linear; Transformer._scan_layers)

    def __call__(
        self, x: Float[Array, "B T D"], layer: Int[Array, ""] | int = 0
    ) -> Float[Array, "B T D"]:
        """The MLP of layer ``layer`` (which layer of the weights, when they are stacked)."""
        gate = _linear(self, x, self.w_gate, self.w_gate_scale, layer)
        up = _linear(self, x, self.w_up, self.w_up_scale, layer)
        # SwiGLU, or GeGLU with the tanh approximation (Gemma's gelu_pytorch_tanh).
        gate = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, True)
        hidden = self.layout(gate * up, "act_batch", "act_length", "act_mlp")
        return _linear(self, hidden, self.w_down, self.w_down_scale, layer)


class MoE(nnx.Module):
    """A Mixture-of-Experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k
    experts, whose SwiGLU outputs are summed with the routing weights (``jaxllm.moe``: the
    dispatch, and expert/tensor parallelism over the mesh). The router stays in float."""

    def __init__(self, cfg: ModelConfig, layout: Layout, dtype, quantized, rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
        self.router = _param(rngs, (E, D), (None, "embed"), dtype)
        for name, shape in (("w_gate", (E, F, D)), ("w_up", (E, F, D)), ("w_down", (E, D, F))):
            w, scale = _weight(rngs, shape, moe.WEIGHT_AXES[name], dtype, _int8(quantized))
            setattr(self, name, w)
            setattr(self, name + "_scale", scale)
        self.top_k, self.normalize = cfg.experts_per_token, cfg.normalize_expert_weights
        self.layout = layout

    def __call__(
        self, x: Float[Array, "B T D"], token_mask: Array | None = None
    ) -> tuple[Float[Array, "B T D"], Float[Array, " E"]]:
        """The layer's output and how many of the (``token_mask``ed) tokens each expert got."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = jnp.einsum("TD,ED->TE", flat, self.router[...], preferred_element_type=jnp.float32)
        weights, experts = moe.route(logits, self.top_k, self.normalize)
        scales = [_scale(getattr(self, m + "_scale")) for m in moe.MATRICES]
        y, _ = moe.experts_mlp(
            flat,
            # Qwen3-MoE rounds the routing weights to the model dtype; Mixtral keeps them in
            # float32, so in bfloat16 its weights are rounded here one step before HF's.
            weights.astype(x.dtype),
            experts,
            self.w_gate[...],
            self.w_up[...],
            self.w_down[...],
            None if scales[0] is None else scales,
            mesh=self.layout.mesh,
            rules=self.layout.rules,
        )
        real = jnp.ones((B * T,)) if token_mask is None else token_mask.reshape(-1)
        real = real.astype(jnp.float32)
        load = jnp.zeros(self.router.shape[0], jnp.float32).at[experts].add(real[:, None])
        return y.reshape(B, T, D), load


class Block(nnx.Module):
    """One decoder layer. A scanned model holds a single Block whose parameters are stacked
    over layers (``stacked_blocks``; the scan hands each layer its slices of the small ones
    and the linear weights whole, ``stacked``, with the layer's index); an unrolled one holds
    one per layer. ``Transformer.block(i)`` is layer ``i`` alone."""

    def __init__(
        self,
        cfg: ModelConfig,
        layout: Layout,
        dtype,
        quantized,
        rngs: nnx.Rngs,
        kernels,
        stacked: bool = False,
    ):
        D = cfg.hidden_size
        self.attn_norm = _norm(cfg, D, dtype, rngs)
        self.attn = Attention(cfg, layout, dtype, quantized, rngs, kernels, stacked)
        self.mlp_norm = _norm(cfg, D, dtype, rngs)
        if cfg.num_experts:
            self.moe = MoE(cfg, layout, dtype, quantized, rngs)
        else:
            self.mlp = MLP(cfg, layout, dtype, quantized, rngs, stacked)
        self.num_experts = cfg.num_experts
        self.sandwich_norms = cfg.sandwich_norms
        if cfg.sandwich_norms:  # Gemma 3: each branch normalised again before the residual
            self.attn_post_norm = _norm(cfg, D, dtype, rngs)
            self.mlp_post_norm = _norm(cfg, D, dtype, rngs)
        self.layout = layout

    def __call__(
        self, x, positions, cos, sin, pool, layer, step, block_pages, kv_dtype, window, mask
    ):
        """The layer's output, the pool, and the tokens each expert got ([E]; [0] if dense)."""
        attn_out, pool = self.attn(
            self.attn_norm(x), positions, cos, sin, pool, layer, step, block_pages, kv_dtype, window
        )
        if self.sandwich_norms:
            attn_out = self.attn_post_norm(attn_out)
        x = x + attn_out
        if self.num_experts:
            mlp_out, load = self.moe(self.mlp_norm(x), mask)
        else:
            mlp_out, load = self.mlp(self.mlp_norm(x), layer), jnp.zeros((0,), jnp.float32)
        if self.sandwich_norms:
            mlp_out = self.mlp_post_norm(mlp_out)
        x = x + mlp_out
        return self.layout(x, "act_batch", "act_length", "act_embed"), pool, load


def stacked_blocks(
    cfg: ModelConfig, layout: Layout, dtype, quantized, rngs: nnx.Rngs, kernels
) -> Block:
    """One Block whose every parameter holds all layers on a leading ``layers`` axis (layer
    ``i`` at index ``i``, initialised as its own Block would be)."""
    blocks = [
        Block(cfg, layout, dtype, quantized, rngs, kernels, stacked=True)
        for _ in range(cfg.num_layers)
    ]
    split = [nnx.split(block) for block in blocks]

    def stack(*layers: nnx.Variable) -> nnx.Variable:
        axes = ("layers", *layers[0].get_metadata()["logical_axes"])
        value = jnp.stack([v.get_value() for v in layers])
        return layers[0].replace(value, logical_axes=axes)

    states = [state for _, state in split]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(split[0][0], stacked)


# The weights that _linear reads (and their scales): a scanned model hands them to each layer
# whole, with the layer's index, rather than slices of them.
_LINEAR_WEIGHTS = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_down")}


def _read_by_linear(path: tuple, _value) -> bool:
    """An ``nnx.split`` filter: a Block's parameters that ``_linear`` reads."""
    if len(path) != 2:
        return False
    return str(path[1]).removesuffix("_scale") in _LINEAR_WEIGHTS.get(str(path[0]), ())


class Transformer(nnx.Module):
    """Token ids in, hidden states and an updated KV cache out; ``logits`` applies the head."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        quantized: str | None = None,
        scan_layers: bool = True,
        kernels: attention_kernels.AttentionKernels | None = None,
        rngs: nnx.Rngs,
    ):
        """``quantized`` (a ``jaxllm.quantize`` method: "int8", "int4", "int4-g128", ...):
        every linear weight of the layers in that format, the embedding, the head and any
        experts in int8 with per-output-channel scales; norms stay in ``dtype``.
        ``scan_layers``: stacked layers run by ``jax.lax.scan``, else one Block per layer
        (see the module docstring). ``kernels``: the attention implementations; None: the
        backend's (``jaxllm.attention_kernels.choose``)."""
        self.config = cfg
        self.scan_layers = scan_layers
        kernels = kernels or attention_kernels.choose()
        self.dtype = dtype
        layout = Layout(mesh, rules)
        table = (cfg.vocab_size, cfg.hidden_size)
        self.embed, self.embed_scale = _weight(
            rngs, table, ("vocab", "embed"), dtype, _int8(quantized)
        )
        if scan_layers:
            self.layers = stacked_blocks(cfg, layout, dtype, quantized, rngs, kernels)
        else:
            self.layers = nnx.List(
                [Block(cfg, layout, dtype, quantized, rngs, kernels) for _ in range(cfg.num_layers)]
            )
        self.final_norm = _norm(cfg, cfg.hidden_size, dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head, self.lm_head_scale = _weight(
                rngs, table, ("vocab", "embed"), dtype, _int8(quantized)
            )
        self.layout = layout

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        pool: kv_cache.KVPool | None = None,
        step: attention.PagedBatch | None = None,
        *,
        block_pages: int = 8,
        kv_dtype=None,
    ) -> tuple[Float[Array, "B T D"], kv_cache.KVPool | None]:
        """Hidden states of ``tokens``. Without a pool, plain causal attention over the
        tokens themselves (``kv_dtype="int8"`` rounds keys/values as an int8 pool would).
        With a pool and an engine ``step`` (``B == 1``: the step's tokens flattened), each
        token's key/value is written to its page and attention reads each sequence's pages
        (``jaxllm.attention.paged``, ``block_pages`` pages per loop iteration, static)."""
        hidden, pool, _ = self.forward(
            tokens, positions, pool, step, block_pages=block_pages, kv_dtype=kv_dtype
        )
        return hidden, pool

    def forward(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        pool: kv_cache.KVPool | None = None,
        step: attention.PagedBatch | None = None,
        *,
        block_pages: int = 8,
        kv_dtype=None,
        token_mask: Array | None = None,
    ) -> tuple[Float[Array, "B T D"], kv_cache.KVPool | None, Float[Array, "L E"]]:
        """``__call__``, plus how many tokens each layer routed to each expert (a
        Mixture-of-Experts model; ``[L, 0]`` for a dense one), counting only the tokens of
        ``token_mask`` (None: all)."""
        x = quantize.embed(self.embed[...], _scale(self.embed_scale), tokens, self.dtype)
        if self.config.scale_embeddings:  # by sqrt(D) rounded to the weights' dtype, as HF
            x = x * jnp.asarray(self.config.hidden_size**0.5, self.dtype)
        x = self.layout(x, "act_batch", "act_length", "act_embed")
        angles = self.rotary_angles(positions)
        args = (positions, angles, pool, step, block_pages, kv_dtype, token_mask)
        x, pool, load = (self._scan_layers if self.scan_layers else self._loop_layers)(x, *args)
        return self.final_norm(x), pool, load

    def rotary_angles(self, positions: Int[Array, "B T"]) -> Float[Array, "2 R B T H"]:
        """``(cos, sin)`` of every rope the layers use, stacked on ``R``: the model's rope,
        then, where local layers have their own base (``local_rope_theta``), theirs."""
        cfg = self.config
        ropes = [(cfg.rope_theta, cfg.rope_scaling)]
        if cfg.local_rope_theta is not None:
            ropes.append((cfg.local_rope_theta, None))
        tables = [
            rope.rotary_angles(positions, jnp.asarray(rope.inverse_frequencies(cfg.head_dim, *r)))
            for r in ropes
        ]
        return jnp.stack([jnp.stack(pair) for pair in zip(*tables, strict=True)])

    def _loop_layers(self, x, positions, angles, pool, step, block_pages, kv_dtype, mask):
        """Runs one Block per layer in a Python loop (traced once per layer)."""
        loads = []
        for i, block in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                window = self.config.window(i)
                cos, sin = angles[:, int(self.config.uses_local_rope(i))]
                x, pool, load = block(
                    x, positions, cos, sin, pool, i, step, block_pages, kv_dtype, window, mask
                )
                loads.append(load)
        return x, pool, jnp.stack(loads)

    def _scan_layers(self, x, positions, angles, pool, step, block_pages, kv_dtype, mask):
        """Runs the stacked layers in order with ``jax.lax.scan``: one traced layer, the
        residual stream and the pool carried from layer to layer. The linear weights go to
        every layer whole, with the layer's index (``_linear``): sliced per layer, XLA:CPU
        copies each out of its stack before the matmul."""
        graphdef, whole, state = nnx.split(self.layers, _read_by_linear, ...)
        windows = self.windows()
        per_layer = isinstance(windows, np.ndarray)
        L = self.config.num_layers
        ropes = np.array([self.config.uses_local_rope(i) for i in range(L)], np.int32)

        def layer(carry, xs):
            x, pool = carry
            params, i, window, which_rope = xs
            block = nnx.merge(graphdef, whole, params)
            window = window if per_layer else windows
            cos, sin = angles[:, which_rope]
            with jax.named_scope("layer"):
                x, pool, load = block(
                    x, positions, cos, sin, pool, i, step, block_pages, kv_dtype, window, mask
                )
            return (x, pool), load

        layer_windows = jnp.asarray(windows) if per_layer else None
        xs = (state, jnp.arange(L, dtype=jnp.int32), layer_windows, jnp.asarray(ropes))
        (x, pool), loads = jax.lax.scan(layer, (x, pool), xs)
        return x, pool, loads

    def windows(self) -> attention.Window | np.ndarray:
        """The sliding window every layer shares (None: none), or, where layers differ, one
        per layer as an int32 array (``attention.NO_WINDOW`` for a layer without)."""
        windows = {self.config.window(i) for i in range(self.config.num_layers)}
        if len(windows) == 1:
            return windows.pop()
        return np.array(
            [self.config.window(i) or attention.NO_WINDOW for i in range(self.config.num_layers)],
            np.int32,
        )

    def block(self, i: int) -> tuple[Block, attention.Window]:
        """Layer ``i`` as a Block of its own (its slice of every stacked parameter) and its
        window: for code that looks inside layers (pruning's calibration)."""
        if not self.scan_layers:
            return self.layers[i], self.config.window(i)
        graphdef, state = nnx.split(self.layers)
        windows = self.windows()
        window = int(windows[i]) if isinstance(windows, np.ndarray) else windows
        block = nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))
        for part in (block.attn, getattr(block, "mlp", None)):
            if part is not None:
                part.stacked = False  # its weights are layer i's alone now
        return block, window

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        with jax.named_scope("lm_head"):
            if self.config.tie_word_embeddings:
                head, scale = self.embed, self.embed_scale
            else:
                head, scale = self.lm_head, self.lm_head_scale
            out = quantize.linear(
                hidden, head[...], _scale(scale), out_dtype=jnp.float32, kernel=self.layout.local
            )
            return self.layout(out, "act_batch", "act_length", "act_vocab")
