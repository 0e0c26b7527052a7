"""Tiny random Hugging Face checkpoints written by `transformers` itself, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that the scaling bends frequencies that a 64-token prompt actually uses.
    "original_max_position_embeddings": 16,
}

_BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=320,
    max_position_embeddings=256,
    # Larger than the default 0.02 so that logits spread out and a wrong detail shows.
    initializer_range=0.08,
    bos_token_id=256,
    eos_token_id=257,
)

# Every architecture and config variant the runtime claims to serve.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3_gqa": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0)),
    "llama31_rope_scaling": (
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_scaling=dict(LLAMA3_ROPE, rope_theta=500000.0)),
    ),
    "llama_head_dim": ("LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "llama_tied": ("LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_attention_bias": ("LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral_sliding": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2_bias": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # Layers that differ: the first attends to everything, the rest within a window (a
    # scanned model reads each layer's window from an array).
    "qwen2_window_layers": (
        "Qwen2ForCausalLM",
        dict(
            num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=1
        ),
    ),
    # Query/key norms per head; a head_dim that is not hidden_size / heads.
    "qwen3": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    # Every Gemma 3 detail at once: a window (16) shorter than the 64-token prompts on
    # alternate layers, with their own rope base; linearly scaled rope on the global ones;
    # a query scale that is not head_dim's; GeGLU, (1 + w) norms, sandwich norms, tied and
    # scaled embeddings.
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    # Mixture-of-Experts: 4 experts, top-2, renormalised (Mixtral); 6 experts, top-1, not
    # renormalised, per-head query/key norms (Qwen3-MoE). Meshes of 2, 4 and 8 devices give
    # each more experts than devices, fewer, and a count the expert axis does not divide.
    "mixtral": (
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=1,
            moe_intermediate_size=48,
            norm_topk_prob=False,
        ),
    ),
}
# Config classes not named after the model class.
_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}


def build(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    arch, extra = VARIANTS[variant]
    config_cls = getattr(
        transformers, _CONFIG_CLASSES.get(arch, arch.replace("ForCausalLM", "Config"))
    )
    config = config_cls(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    # Norm scales start at exactly 1; randomise them so a mis-mapped norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def write(variant: str, path: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    model = build(variant, seed, **overrides)
    model.save_pretrained(path)
    return model


def torch_logits(model: torch.nn.Module, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float()


# A script for a subprocess (memory tests measure loading in a process of its own):
# 537 MB (512 MiB) of float32 in 93 tensors; the largest (MLP matrices, embeddings) are 11.5 MB.
WRITE_BIG_MODEL = """
import sys, torch, transformers
config = transformers.LlamaConfig(
    hidden_size=1024, intermediate_size=2816, vocab_size=2816, num_hidden_layers=10,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""
