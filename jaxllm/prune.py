"""Structured pruning: remove whole MLP channels (and attention heads), leaving a smaller
dense model of the same architecture that loads, shards and serves like any other.

Importance measure (Wanda-style, computed per layer ``l`` and MLP channel ``j``)::

    score[l, j] = mean over calibration tokens of |silu(gate_j) * up_j|  *  ||w_down[:, j]||_2

i.e. the expected size of channel ``j``'s contribution to the layer's output: how strongly
it fires on real text times how much each unit of its activation moves the residual stream.
Weight norms alone ignore which channels the data uses; activations alone ignore how much
a channel's output column amplifies it. Each layer keeps its highest-scored channels, the
same number in every layer, because ``ModelConfig`` has one ``intermediate_size``. The kept
width is rounded up to a multiple of ``multiple`` (default 8), so the new ``F`` still
divides a tensor-parallel axis of that size (and more with a larger multiple; choose the
tensor degree times 128 for TPU lanes). Kept channels stay in their original order.

Attention heads can go too (``HEAD_MEASURE``: per query head, the mean norm of its share of
the output projection's result). With grouped-query attention every KV group keeps the same
number of its highest-scored query heads, so N stays a multiple of K and the KV cache is
unchanged; with one query head per KV head, whole heads go with their key/value heads.

Pruning runs on float weights (prune first, then quantize) in one process: the parameters
are gathered to the host, cut, and placed again into the shards of the model's mesh. Heads
are scored and cut in the stored layout (``config.stored``), whatever copies and zero heads
the mesh added (``jaxllm.head_layout``); ``place`` adds them again for its mesh.

Shapes use the glossary in ``jaxllm.config``; ``n`` is a number of token windows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm import demo, head_layout, orbax_checkpoint, rope
from jaxllm.config import ModelConfig
from jaxllm.engine import Engine, EngineConfig
from jaxllm.llm import LLM
from jaxllm.params import ModelSpec, named_params, param_axes
from jaxllm.runtime import ModelRunner
from jaxllm.tokenizer import Tokenizer

MEASURE = (
    "per layer, per MLP channel j: mean over calibration tokens of |silu(gate_j) * up_j| "
    "times the L2 norm of w_down[:, j] (Wanda-style expected output contribution)"
)
HEAD_MEASURE = (
    "per layer, per query head n: mean over calibration tokens of ||wo[:, n, :] @ o_n||_2, "
    "the L2 norm of the head's contribution to the attention output"
)
PRUNING_FILE = "pruning.json"  # written beside config.json in a pruned checkpoint
DEFAULT_MULTIPLE = 8

# Parameters whose MLP axis is cut, and which axis of the stored [out, in] array it is.
_MLP_AXES = {"mlp.w_gate": 0, "mlp.w_up": 0, "mlp.w_down": 1}


def check_prunable(config: ModelConfig) -> None:
    """Pruning's calibration replays the Llama-family layer (one rope, SwiGLU, two norms per
    layer) and prunes dense MLPs: Gemma 3's layers and Mixture-of-Experts models are refused
    rather than scored wrong."""
    if config.num_experts:
        raise ValueError(
            f"{config.architecture}: pruning Mixture-of-Experts models is not supported"
        )
    if config.sandwich_norms or config.local_rope_theta or config.mlp_activation != "silu":
        raise ValueError(f"{config.architecture}: pruning supports Llama, Mistral, Qwen2 and Qwen3")


def _runner(model: LLM | ModelRunner) -> ModelRunner:
    """The model's runner, once its family is known to be prunable."""
    runner = model.runner if isinstance(model, LLM) else model
    check_prunable(runner.config)
    return runner


# -- text -> token windows --------------------------------------------------------------------


