"""Full-size configs traced abstractly: shapes and parameter counts with no memory used."""

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import pytest

from jaxllm import config as jaxllm_config
from jaxllm.config import LLAMA3_8B, LLAMA3_70B, ModelConfig
from jaxllm.params import ModelSpec
from sharding import DEFAULT_RULES, make_mesh


@pytest.mark.parametrize(
    "config, expected", [(LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496)]
)
def test_eval_shape_counts_parameters_without_allocating(config, expected):
    rss_before = psutil.Process().memory_info().rss
    spec = ModelSpec(config, jnp.bfloat16, make_mesh({"fsdp": 2, "tensor": 4}), DEFAULT_RULES)
    _, abstract = spec.abstract()
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    count = sum(int(np.prod(x.shape)) for x in leaves)
    assert count == expected == config.num_params
    assert f"{count / 1e9:.2f}" in {"8.03", "70.55"}
    # 16 GB / 141 GB of bfloat16 weights would show up here had anything been allocated.
    assert psutil.Process().memory_info().rss - rss_before < 500e6

    # Per-device bytes under FSDP x tensor over 8 devices: the whole model split 8 ways.
    shardings = jax.tree.leaves(spec.shardings(abstract))
    per_device = sum(
        int(np.prod(s.shard_shape(x.shape))) * 2 for x, s in zip(leaves, shardings, strict=True)
    )
    assert per_device < count * 2 / 8 * 1.01


@pytest.mark.parametrize("name", ["QWEN3_8B", "GEMMA3_12B", "MIXTRAL_8X7B", "QWEN3_30B_A3B"])
def test_family_presets_have_the_parameters_transformers_builds(name):
    """Each family's full-size preset, written as config.json and built by transformers on the
    meta device (no memory), has the parameter count jaxllm's abstract model has."""
    import torch
    import transformers

    config = getattr(jaxllm_config, name)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in model.parameters())
    spec = ModelSpec(config, jnp.bfloat16, make_mesh({"expert": 2, "tensor": 4}), DEFAULT_RULES)
    _, abstract = spec.abstract()
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert count == config.num_params == expected
