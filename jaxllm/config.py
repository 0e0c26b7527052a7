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

    @property
    def shared_window(self) -> int | None:
        """The sliding window of a model whose every layer has the same one, else None."""
        windows = {self.window(i) for i in range(self.num_layers)}
        return windows.pop() if len(windows) == 1 else None

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
        """The config of a Hugging Face config.json's contents (``jaxllm.hf_config``)."""
        from jaxllm import hf_config

        return hf_config.from_hf(raw)

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
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that Hugging Face transformers and from_hf_dict both read
        (the stored head counts, whatever the runtime layout): ``jaxllm.hf_config``."""
        from jaxllm import hf_config

        return hf_config.to_hf(self.stored)


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
QWEN3_30B_A3B = dataclasses.replace(
    QWEN3_8B,
    architecture="Qwen3MoeForCausalLM",
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=48,
    num_kv_heads=4,
    num_experts=128,
    experts_per_token=8,
    expert_intermediate_size=768,
    normalize_expert_weights=True,
)