def token_windows(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    length: int,
    *,
    stride: int | None = None,
    limit: int | None = None,
) -> Int[np.ndarray, "n length"]:
    """Windows of ``length`` tokens from the texts packed into one stream (each text
    encoded with its special tokens, then an EOS), every ``stride`` tokens (default
    ``length``: non-overlapping), at most ``limit`` of them, from the start.

    Perplexity takes ``length = T + 1, stride = T`` (as ``scripts/train_demo.py`` scored
    the demo model): each window predicts its last T tokens, every token once."""
    stride = stride or length
    eos = sorted(tokenizer.eos_ids)[:1]
    stream = np.asarray([t for text in texts for t in [*tokenizer.encode(text), *eos]], np.int32)
    n = max(0, (len(stream) - length) // stride + 1)
    n = n if limit is None else min(n, limit)
    if n == 0:
        raise ValueError(
            f"the text gives {len(stream)} tokens, fewer than one window of {length}; "
            "give more text"
        )
    return np.stack([stream[i * stride : i * stride + length] for i in range(n)])


def demo_texts() -> tuple[list[str], list[str]]:
    """(calibration, evaluation) texts for the bundled demo model: the second and the first
    half of the files it never trained on (rebuilt from this interpreter's stdlib; raises
    ``FileNotFoundError`` on another Python version). The first half holds the sample that
    ``tests/test_demo_model.py`` scores."""
    files = demo.heldout_files()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    half = len(texts) // 2
    return texts[half:], texts[:half]


# -- measuring --------------------------------------------------------------------------------


def _head_outputs(attn, x: Float[Array, "B T D"], *args) -> Float[Array, "B T N H"]:
    """Each query head's attention output before the output projection: the module's own
    attention math, run with an identity output projection and no output bias."""
    wo, o_bias = attn.wo, attn.o_bias
    _, N, H = wo[...].shape
    attn.wo = nnx.Param(jnp.eye(N * H, dtype=wo[...].dtype).reshape(N * H, N, H))
    attn.o_bias = False
    try:
        out, _ = attn(x, *args)
    finally:
        attn.wo, attn.o_bias = wo, o_bias
    B, T, _ = out.shape
    return out.reshape(B, T, N, H)


def _calibration_sums(
    model, tokens: Int[Array, "B T"], weight: Float[Array, " B"]
) -> tuple[Float[Array, "L F"], Float[Array, "L N"]]:
    """Sums over the (weighted) tokens of |silu(gate_j) * up_j| per layer and MLP channel,
    and of ||wo[:, n, :] @ o_n||_2 per layer and query head.

    Runs the model's own submodules block by block, so that each MLP's input and each
    attention's heads are at hand (the model's forward returns only the final hidden state).
    Every token attends to its window's earlier tokens by the model's plain causal
    attention (no KV pool, as in a forward pass without one). XLA shares the work that the
    statistics repeat (the gate and up matmuls, the attention itself)."""
    cfg = model.config
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    x = jnp.take(model.embed[...], tokens, axis=0)
    inv_freq = rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope.rotary_angles(positions, jnp.asarray(inv_freq))
    mlp_sums, head_sums = [], []
    for i in range(cfg.num_layers):
        block, window = model.block(i)
        h = block.attn_norm(x)
        # No pool and no engine step: causal attention (block_pages is then unused).
        args = (positions, cos, sin, None, 0, None, 8, None, window)
        attn_out, _ = block.attn(h, *args)
        heads = _head_outputs(block.attn, h, *args)
        wo = block.attn.wo[...]  # [D, N, H]
        # ||wo_n o_n||^2 = o_n^T (wo_n^T wo_n) o_n: no [B, T, N, D] intermediate.
        gram = jnp.einsum("DNH,DNI->NHI", wo, wo)
        squared = jnp.einsum("BTNH,NHI,BTNI->BTN", heads, gram, heads).astype(jnp.float32)
        head_sums.append(jnp.einsum("BTN,B->N", jnp.sqrt(jnp.maximum(squared, 0.0)), weight))
        x = x + attn_out

        h = block.mlp_norm(x)
        mlp = block.mlp
        # [B, T, F]: what w_down reads.
        act = jax.nn.silu(jnp.einsum("BTD,FD->BTF", h, mlp.w_gate[...])) * jnp.einsum(
            "BTD,FD->BTF", h, mlp.w_up[...]
        )
        mlp_sums.append(jnp.einsum("BTF,B->F", jnp.abs(act).astype(jnp.float32), weight))
        x = x + mlp(h)
    return jnp.stack(mlp_sums), jnp.stack(head_sums)


@dataclasses.dataclass(frozen=True)
class Importance:
    """Pruning scores from one calibration run: ``mlp`` [L, F] (``MEASURE``) and ``heads``
    [L, N] (``HEAD_MEASURE``, stored query heads). Higher means more important."""

    mlp: Float[np.ndarray, "L F"]
    heads: Float[np.ndarray, "L N"]


def importance(
    model: LLM | ModelRunner, windows: Int[np.ndarray, "n T"], *, batch: int = 8
) -> Importance:
    """Scores every MLP channel and query head of ``model`` on the calibration token
    ``windows`` (``token_windows(tokenizer, texts, T)``), ``batch`` windows per call."""
    runner = _runner(model)
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(
            f"calibration windows must be a non-empty [n, T] array, got {windows.shape}"
        )
    if windows.shape[1] > runner.config.max_position_embeddings:
        raise ValueError(
            f"calibration windows of {windows.shape[1]} tokens exceed the model's context "
            f"({runner.config.max_position_embeddings})"
        )
    graphdef = runner.graphdef

    @jax.jit
    def sums_of(state, tokens, weight):
        return _calibration_sums(nnx.merge(graphdef, state), tokens, weight)

    state, mlp, heads = runner.state, 0.0, 0.0
    for start in range(0, len(windows), batch):
        rows = windows[start : start + batch]
        weight = np.zeros(batch, np.float32)
        weight[: len(rows)] = 1.0
        # The last batch is padded with copies of its first row, weighted 0: one shape, one compile.
        tokens = np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])
        mlp_part, heads_part = sums_of(state, tokens, weight)
        mlp = mlp + np.asarray(mlp_part, np.float64)
        heads = heads + np.asarray(heads_part, np.float64)
    count = windows.size
    layout = runner.config.head_layout
    if layout is not None:  # score the stored query heads, not their runtime positions
        heads = heads[:, layout.kept_index(head_layout.Q_AXIS)]
    params = named_params(state)
    down_norms = np.stack(
        [
            np.linalg.norm(np.asarray(params[f"layers.{i}.mlp.w_down"].value(), np.float32), axis=0)
            for i in range(runner.config.num_layers)
        ]
    )
    return Importance(
        mlp=(mlp / count * down_norms).astype(np.float32),
        heads=(heads / count).astype(np.float32),
    )


