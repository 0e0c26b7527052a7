"""The mixture-of-experts layer (jaxllm.moe): routing as transformers routes, every dispatch
method equal to a dense all-experts reference, sharded equal to one device, int8 equal to its
dequantized weights, and one compile per token count whatever the routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from jaxllm import moe, quantize
from jaxllm.compiles import CompileCounter
from sharding import make_mesh

D, F = 32, 48
TOL = dict(rtol=1e-5, atol=1e-5)


def dense_reference(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token ([T, E, F]), combined with the routing weights: the
    definition the dispatch methods must equal (tests only: it is E / k times the work)."""
    E = w_gate.shape[0]
    hi = jax.lax.Precision.HIGHEST
    gate = jnp.einsum("TD,EFD->TEF", x, w_gate, precision=hi)
    up = jnp.einsum("TD,EFD->TEF", x, w_up, precision=hi)
    out = jnp.einsum("TEF,EDF->TED", jax.nn.silu(gate) * up, w_down, precision=hi)
    combine = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("TED,TE->TD", out, combine, precision=hi)


def random_layer(E, width=F, seed=0):
    rng = np.random.default_rng(seed)
    w_gate = rng.standard_normal((E, width, D)) / np.sqrt(D)
    w_up = rng.standard_normal((E, width, D)) / np.sqrt(D)
    w_down = rng.standard_normal((E, D, width)) / np.sqrt(width)
    return tuple(jnp.asarray(w, jnp.float32) for w in (w_gate, w_up, w_down))


def random_tokens(T, E, k, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((T, E)) * 2, jnp.float32)
    weights, experts = moe.route(logits, k, normalize=True)
    return x, weights, experts


# -- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe_norm", "qwen3_moe_raw"])
def test_routing_equals_transformers(family, top_k):
    E, T = 8, 24
    if family == "mixtral":
        config = MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=top_k)
        router, normalize = MixtralTopKRouter(config), True
    else:
        normalize = family == "qwen3_moe_norm"
        config = Qwen3MoeConfig(
            hidden_size=D, num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=normalize
        )
        router = Qwen3MoeTopKRouter(config)
    torch.manual_seed(top_k)
    with torch.no_grad():
        router.weight.normal_()
        hidden = torch.randn(T, D)
        logits, hf_weights, hf_experts = router(hidden)
    weights, experts = moe.route(jnp.asarray(logits.numpy()), top_k, normalize)
    assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(experts), hf_experts.numpy())
    np.testing.assert_allclose(np.asarray(weights), hf_weights.float().numpy(), rtol=1e-6)


def test_moe_block_equals_transformers_mixtral():
    """Router plus experts against MixtralSparseMoeBlock: the [out, in] weight layout."""
    E, k, T = 4, 2, 9
    config = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
    )
    block = MixtralSparseMoeBlock(config).eval()
    w_gate, w_up, w_down = random_layer(E)
    router = np.random.default_rng(3).standard_normal((E, D)).astype(np.float32)
    x, _, _ = random_tokens(T, E, k)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(router))
        gate_up = np.concatenate([np.asarray(w_gate), np.asarray(w_up)], axis=1)
        block.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        block.experts.down_proj.copy_(torch.from_numpy(np.asarray(w_down)))
        expected = block(torch.from_numpy(np.asarray(x))[None])[0].numpy()
    logits = jnp.einsum("TD,ED->TE", x, router, precision="highest")
    weights, experts = moe.route(logits, k, normalize=True)
    y, _ = moe.experts_mlp(x, weights, experts, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(y), expected, **TOL)


# -- dispatch --------------------------------------------------------------------------------


CASES = {
    "T=1 E=4 k=1": (1, 4, 1),
    "T=7 E=8 k=2": (7, 8, 2),
    "T=20 E=6 k=3": (20, 6, 3),
    "T=33 E=16 k=4": (33, 16, 4),
}


