"""Hugging Face config.json <-> ``ModelConfig``: each family's fields, defaults and the
settings this runtime refuses (by name) rather than serve wrong."""

from __future__ import annotations

from typing import Any

from jaxllm.config import (
    ACTIVATIONS,
    SUPPORTED_ARCHITECTURES,
    ConfigError,
    ModelConfig,
    RopeScaling,
)


def to_hf(config: ModelConfig) -> dict[str, Any]:
    """config.json contents for ``config`` (a config as stored, without a head layout) that
    Hugging Face transformers and ``from_hf`` both read."""
    model_type = SUPPORTED_ARCHITECTURES[config.architecture]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling.to_hf_dict(), "rope_theta": config.rope_theta}
    activation = {ours: hf for hf, ours in ACTIVATIONS.items()}[config.mlp_activation]
    out: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": activation,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
    }
    if model_type in ("llama", "qwen3", "gemma3_text", "qwen3_moe"):
        out["attention_bias"] = config.qkv_bias
    windows = set(config.sliding_windows or [None]) - {None}
    if len(windows) > 1:
        raise ConfigError(f"{model_type} configs cannot express more than one window size")
    window = windows.pop() if windows else None
    types = [
        "full_attention" if config.window(i) is None else "sliding_attention"
        for i in range(config.num_layers)
    ]
    if model_type == "mixtral":
        out |= {
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.experts_per_token,
        }
    elif model_type == "qwen3_moe":
        out |= {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.experts_per_token,
            "moe_intermediate_size": config.expert_intermediate_size,
            "norm_topk_prob": config.normalize_expert_weights,
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
            out |= {"layer_types": types, "max_window_layers": config.num_layers}
    elif model_type == "gemma3_text":
        del out["hidden_act"], out["rope_theta"]
        local = {"rope_type": "default", "rope_theta": config.local_rope_theta or config.rope_theta}
        out |= {
            "hidden_activation": activation,
            # An int, as transformers' config class insists (Gemma 3 uses whole numbers).
            "query_pre_attn_scalar": round(config.query_pre_attn_scalar or config.head_dim),
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
        "hidden_activation": "gelu_pytorch_tanh",
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


def from_hf(raw: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a config.json's contents; ConfigError names what is unsupported."""
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
