"""Meshes, logical-axis rules, and sharded execution on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec, named_params
from jaxllm.runtime import ModelRunner
from sharding import PRESETS, ShardingRules, make_mesh, parse_mesh_spec

MESHES = [{"tensor": 8}, {"data": 2, "tensor": 4}, {"fsdp": 4, "tensor": 2}, {"data": 8}]
BATCH, LENGTH = 8, 16


def test_mesh_specs_parse_from_dicts_and_strings():
    assert parse_mesh_spec("data=2,tensor=4") == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert parse_mesh_spec({"fsdp": 8}) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    mesh = make_mesh("data=2, fsdp=2, tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert dict(make_mesh(None).shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 8}
    assert dict(make_mesh({"expert": 2, "tensor": 4}).shape)["expert"] == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data": 3}, "needs 3 devices but 8 are available"),
        ("data=2,tensor=2", "needs 4 devices but 8 are available"),
        ({"pipeline": 8}, "unknown mesh axes"),
        ("tensor=eight", "expected 'axis=size'"),
        ({"tensor": 0}, "positive integer"),
        ("tensor=4,tensor=2", "given twice"),
    ],
)
def test_bad_meshes_are_rejected_with_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_rules_replicate_a_dimension_the_mesh_does_not_divide():
    mesh = make_mesh({"tensor": 4}, devices=jax.devices()[:4])
    rules = PRESETS["tensor_parallel"]
    # 2 KV heads over tensor=4: replicated on purpose rather than an XLA failure.
    assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == jax.P()
    assert rules.spec(("embed", "q_heads", "head_dim"), (64, 8, 16), mesh) == jax.P(None, "tensor")


def test_rules_refuse_two_dimensions_on_one_mesh_axis():
    mesh = make_mesh({"tensor": 8})
    rules = ShardingRules.from_mapping("bad", {"embed": "tensor", "mlp": "tensor"})
    with pytest.raises(ValueError, match="both 'embed' and 'mlp'.*'tensor'"):
        rules.spec(("embed", "mlp"), (64, 128), mesh)


def test_rules_reject_unknown_logical_names():
    with pytest.raises(ValueError, match="unknown logical axes"):
        ShardingRules.from_mapping("typo", {"hiddn": "tensor"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    hf_models.write(
        "llama3_gqa",
        path,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
    )
    tokens = np.random.default_rng(0).integers(0, 512, size=(BATCH, LENGTH))
    return path, tokens


def run(path, tokens, mesh, rules):
    spec = ModelSpec(ModelConfig.from_hf_dir(path), jnp.float32, mesh, rules)
    runner = ModelRunner(spec, *load_hf_state(path, spec))
    positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
    logits = runner.forward(runner.params, jnp.asarray(tokens), positions)
    return runner, np.asarray(logits)


@pytest.fixture(scope="module")
def single_device_logits(checkpoint):
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    return run(*checkpoint, mesh, PRESETS["tensor_parallel"])[1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(
    "mesh_spec", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items())
)
def test_sharded_logits_equal_single_device(checkpoint, single_device_logits, preset, mesh_spec):
    runner, logits = run(*checkpoint, make_mesh(mesh_spec), PRESETS[preset])
    np.testing.assert_allclose(logits, single_device_logits, atol=1e-5, rtol=0)
    # The state really lives on all 8 devices, laid out as the rules say.
    for name, var in named_params(runner.state).items():
        array = var.value()
        assert len(array.sharding.device_set) == 8, name


# Per-device block shapes, written out by hand, for D=64, N=8, K=2, H=16, F=128, V=512.
EXPECTED_BLOCKS = {
    ("tensor_parallel", "tensor=8"): {
        "embed": (64, 64),
        "lm_head": (64, 64),
        "layers.0.attn.wq": (1, 16, 64),
        # Each of the 2 KV heads is copied 4 times (jaxllm.head_layout): one per device.
        "layers.0.attn.wk": (1, 16, 64),
        "layers.0.attn.wo": (64, 1, 16),
        "layers.0.mlp.w_up": (16, 64),
        "layers.0.mlp.w_down": (64, 16),
        "layers.0.attn_norm.scale": (64,),
    },
    ("fsdp", "fsdp=4,tensor=2"): {
        "embed": (512, 16),
        "lm_head": (512, 16),
        "layers.0.attn.wq": (8, 16, 16),
        "layers.0.attn.wk": (2, 16, 16),
        "layers.0.attn.wo": (16, 8, 16),
        "layers.0.mlp.w_up": (128, 16),
        "layers.0.mlp.w_down": (16, 128),
    },
    ("fsdp_tensor", "fsdp=4,tensor=2"): {
        "embed": (256, 16),
        "lm_head": (256, 16),
        "layers.0.attn.wq": (4, 16, 16),
        "layers.0.attn.wk": (1, 16, 16),
        "layers.0.attn.wo": (16, 4, 16),
        "layers.0.mlp.w_up": (64, 16),
        "layers.0.mlp.w_down": (16, 64),
    },
    ("fsdp_tensor", "data=2,tensor=4"): {
        "embed": (128, 64),
        "layers.0.attn.wq": (2, 16, 64),
        # 2 KV heads do not divide over tensor=4: each is copied twice (jaxllm.head_layout),
        # so every device holds one KV head and the 2 query heads that read it.
        "layers.0.attn.wk": (1, 16, 64),
        "layers.0.mlp.w_gate": (32, 64),
    },
    ("data_parallel", "data=8"): {
        "embed": (512, 64),
        "layers.0.attn.wq": (8, 16, 64),
        "layers.0.mlp.w_down": (64, 128),
    },
}


@pytest.mark.parametrize("preset, mesh_spec", sorted(EXPECTED_BLOCKS))
def test_each_parameter_is_split_as_the_rules_say(checkpoint, preset, mesh_spec):
    path, _ = checkpoint
    spec = ModelSpec(
        ModelConfig.from_hf_dir(path), jnp.float32, make_mesh(mesh_spec), PRESETS[preset]
    )
    params = named_params(load_hf_state(path, spec)[1])
    for name, block in EXPECTED_BLOCKS[(preset, mesh_spec)].items():
        array = params[name].value()
        shapes = {shard.data.shape for shard in array.addressable_shards}
        assert shapes == {block}, (name, shapes)
