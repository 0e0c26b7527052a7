"""Attention heads that the tensor axis does not divide are padded or copied, never replicated:
the plan's mapping is exact, the weights are really split over ``tensor``, logits equal the
one-device model's and transformers', checkpoints keep the stored layout, int8 scales follow."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from jaxllm import head_layout
from jaxllm import orbax_checkpoint as oc
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state, save_hf_checkpoint
from jaxllm.params import ModelSpec, named_params
from sharding import DEFAULT_RULES, make_mesh

T = 24  # tokens per sequence


def forward_logits(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """The model's full-sequence causal forward: the one call of the model in this file."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions)
    return model.logits(hidden)


_forward = jax.jit(forward_logits, static_argnums=0)


def logits_of(graphdef, state, tokens) -> np.ndarray:
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))


ONE_DEVICE = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
MESHES = {"tensor=8": {"tensor": 8}, "data=2,tensor=4": {"data": 2, "tensor": 4}}
# variant (with biases where it has them), query heads, KV heads
CASES = {
    "gqa12x4": ("llama_attention_bias", 12, 4),
    "gqa6x2": ("qwen2_bias", 6, 2),
    "mha6": ("llama3_gqa", 6, 6),
}
# Runtime (N', K') per case and tensor size: pinned, so a change of plan is a visible choice.
EXPECTED = {
    ("gqa12x4", 8): (16, 8),  # each KV head copied twice; groups of 3 padded to 2 x 2
    ("gqa12x4", 4): (12, 4),  # divides: unchanged
    ("gqa6x2", 8): (8, 8),
    ("gqa6x2", 4): (8, 4),
    ("mha6", 8): (8, 8),  # 2 zero KV heads (and their zero query heads)
    ("mha6", 4): (8, 8),
}
HEAD_PARAMS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv")


def heads_of(heads: int, kv_heads: int) -> dict:
    """transformers wants the width to be a multiple of the heads: 96 suits 12 and 6."""
    return dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, hidden_size=96)


