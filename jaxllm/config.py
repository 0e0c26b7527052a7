"""Model configuration: what a Llama-family network looks like, read from Hugging Face.

Dimension glossary, used in every einsum string, shape comment and jaxtyping annotation:

    B  batch (sequences, or decode slots)       T  query tokens in this call
    S  key/value positions (cache length)       D  model width (hidden_size)
    F  MLP width (intermediate_size)            V  vocabulary
    N  query heads   K  key/value heads   G = N // K   H  head dim   L  layers
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxllm.head_layout import HeadLayout

# Architectures whose math this runtime implements, by the class name Hugging Face writes
# into config.json, with the model_type used when "architectures" is absent.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# Activations of the gated MLP, by the name Hugging Face configs use.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class ConfigError(ValueError):
    """A config.json this runtime cannot serve faithfully; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling; see jaxllm.rope. ``rope_type`` "llama3" (Llama 3.1: low
    frequencies slowed down by ``factor``, high ones kept, blended between) or "linear"
    (every frequency divided by ``factor``: positions interpolated, as Gemma 3 does)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def to_hf_dict(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        out = dataclasses.asdict(self)
        out["rope_type"] = "llama3"
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000  # V
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008  # F
    num_layers: int = 32  # L
    num_heads: int = 32  # N
    num_kv_heads: int = 32  # K
    head_dim: int = 128  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    # Per layer: attend to at most this many previous positions (Mistral, some Qwen2 layers).
    sliding_windows: tuple[int | None, ...] | None = None
    # Rope base of the layers that have a sliding window, where it differs from the others'
    # (Gemma 3's local layers: 10k against 1M, and never scaled); None: every layer's is
    # rope_theta with rope_scaling.
    local_rope_theta: float | None = None
    qk_norm: bool = False  # RMSNorm over each query and key head before rope (Qwen3, Gemma 3)
    # Gemma: RMSNorm multiplies by (1 + weight), computed in float32 before the cast back.
    norm_plus_one: bool = False
    # Gemma 3: a norm after attention and after the MLP too, before each joins the residual.
    sandwich_norms: bool = False
    mlp_activation: str = "silu"  # of the gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    # Attention scores scale by query_pre_attn_scalar**-0.5 (Gemma 3), else head_dim**-0.5.
    query_pre_attn_scalar: float | None = None
    # Mixture-of-Experts (Mixtral, Qwen3-MoE): every layer's MLP is E experts of width
    # expert_intermediate_size, each token's output the weighted sum of its top-k experts'
    # (jaxllm.moe). 0 experts: a dense MLP of intermediate_size.
    num_experts: int = 0  # E
    experts_per_token: int = 0  # k
    expert_intermediate_size: int = 0
    # Top-k routing weights renormalised to sum 1 (Mixtral always; Qwen3-MoE: norm_topk_prob).
    normalize_expert_weights: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Set on the config a model runs with when its heads are padded or copied so that a mesh
    # axis splits them (jaxllm.head_layout): num_heads and num_kv_heads are then the runtime
    # counts N' and K', and `stored` gives the checkpoint's config back.
    head_layout: HeadLayout | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.num_layers:
            raise ConfigError("sliding_windows needs one entry per layer")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.experts_per_token}) must be between 1 and the "
                f"number of experts ({self.num_experts})"
            )
        if self.mlp_activation not in ACTIVATIONS.values():
            raise ConfigError(
                f"mlp_activation {self.mlp_activation!r} is not one of "
                f"{sorted(ACTIVATIONS.values())}"
            )
        layout = self.head_layout
        if layout is not None and (self.num_heads, self.num_kv_heads) != (
            layout.num_runtime_heads,
            layout.num_runtime_kv_heads,
        ):
            raise ConfigError(
                f"{self.num_heads} query / {self.num_kv_heads} KV heads do not match the head "
                f"layout {layout}; change head counts on `config.stored`"
            )

    @property
    def stored(self) -> ModelConfig:
        """This config with the head counts a checkpoint stores (itself if not padded)."""
        if self.head_layout is None:
            return self
        layout = self.head_layout
        return dataclasses.replace(
            self,
            num_heads=layout.num_heads,
            num_kv_heads=layout.num_kv_heads,
            head_layout=None,
        )

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def window(self, layer: int) -> int | None:
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    def uses_local_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates by ``local_rope_theta`` (a sliding layer of a
        model whose local layers have their own rope base)."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    @property
    def num_params(self) -> int:
        """Parameters of the model as stored (zero and copied heads are not counted)."""
        D, F, V, H = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        N, K = self.stored.num_heads, self.stored.num_kv_heads
        attn = D * N * H * 2 + D * K * H * 2
        attn += (N + 2 * K) * H * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
        mlp = 3 * D * F
        if self.num_experts:  # the router, then every expert's three matrices
            mlp = self.num_experts * (D + 3 * D * self.expert_intermediate_size)
        layer = attn + mlp + (4 if self.sandwich_norms else 2) * D
        embeddings = V * D * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + D

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _from_hf(raw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found: a Hugging Face model folder needs config.json"
            )
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON: {e}") from e
        return _from_hf(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that Hugging Face transformers and from_hf_dict both read
        (the stored head counts, whatever the runtime layout)."""
        if self.head_layout is not None:
            return self.stored.to_hf_dict()
        model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling.to_hf_dict(), "rope_theta": self.rope_theta}
        activation = {ours: hf for hf, ours in ACTIVATIONS.items()}[self.mlp_activation]
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": activation,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
        }
        if model_type in ("llama", "qwen3", "gemma3_text", "qwen3_moe"):
            out["attention_bias"] = self.qkv_bias
        windows = set(self.sliding_windows or [None]) - {None}
        if len(windows) > 1:
            raise ConfigError(f"{model_type} configs cannot express more than one window size")
        window = windows.pop() if windows else None
        types = [
            "full_attention" if self.window(i) is None else "sliding_attention"
            for i in range(self.num_layers)
        ]
        if model_type == "mixtral":
            out |= {
                "num_local_experts": self.num_experts,
                "num_experts_per_tok": self.experts_per_token,
            }
        elif model_type == "qwen3_moe":
            out |= {
                "num_experts": self.num_experts,
                "num_experts_per_tok": self.experts_per_token,
                "moe_intermediate_size": self.expert_intermediate_size,
                "norm_topk_prob": self.normalize_expert_weights,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            }
        if model_type in ("mistral", "mixtral"):
            if window is not None and "full_attention" in types:
                raise ConfigError(f"{model_type} applies one sliding_window to every layer")
            out["sliding_window"] = window
        elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
            out |= {"use_sliding_window": window is not None, "sliding_window": window}
            if window is not None:
                out |= {"layer_types": types, "max_window_layers": self.num_layers}
        elif model_type == "gemma3_text":
            del out["hidden_act"], out["rope_theta"]
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta or self.rope_theta}
            out |= {
                "hidden_activation": activation,
                # An int, as transformers' config class insists (Gemma 3 uses whole numbers).
                "query_pre_attn_scalar": round(self.query_pre_attn_scalar or self.head_dim),
                "sliding_window": window,
                "layer_types": types,
                "rope_parameters": {"full_attention": rope, "sliding_attention": local},
            }
        elif window is not None:
            raise ConfigError(f"{model_type} configs cannot express sliding windows")
        return out


# Fields that change the math and that this runtime does not implement: rejected by name
# rather than served wrong. Values listed are the ones that are harmless.
_MUST_EQUAL = {
    "mlp_bias": (False, None),
    "pretraining_tp": (1, None),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "use_bidirectional_attention": (False, None),
}
# Per family: what config.json may leave out, as the family's transformers config defaults it.
_DEFAULTS = {
    "gemma3_text": {
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}


def _rope(params: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """Rope base and scaling from one ``rope_parameters`` entry (or legacy rope_scaling)."""
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    try:
        if rope_type == "linear":
            return theta, RopeScaling(factor=float(params["factor"]), rope_type="linear")
        if rope_type == "llama3":
            return theta, RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type {rope_type!r} is missing {e.args[0]!r}") from e
    raise ConfigError(
        f"rope_scaling type {rope_type!r} is not supported (only 'default', 'linear', 'llama3')"
    )


def _layer_windows(raw: dict[str, Any], kind: str, layers: int) -> tuple[int | None, ...] | None:
    """Each layer's sliding window (None: full attention), as the family defines them."""
    if kind in ("mistral", "mixtral"):
        return (int(raw["sliding_window"]),) * layers if raw.get("sliding_window") else None
    if kind in ("qwen2", "qwen3", "qwen3_moe"):
        if not raw.get("use_sliding_window"):
            return None
        first = raw.get("max_window_layers", layers)
        types = raw.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(layers)
        ]
    elif kind == "gemma3_text":
        pattern = int(raw.get("sliding_window_pattern", 6))
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
    else:
        if raw.get("sliding_window"):
            raise ConfigError(f"sliding_window is not supported for {kind}")
        return None
    if len(types) != layers:
        raise ConfigError(f"layer_types has {len(types)} entries for {layers} layers")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"layer_types {sorted(unknown)} are not supported")
    if "sliding_attention" not in types:
        return None
    window = raw.get("sliding_window")
    if not window:
        raise ConfigError("layer_types names sliding_attention layers but sliding_window is unset")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _from_hf(raw: dict[str, Any]) -> ModelConfig:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if archs:
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures={archs}: unsupported architecture {arch!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
    else:
        by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
        if model_type not in by_type:
            raise ConfigError(
                f"model_type={model_type!r} is not supported and config.json names no "
                f"architectures; supported model types: {sorted(by_type)}"
            )
        arch = by_type[model_type]
    kind = SUPPORTED_ARCHITECTURES[arch]
    raw = {**_DEFAULTS.get(kind, {}), **{k: v for k, v in raw.items() if v is not None}}
    gemma = kind == "gemma3_text"

    for field, ok in _MUST_EQUAL.items():
        if raw.get(field, ok[0]) not in ok:
            raise ConfigError(f"{field}={raw[field]!r} is not supported (only {ok[0]!r})")
    field = "hidden_activation" if raw.get("hidden_activation") else "hidden_act"
    activation = raw.get(field, "silu")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{field}={activation!r} is not supported (only {sorted(ACTIVATIONS)})")

    def need(field: str):
        if raw.get(field) is None:
            raise ConfigError(f"config.json is missing required field {field!r}")
        return raw[field]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    layers = int(need("num_hidden_layers"))
    head_dim = raw.get("head_dim") or hidden // heads

    rope = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling")
    local_theta = None
    if gemma:  # one rope per layer type: full (global) layers, sliding (local) ones
        full = dict(rope.get("full_attention") or legacy or {})
        local = dict(rope.get("sliding_attention") or {})
        theta, scaling = _rope(full, float(raw["rope_theta"]))
        local_theta, local_scaling = _rope(local, float(raw["rope_local_base_freq"]))
        if local_scaling is not None:
            raise ConfigError("rope scaling of Gemma 3's sliding layers is not supported")
    else:
        if legacy:
            rope = {**legacy, **rope}
        theta, scaling = _rope(rope, float(raw.get("rope_theta", 10000.0)))
    windows = _layer_windows(raw, kind, layers)

    experts = _experts(raw, kind)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or attention_bias,
        o_bias=kind in ("llama", "qwen3", "gemma3_text", "qwen3_moe") and attention_bias,
        sliding_windows=windows,
        local_rope_theta=local_theta if windows is not None else None,
        qk_norm=kind in ("qwen3", "gemma3_text", "qwen3_moe"),
        norm_plus_one=gemma,
        sandwich_norms=gemma,
        mlp_activation=ACTIVATIONS[activation],
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(raw["query_pre_attn_scalar"]) if gemma else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **experts,
    )