def mlp_channel_importance(
    model: LLM | ModelRunner, windows: Int[np.ndarray, "n T"], *, batch: int = 8
) -> Float[np.ndarray, "L F"]:
    """The pruning score of every MLP channel (see ``MEASURE``): per layer, the mean
    |silu(gate_j) * up_j| over the calibration tokens times ||w_down[:, j]||_2."""
    return importance(model, windows, batch=batch).mlp


def attention_head_importance(
    model: LLM | ModelRunner, windows: Int[np.ndarray, "n T"], *, batch: int = 8
) -> Float[np.ndarray, "L N"]:
    """The pruning score of every query head (see ``HEAD_MEASURE``)."""
    return importance(model, windows, batch=batch).heads


def random_importance(config: ModelConfig, seed: int = 0) -> Importance:
    """Scores that pick channels and heads uniformly at random: the baseline a measure
    must beat."""
    rng = np.random.default_rng(seed)
    L, F, N = config.num_layers, config.intermediate_size, config.stored.num_heads
    return Importance(
        mlp=rng.random((L, F)).astype(np.float32), heads=rng.random((L, N)).astype(np.float32)
    )


@jax.jit
def _row_nll(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, " B"]:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(axis=1)


def perplexity(
    model: LLM | ModelRunner, windows: Int[np.ndarray, "n T1"], *, batch: int = 8
) -> float:
    """exp(mean NLL) of every window's last T tokens given the ones before (``T1 = T + 1``
    tokens per window; ``token_windows(..., T + 1, stride=T)`` makes them)."""
    runner = _runner(model)
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(
            f"evaluation windows must be a non-empty [n, T + 1] array, got {windows.shape}"
        )
    T = windows.shape[1] - 1
    if T > runner.config.max_position_embeddings:
        raise ValueError(
            f"evaluation windows of {T} + 1 tokens exceed the model's context "
            f"({runner.config.max_position_embeddings})"
        )
    positions = np.broadcast_to(np.arange(T, dtype=np.int32)[None], (batch, T))
    total = 0.0
    for start in range(0, len(windows), batch):
        rows = windows[start : start + batch]
        padded = np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])
        logits = runner.forward(runner.params, padded[:, :-1], positions)
        total += float(np.asarray(_row_nll(logits, padded[:, 1:]))[: len(rows)].sum())
    return math.exp(total / (len(windows) * T))