@pytest.mark.parametrize("method", moe.METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_equals_the_dense_reference(case, method):
    T, E, k = CASES[case]
    mats = random_layer(E)
    x, weights, experts = random_tokens(T, E, k)
    y, sizes = jax.jit(lambda *a: moe.experts_mlp(*a, method=method))(x, weights, experts, *mats)
    np.testing.assert_allclose(y, dense_reference(x, weights, experts, *mats), **TOL)
    np.testing.assert_array_equal(sizes, np.bincount(np.asarray(experts).ravel(), minlength=E))
    assert sizes.dtype == jnp.int32 and int(sizes.sum()) == T * k


@pytest.mark.parametrize("method", moe.METHODS)
def test_skewed_routing_all_tokens_to_one_expert(method):
    """Every token's first expert is 0 and the rest go to 2 of 8: five experts get nothing."""
    T, E = 19, 8
    mats = random_layer(E)
    x, weights, _ = random_tokens(T, E, 2)
    experts = jnp.stack([jnp.zeros(T, jnp.int32), jnp.where(jnp.arange(T) % 2, 3, 5)], axis=1)
    for block_rows in (None, 4):
        y, sizes = moe.experts_mlp(x, weights, experts, *mats, method=method, block_rows=block_rows)
        np.testing.assert_allclose(y, dense_reference(x, weights, experts, *mats), **TOL)
    assert list(np.asarray(sizes)) == [T, 0, 0, T // 2, 0, T - T // 2, 0, 0]


def test_unknown_method_and_bad_scales_are_refused():
    x, weights, experts = random_tokens(2, 4, 2)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        moe.experts_mlp(x, weights, experts, *random_layer(4), method="dense")
    with pytest.raises(ValueError, match="missing"):
        moe.experts_mlp(x, weights, experts, *random_layer(4), scales={"w_gate": jnp.ones((4, F))})


def test_one_compile_per_token_count_whatever_the_routing():
    E, k, T = 8, 2, 6
    mats = random_layer(E)
    step = jax.jit(lambda *a: moe.experts_mlp(*a))
    x, weights, _ = random_tokens(T, E, k)
    routings = [random_tokens(T, E, k, seed=seed)[2] for seed in range(10, 14)]
    routings += [
        jnp.full((T, k), 7, jnp.int32).at[:, 0].set(2),
        jnp.zeros((T, k), jnp.int32).at[:, 1].set(1),
    ]
    CompileCounter.install()
    jax.block_until_ready(step(x, weights, routings[-1], *mats))
    before = CompileCounter.count
    for experts in routings:
        jax.block_until_ready(step(x, weights, experts, *mats))
    assert CompileCounter.count == before


# -- int8 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", moe.METHODS)
def test_int8_weights_equal_their_dequantized_floats(method):
    T, E, k = 11, 8, 2
    quantized = [quantize.quantize(w) for w in random_layer(E)]
    q = tuple(a for a, _ in quantized)
    scales = {name: s for name, (_, s) in zip(moe.MATRICES, quantized, strict=True)}
    assert scales["w_gate"].shape == (E, F) and scales["w_down"].shape == (E, D)
    floats = [quantize.dequantize(a, s) for a, s in quantized]
    x, weights, experts = random_tokens(T, E, k)
    expected = dense_reference(x, weights, experts, *floats)
    for T_used in (1, T):  # one row (the vector-matrix path) and many
        args = (x[:T_used], weights[:T_used], experts[:T_used], *q)
        y, _ = moe.experts_mlp(*args, scales, method=method)
        np.testing.assert_allclose(y, expected[:T_used], **TOL)
    y, _ = moe.experts_mlp(x, weights, experts, *q, tuple(scales.values()), method=method)
    np.testing.assert_allclose(y, expected, **TOL)


# -- expert and tensor parallelism -----------------------------------------------------------


MESHES = {
    "expert=2": ({"expert": 2}, 8, F),
    "expert=4,tensor=2": ({"expert": 4, "tensor": 2}, 8, F),
    "tensor=4": ({"tensor": 4}, 8, F),
    "data=2,expert=2,tensor=2": ({"data": 2, "expert": 2, "tensor": 2}, 8, F),
    # 6 experts do not divide over expert=4, 36 channels not over tensor=8: replicated.
    "expert=4 E=6": ({"expert": 4}, 6, F),
    "tensor=8 F=36": ({"tensor": 8}, 8, 36),
}


def place(mesh, mats, scales=None):
    """The expert weights (and scales) put into the shards the default rules give them."""
    named = dict(zip(moe.MATRICES, mats, strict=True))
    if scales is not None:
        named |= {quantize.scale_name(m): s for m, s in zip(moe.MATRICES, scales, strict=True)}
    specs = moe.weight_specs(None, {k: v.shape for k, v in named.items()}, mesh)
    placed = {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k])) for k, v in named.items()}
    mats = tuple(placed[m] for m in moe.MATRICES)
    if scales is None:
        return mats, None
    return mats, tuple(placed[quantize.scale_name(m)] for m in moe.MATRICES)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_equals_single_device(mesh_name):
    spec, E, width = MESHES[mesh_name]
    mesh = make_mesh(spec, devices=jax.devices()[: int(np.prod(list(spec.values())))])
    T, k = 12, 2
    mats = random_layer(E, width)
    x, weights, experts = random_tokens(T, E, k)
    single, sizes = moe.experts_mlp(x, weights, experts, *mats)
    placed, _ = place(mesh, mats)
    if mesh_name == "expert=4,tensor=2":  # each device really holds 2 experts' halves
        assert placed[0].sharding.shard_shape(placed[0].shape) == (2, F // 2, D)
    step = jax.jit(lambda *a: moe.experts_mlp(*a, mesh=mesh))
    y, sharded_sizes = step(x, weights, experts, *placed)
    np.testing.assert_allclose(y, single, **TOL)
    np.testing.assert_array_equal(sharded_sizes, sizes)


@pytest.mark.parametrize("method", moe.METHODS)
def test_sharded_int8_and_every_method(method):
    mesh = make_mesh({"expert": 4, "tensor": 2})
    T, E, k = 9, 8, 3
    quantized = [quantize.quantize(w) for w in random_layer(E)]
    q, scales = tuple(a for a, _ in quantized), tuple(s for _, s in quantized)
    x, weights, experts = random_tokens(T, E, k)
    single, _ = moe.experts_mlp(x, weights, experts, *q, scales, method=method)
    placed, placed_scales = place(mesh, q, scales)
    step = jax.jit(lambda *a: moe.experts_mlp(*a, method=method, mesh=mesh))
    y, _ = step(x, weights, experts, *placed, placed_scales)
    np.testing.assert_allclose(y, single, **TOL)