def _experts(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """The Mixture-of-Experts fields of ModelConfig (none for a dense family)."""
    if kind == "mixtral":
        return dict(
            num_experts=int(raw["num_local_experts"]),
            experts_per_token=int(raw["num_experts_per_tok"]),
            expert_intermediate_size=int(raw["intermediate_size"]),
            normalize_expert_weights=True,
        )
    if kind != "qwen3_moe":
        return {}
    if int(raw.get("decoder_sparse_step", 1)) != 1 or raw.get("mlp_only_layers"):
        raise ConfigError(
            "Qwen3-MoE with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is "
            "not supported: every layer must be a Mixture-of-Experts layer"
        )
    return dict(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        experts_per_token=int(raw["num_experts_per_tok"]),
        expert_intermediate_size=int(raw["moe_intermediate_size"]),
        normalize_expert_weights=bool(raw.get("norm_topk_prob", False)),
    )


# Full-size presets, checked with jax.eval_shape (no memory) in the tests.
LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
LLAMA3_70B = dataclasses.replace(
    LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64
)
QWEN3_8B = ModelConfig(
    architecture="Qwen3ForCausalLM",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    qk_norm=True,
)
# Gemma 3 12B's text model: five local layers (1024-token window, rope base 10k) to one
# global layer (rope base 1M, positions scaled by 8).
GEMMA3_12B = ModelConfig(
    architecture="Gemma3ForCausalLM",
    vocab_size=262208,
    hidden_size=3840,
    intermediate_size=15360,
    num_layers=48,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_scaling=RopeScaling(factor=8.0, rope_type="linear"),
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    sliding_windows=tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(48)),
    local_rope_theta=10_000.0,
    qk_norm=True,
    norm_plus_one=True,
    sandwich_norms=True,
    mlp_activation="gelu_tanh",
    scale_embeddings=True,
    query_pre_attn_scalar=256.0,
)
MIXTRAL_8X7B = ModelConfig(
    architecture="MixtralForCausalLM",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    num_experts=8,
    experts_per_token=2,
    expert_intermediate_size=14336,
)
QWEN3_30B_A3B = ModelConfig(
    architecture="Qwen3MoeForCausalLM",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    qk_norm=True,
    num_experts=128,
    experts_per_token=8,
    expert_intermediate_size=768,
    normalize_expert_weights=True,
)