# -- cutting ----------------------------------------------------------------------------------


def kept_width(width: int, remove_fraction: float, multiple: int = DEFAULT_MULTIPLE) -> int:
    """Channels kept when ``remove_fraction`` of ``width`` is removed: ``width * (1 -
    remove_fraction)`` rounded up to a multiple of ``multiple`` (never more than ``width``),
    so at most the requested fraction goes."""
    if not 0.0 <= remove_fraction < 1.0:
        raise ValueError(f"the fraction to remove must be in [0, 1), got {remove_fraction}")
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    keep = min(width, math.ceil(width * (1.0 - remove_fraction) / multiple) * multiple)
    return keep


def kept_channels(importance: Float[np.ndarray, "L F"], keep: int) -> Int[np.ndarray, "L keep"]:
    """Per layer, the indices of the ``keep`` highest-scored channels, in ascending order.
    Ties go to the lower index (a stable sort), so the choice is deterministic."""
    importance = np.asarray(importance)
    if not 0 < keep <= importance.shape[1]:
        raise ValueError(f"cannot keep {keep} of {importance.shape[1]} channels")
    order = np.argsort(-importance, axis=1, kind="stable")[:, :keep]
    return np.sort(order, axis=1)


def host_params(state: nnx.State | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"layers.0.mlp.w_up": ndarray}`` from a state (gathered from its shards, so a single
    process must hold every shard) or from a mapping of arrays. The arrays are writable
    copies (a view of a device buffer would be read-only)."""
    if isinstance(state, nnx.State):
        return {k: np.array(p.value()) for k, p in named_params(state).items()}
    return {k: np.array(v) for k, v in state.items()}


def prune_mlp(
    params: nnx.State | Mapping[str, Any],
    config: ModelConfig,
    importance: Float[np.ndarray, "L F"],
    *,
    remove_fraction: float,
    multiple: int = DEFAULT_MULTIPLE,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(smaller config, host parameters) with the lowest-scored MLP channels of every layer
    removed: each layer keeps ``kept_width(F, remove_fraction, multiple)`` channels, its
    highest by ``importance`` ([L, F], e.g. ``mlp_channel_importance``). Other parameters
    are returned unchanged. ``remove_fraction=0`` keeps every channel in order."""
    L, F = config.num_layers, config.intermediate_size
    importance = np.asarray(importance)
    if importance.shape != (L, F):
        raise ValueError(f"importance has shape {importance.shape}; this model needs {(L, F)}")
    if not np.all(np.isfinite(importance)):
        raise ValueError("importance has non-finite scores (NaN or inf in the calibration run?)")
    keep = kept_width(F, remove_fraction, multiple)
    if keep == 0:
        raise ValueError(f"removing {remove_fraction} of {F} MLP channels would leave none")
    kept = kept_channels(importance, keep)
    params = host_params(params)
    out = dict(params)
    for i in range(L):
        for suffix, axis in _MLP_AXES.items():
            name = f"layers.{i}.{suffix}"
            if name not in params:
                raise ValueError(
                    f"the parameters have no {name!r}; is this a {config.architecture}?"
                )
            out[name] = np.take(params[name], kept[i], axis=axis)
    return dataclasses.replace(config, intermediate_size=keep), out