def spec_for(config, mesh, quantized=None) -> ModelSpec:
    return ModelSpec(config, jnp.float32, mesh, DEFAULT_RULES, quantized=quantized)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, HF folder, tokens, transformers' logits, the one-device model's logits)."""
    variant, heads, kv_heads = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = hf_models.write(variant, path, **heads_of(heads, kv_heads))
    tokens = np.random.default_rng(0).integers(0, 320, size=(2, T))
    expected = hf_models.torch_logits(model, tokens).numpy()
    spec = spec_for(ModelConfig.from_hf_dir(path), ONE_DEVICE)
    assert spec.config.head_layout is None
    one_device = logits_of(*load_hf_state(path, spec), tokens)
    np.testing.assert_allclose(one_device, expected, atol=1e-4, rtol=0)
    return request.param, path, tokens, expected, one_device


def test_every_plan_is_exact_and_divides_the_axis():
    for K in range(1, 13):
        for G in range(1, 7):
            for t in (1, 2, 3, 4, 6, 8, 16):
                layout = head_layout.plan(K * G, K, t)
                N2, K2 = layout.num_runtime_heads, layout.num_runtime_kv_heads
                assert N2 % t == 0 and K2 % t == 0 and N2 % K2 == 0
                q, kv = layout.q_source, layout.kv_source
                assert sorted(q[q >= 0]) == list(range(K * G))  # every query head once
                assert set(kv[kv >= 0]) == set(range(K))
                # A runtime query head meets the KV head its stored head belongs to.
                group = np.arange(N2) // layout.runtime_group_size
                assert (kv[group][q >= 0] == q[q >= 0] // G).all()
                if K % t == 0:
                    assert layout.is_identity
    # vLLM's choice where tensor is a multiple of K: each KV head copied tensor / K times.
    assert head_layout.plan(32, 4, 8).replicas == 2 and head_layout.plan(32, 1, 8).replicas == 8


def assert_heads_split(state, spec, t):
    """Every head parameter names ``tensor`` on its head axis; each device holds 1/t."""
    for name, var in named_params(state).items():
        if name.split(".")[-1].removesuffix("_scale") not in HEAD_PARAMS:
            continue
        array, axes = var.value(), var.axes
        axis = [i for i, a in enumerate(axes) if a in ("q_heads", "kv_heads")]
        if not axis:  # wo's scale is per output channel: no head axis
            continue
        (axis,) = axis
        assert array.sharding.spec[axis] == "tensor", (name, array.sharding.spec)
        blocks = {s.data.shape[axis] for s in array.addressable_shards}
        assert blocks == {array.shape[axis] // t}, (name, blocks)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_heads_are_split_over_tensor_and_logits_do_not_change(case, mesh_name, caplog):
    name, path, tokens, expected, one_device = case
    mesh = make_mesh(MESHES[mesh_name])
    t = mesh.shape["tensor"]
    spec = spec_for(ModelConfig.from_hf_dir(path), mesh)
    with caplog.at_level(logging.INFO, logger="jaxllm.params"):
        graphdef, state = load_hf_state(path, spec)
    lines = [r.getMessage() for r in caplog.records if "attention heads" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"over tensor={t}:" in lines[0]
    N2, K2 = EXPECTED[(name, t)]
    assert (spec.config.num_heads, spec.config.num_kv_heads) == (N2, K2)
    if (N2, K2) == (CASES[name][1], CASES[name][2]):
        assert "divide it" in lines[0] and spec.config.head_layout is None
    else:
        assert f"running {N2} query / {K2} KV heads" in lines[0]
    assert lines[0].endswith(
        f"each device holds {N2 // t} query and {K2 // t} KV head" + "s" * (K2 // t > 1)
    )
    assert_heads_split(state, spec, t)
    # The KV cache and the attention activations follow the runtime head counts.
    rules = spec.rules
    assert rules.spec(("cache_kv_heads",), (K2,), mesh) == jax.P("tensor")
    assert rules.spec(("act_heads",), (N2,), mesh) == jax.P("tensor")

    logits = logits_of(graphdef, state, tokens)
    np.testing.assert_allclose(logits, one_device, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_random_models_are_the_same_on_every_mesh():
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
        num_heads=12, num_kv_heads=4, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    tokens = np.random.default_rng(1).integers(0, 64, size=(1, 16))
    one = logits_of(*spec_for(config, ONE_DEVICE).random_state(3), tokens)
    spec = spec_for(config, make_mesh({"tensor": 8}))
    graphdef, state = spec.random_state(3)
    assert spec.config.num_heads == 16
    assert_heads_split(state, spec, 8)
    np.testing.assert_allclose(logits_of(graphdef, state, tokens), one, atol=1e-5, rtol=0)


def test_checkpoints_keep_the_stored_layout_and_int8_scales_follow(tmp_path):
    """A padded state saves with the stored head counts (Orbax and Hugging Face), restores
    on any mesh; int8 weights and their scales are padded and copied like float ones."""
    path = tmp_path / "hf"
    hf_models.write("llama3_gqa", path, num_hidden_layers=1, **heads_of(12, 4))
    config = ModelConfig.from_hf_dir(path)
    tensor8 = make_mesh({"tensor": 8})
    padded = spec_for(config, tensor8)
    _, state = load_hf_state(path, padded)
    _, reference = load_hf_state(path, spec_for(config, ONE_DEVICE))

    out = oc.save_state(state, padded.config, tmp_path / "orbax")
    meta = oc.read_metadata(out)["params"]
    assert meta["layers.0.attn.wq"]["shape"] == [12, 8, 96]
    assert meta["layers.0.attn.wk"]["shape"] == [4, 8, 96]
    assert oc.read_config(out) == config
    assert_same(oc.load_orbax_state(out, spec_for(config, ONE_DEVICE))[1], reference)
    assert_same(oc.load_orbax_state(out, padded)[1], state)
    save_hf_checkpoint(state, padded.config, tmp_path / "hf_again")
    assert ModelConfig.from_hf_dir(tmp_path / "hf_again") == config
    assert_same(load_hf_state(tmp_path / "hf_again", padded)[1], state)

    # int8: quantized at load on 8 devices equals quantized on one; an int8 checkpoint's
    # weights and scales restore onto padded heads, as does a float one quantized as read.
    tokens = np.random.default_rng(2).integers(0, 320, size=(1, T))
    q_padded = spec_for(config, tensor8, "int8")
    graphdef, q8 = load_hf_state(path, q_padded)
    assert_heads_split(q8, padded, 8)
    q1 = load_hf_state(path, spec_for(config, ONE_DEVICE, "int8"))
    np.testing.assert_allclose(logits_of(graphdef, q8, tokens), logits_of(*q1, tokens), atol=1e-4)
    int8 = oc.convert_hf_to_orbax(path, tmp_path / "int8", quantize="int8")
    assert oc.read_metadata(int8)["params"]["layers.0.attn.wq_scale"]["shape"] == [12, 8]
    assert_same(oc.load_orbax_state(int8, q_padded)[1], q8)
    assert_same(oc.load_orbax_state(out, q_padded)[1], q8)


def assert_same(state, expected):
    got, want = named_params(state), named_params(expected)
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name].value(), want[name].value()
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