def kept_heads(
    head_importance: Float[np.ndarray, "L N"], config: ModelConfig, remove_fraction: float
) -> tuple[Int[np.ndarray, "L N2"], bool]:
    """(query heads kept per layer in ascending order, whether their KV heads go with them).

    With grouped-query attention (G > 1) every KV group keeps its ``kept_width(G, fraction,
    1)`` highest-scored query heads, the same number in each group and layer, so N stays a
    multiple of K and the KV heads (and cache) stay. With one query head per KV head (G = 1)
    whole heads go, each with its key/value head. Indices are stored heads (``config.stored``)."""
    config = config.stored
    L, N, K, G = config.num_layers, config.num_heads, config.num_kv_heads, config.group_size
    head_importance = np.asarray(head_importance)
    if head_importance.shape != (L, N):
        raise ValueError(f"head importance has shape {head_importance.shape}; need {(L, N)}")
    if not np.all(np.isfinite(head_importance)):
        raise ValueError("head importance has non-finite scores")
    if G == 1:
        return kept_channels(head_importance, kept_width(N, remove_fraction, 1)), True
    per_group = kept_channels(head_importance.reshape(L * K, G), kept_width(G, remove_fraction, 1))
    # [L, K, G2] indices within each group -> query head indices k * G + g.
    per_group = per_group.reshape(L, K, -1) + (np.arange(K) * G)[None, :, None]
    return per_group.reshape(L, -1), False


def prune_heads(
    params: nnx.State | Mapping[str, Any],
    config: ModelConfig,
    head_importance: Float[np.ndarray, "L N"],
    *,
    remove_fraction: float,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(smaller config, host parameters) without the lowest-scored query heads of every
    layer (see ``kept_heads`` for what is removed together); ``head_dim`` is unchanged.
    Both come back in the stored head layout (``place`` lays them out for a mesh)."""
    kept, with_kv = kept_heads(head_importance, config, remove_fraction)
    params, config = _stored_heads(host_params(params), config)
    out = dict(params)
    # Which axis of each attention parameter is the query (or key/value) head axis.
    axes = {"wq": 0, "bq": 0, "wo": 1}
    if with_kv:
        axes |= {"wk": 0, "wv": 0, "bk": 0, "bv": 0}
    for i in range(config.num_layers):
        for suffix, axis in axes.items():
            name = f"layers.{i}.attn.{suffix}"
            if name in params:  # biases exist only in some architectures
                out[name] = np.take(params[name], kept[i], axis=axis)
    n = kept.shape[1]
    return dataclasses.replace(
        config, num_heads=n, num_kv_heads=n if with_kv else config.num_kv_heads
    ), out


def _stored_heads(
    params: dict[str, np.ndarray], config: ModelConfig
) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Host parameters and config in the stored head layout, from either layout."""
    layout = config.head_layout
    if layout is None:
        return params, config
    axes = param_axes(config)
    out = dict(params)
    for name, value in params.items():
        if name in axes and value.shape != layout.source_shape(value.shape, axes[name]):
            out[name] = head_layout.shrink_host(value, layout, axes[name])
    return out, config.stored


def prune(
    params: nnx.State | Mapping[str, Any],
    config: ModelConfig,
    importance: Importance | Float[np.ndarray, "L F"],
    *,
    mlp_fraction: float,
    heads_fraction: float = 0.0,
    multiple: int = DEFAULT_MULTIPLE,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """``prune_mlp`` and then, if ``heads_fraction`` > 0, ``prune_heads``. ``importance`` is an
    ``Importance``, or MLP scores [L, F] alone when no heads are removed."""
    check_prunable(config)
    mlp_scores = importance.mlp if isinstance(importance, Importance) else importance
    config, out = prune_mlp(
        params, config, mlp_scores, remove_fraction=mlp_fraction, multiple=multiple
    )
    if heads_fraction:
        if not isinstance(importance, Importance):
            raise ValueError("removing heads needs head scores: pass an Importance")
        config, out = prune_heads(out, config, importance.heads, remove_fraction=heads_fraction)
    return config, out


def place(params: Mapping[str, np.ndarray], spec: ModelSpec) -> ModelRunner:
    """A runner for host ``params`` put into the shards ``spec`` (config, dtype, mesh,
    rules) gives them; shapes must match the config, in the stored or the runtime head
    layout (``spec.config.head_layout``)."""

    def make(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        value = params[name]
        maps = spec.head_maps(name)
        stored_shape = spec.stored_target(name, target).shape
        if maps is not None and tuple(value.shape) == stored_shape != tuple(target.shape):
            value = head_layout.expand_host(np.asarray(value), maps)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name!r} has shape {value.shape}; the config needs {target.shape}")
        value = np.asarray(value).astype(target.dtype)
        return jax.make_array_from_callback(target.shape, target.sharding, value.__getitem__)

    graphdef, state = spec.fill(make)
    return ModelRunner(spec, graphdef, state)


def pruned_llm(
    llm: LLM,
    importance: Importance | Float[np.ndarray, "L F"],
    *,
    remove_fraction: float,
    heads_fraction: float = 0.0,
    multiple: int = DEFAULT_MULTIPLE,
    warm_up: bool = False,
    **engine_options,
) -> LLM:
    """A servable pruned copy of ``llm`` in memory (``remove_fraction`` of the MLP channels
    and ``heads_fraction`` of the query heads removed, see ``prune``), on the same mesh,
    rules and dtype, with ``llm``'s engine options unless overridden. ``llm`` is unchanged."""
    config, params = prune(
        llm.runner.state,
        llm.config,
        importance,
        mlp_fraction=remove_fraction,
        heads_fraction=heads_fraction,
        multiple=multiple,
    )
    spec = dataclasses.replace(llm.runner.spec, config=config)
    options = {**dataclasses.asdict(llm.engine.config), **engine_options}
    engine = Engine(place(params, spec), llm.tokenizer, EngineConfig(**options))
    name = f"{llm.name}-f{config.intermediate_size}-n{config.num_heads}"
    return LLM(engine.start(warm_up=warm_up), name)


# -- a checkpoint in, a smaller checkpoint out ---------------------------------------------------


def prune_checkpoint(
    src: str | Path | None,
    dst: str | Path,
    *,
    mlp_fraction: float,
    heads_fraction: float = 0.0,
    calibration_text: Sequence[str] | None = None,
    eval_text: Sequence[str] | None = None,
    multiple: int = DEFAULT_MULTIPLE,
    calibration_windows: int = 128,
    eval_windows: int = 128,
    random_seed: int | None = None,
    mesh=None,
    log=print,
) -> dict[str, Any]:
    """Prunes ``mlp_fraction`` of every layer's MLP channels (and ``heads_fraction`` of its
    query heads, see ``kept_heads``) from the Orbax checkpoint ``src`` (``None``: the
    bundled demo model) and writes a checkpoint to ``dst``, with ``pruning.json`` beside its
    config.json recording the measures, widths, head counts, parameter counts, held-out
    perplexity before and after, and what was kept. Returns that record.

    ``calibration_text``: texts whose activations score the channels (default for the demo
    model: half of its held-out files; required otherwise). ``eval_text``: other texts for the
    perplexities (default: the demo model's other held-out half; otherwise the last fifth of
    the calibration tokens, which are then not used for calibration). ``random_seed``: pick
    channels at random instead (the baseline the measure should beat)."""
    # Absolute paths: Orbax rejects relative ones.
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    if src is not None and not orbax_checkpoint.is_orbax_checkpoint(src):
        raise ValueError(
            f"{src} is not a jaxllm Orbax checkpoint (no {orbax_checkpoint.METADATA_FILE}); "
            "convert a Hugging Face folder first with `jaxllm convert HF_DIR OUT_DIR`"
        )
    if src is not None and orbax_checkpoint.read_quantization(src) is not None:
        raise ValueError(
            f"{src} holds quantized weights; prune the float checkpoint, then quantize the "
            "pruned one (`LLM.load(..., quantize='int8')` or `jaxllm convert --quantize int8`)"
        )
    kept_width(1, mlp_fraction, multiple)  # range checks before any loading
    kept_width(1, heads_fraction, 1)
    source = Path(src) if src is not None else demo.demo_model_dir()
    is_demo = source.resolve() == demo.DEMO_MODEL_DIR
    eval_source = "given evaluation text"
    if calibration_text is None:
        if not is_demo:
            raise ValueError(
                "give calibration text (--calibration FILE) for a model other than the demo model"
            )
        calibration_text, demo_eval = demo_texts()
        calibration_source = "demo model held-out files, second half"
        if eval_text is None:
            eval_text, eval_source = demo_eval, "demo model held-out files, first half"
    else:
        calibration_source = "given text"

    start = time.perf_counter()
    llm = LLM.load(source.absolute(), mesh=mesh, warm_up=False, max_num_seqs=1)
    try:
        T = min(256, llm.max_seq_len)
        if eval_text is None:
            # Windows of T + 1 tokens every T: the last fifth scores perplexity, and the rest,
            # cut to T tokens, calibrate; no token is in both.
            windows = token_windows(llm.tokenizer, calibration_text, T + 1, stride=T)
            if len(windows) < 2:
                raise ValueError(
                    "the calibration text is too short to hold some of it out for perplexity; "
                    "give more text or separate evaluation text"
                )
            cut = max(1, len(windows) // 5)
            calib, evaluation = windows[:-cut, :T], windows[-cut:]
            eval_source = "last fifth of the calibration text (not used to calibrate)"
        else:
            calib = token_windows(llm.tokenizer, calibration_text, T)
            evaluation = token_windows(llm.tokenizer, eval_text, T + 1, stride=T)
        calib, evaluation = calib[:calibration_windows], evaluation[:eval_windows]
        config = llm.config
        if random_seed is None:
            log(
                f"scoring {config.num_layers} x {config.intermediate_size} MLP channels and "
                f"{config.num_layers} x {config.stored.num_heads} heads on {calib.size} "
                "calibration tokens"
            )
            scores, measure = importance(llm, calib), {"mlp": MEASURE, "heads": HEAD_MEASURE}
        else:
            scores = random_importance(config, random_seed)
            measure = {
                "mlp": f"random (seed {random_seed})",
                "heads": f"random (seed {random_seed})",
            }
        log(f"perplexity on {evaluation[:, 1:].size} held-out tokens ({eval_source})")
        ppl_before = perplexity(llm, evaluation)
        new_config, params = prune(
            llm.runner.state,
            config,
            scores,
            mlp_fraction=mlp_fraction,
            heads_fraction=heads_fraction,
            multiple=multiple,
        )
        kept = {"mlp_channels": kept_channels(scores.mlp, new_config.intermediate_size).tolist()}
        if heads_fraction:
            kept["query_heads"] = kept_heads(scores.heads, config, heads_fraction)[0].tolist()
        spec = dataclasses.replace(llm.runner.spec, config=new_config)
        runner = place(params, spec)
        del params
        ppl_after = perplexity(runner, evaluation)
    finally:
        llm.close()

    record = {
        "source": str(source),
        "measure": measure,
        "mlp_remove_fraction": mlp_fraction,
        "heads_remove_fraction": heads_fraction,
        "multiple": multiple,
        "intermediate_size": {
            "before": config.intermediate_size,
            "after": new_config.intermediate_size,
        },
        "num_heads": {"before": config.stored.num_heads, "after": new_config.stored.num_heads},
        "num_kv_heads": {
            "before": config.stored.num_kv_heads,
            "after": new_config.stored.num_kv_heads,
        },
        "params": {"before": config.num_params, "after": new_config.num_params},
        "calibration": {"source": calibration_source, "tokens": int(calib.size)},
        "perplexity": {
            "before": ppl_before,
            "after": ppl_after,
            "source": eval_source,
            "tokens": int(evaluation[:, 1:].size),
        },
        "kept": kept,
        "seconds": round(time.perf_counter() - start, 1),
    }
    orbax_checkpoint.save_state(
        runner.state, runner.config, dst, tokenizer_dir=orbax_checkpoint.tokenizer_dir(source)
    )
    # Written after the checkpoint is complete: the loader ignores it, it only informs.
    (dst / PRUNING_FILE).write_text(_record_json(record))
    return record


def _record_json(record: dict[str, Any]) -> str:
    """The record as indented JSON, with each layer's list of kept indices on one line."""
    text = json.dumps(record, indent=1)
    for rows in record["kept"].values():
        long = json.dumps(rows, indent=1).replace("\n", "\n  ")
        short = "[\n   " + ",\n   ".join(json.dumps(r, separators=(",", ":")) for r in rows)
        text = text.replace(long, short + "\n  ]", 1)
    return text + "\n"
