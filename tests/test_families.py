"""The model families beyond Llama (Qwen3, Gemma 3, Mixtral, Qwen3-MoE): their configs, logit
parity with transformers on meshes that split heads or experts evenly and unevenly,
batch-invariant greedy output through the engine, Orbax conversion and int8 weights.
Every-variant single-device parity (plain forward and paged steps) lives in
test_model_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_quantize import _dequantized_arrays, _state_with

import hf_models
import jaxllm
from jaxllm import kv_cache, orbax_checkpoint, prune
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.orbax_checkpoint import convert_hf_to_orbax
from jaxllm.params import ModelSpec
from jaxllm.runtime import ModelRunner
from jaxllm.tokenizer import byte_level_tokenizer
from sharding import DEFAULT_RULES, make_mesh


def mesh_of(spec: dict[str, int]):
    """A mesh over as many of the 8 fake devices as ``spec`` needs."""
    return make_mesh(spec, devices=jax.devices()[: int(np.prod(list(spec.values())))])


FAMILIES = ["qwen3", "gemma3", "mixtral", "qwen3_moe"]
MOE = {"mixtral", "qwen3_moe"}
LENGTH = 40  # longer than Gemma's 16-token window in the test model
# Heads split evenly (4 query / 2 KV heads over 2), query heads padded and KV heads copied
# (over 3), KV heads copied with the model width split by FSDP (tensor 4 x fsdp 2).
MESHES = [{"tensor": 2}, {"tensor": 3}, {"fsdp": 2, "tensor": 4}]
# Experts over the expert axis: 4 or 6 experts over 2 (and each expert's width over tensor
# 2), over 4 (6 do not divide: replicated), over 8 (fewer experts than devices: replicated).
EXPERT_MESHES = [{"expert": 2, "tensor": 2}, {"expert": 4}, {"expert": 8}]
ENGINE = dict(max_seq_len=96, max_num_seqs=4, max_step_tokens=32, chunk=16, page_size=8)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """A transformers checkpoint folder with a byte-level tokenizer, the model, token ids
    and transformers' logits for them."""
    path = tmp_path_factory.mktemp(request.param)
    model = hf_models.write(request.param, path)
    byte_level_tokenizer().save(path)
    ids = np.random.default_rng(3).integers(0, 320, size=(2, LENGTH))
    return request.param, path, model, ids, hf_models.torch_logits(model, ids).numpy()


def forward(path, mesh, quantized=None):
    spec = ModelSpec(ModelConfig.from_hf_dir(path), jnp.float32, mesh, DEFAULT_RULES, quantized)
    runner = ModelRunner(spec, *load_hf_state(path, spec))
    return runner, lambda ids: np.asarray(
        runner.forward(
            runner.params, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        )
    )


def test_configs_read_what_transformers_wrote_and_write_it_back(family):
    name, path, model, _, _ = family
    config = ModelConfig.from_hf_dir(path)
    assert config.qk_norm == (name != "mixtral")
    if name == "mixtral":
        assert (config.num_experts, config.experts_per_token) == (4, 2)
        assert config.normalize_expert_weights and config.expert_intermediate_size == 96
    if name == "qwen3_moe":
        assert (config.num_experts, config.experts_per_token) == (6, 1)
        assert not config.normalize_expert_weights and config.expert_intermediate_size == 48
    if name == "gemma3":
        assert config.sliding_windows == (16, None, 16)
        assert (config.local_rope_theta, config.rope_theta) == (1e4, 1e6)
        assert config.rope_scaling.rope_type == "linear" and config.rope_scaling.factor == 8.0
        assert config.norm_plus_one and config.sandwich_norms and config.scale_embeddings
        assert config.mlp_activation == "gelu_tanh" and config.query_pre_attn_scalar == 24
        assert config.tie_word_embeddings
    assert config.num_params == sum(p.numel() for p in model.parameters())
    if name == "qwen3":
        prune.check_prunable(config)
    else:  # calibration replays the Llama-family layer: refused, not scored wrong
        with pytest.raises(ValueError, match="pruning"):
            prune.check_prunable(config)
    # What jaxllm writes (Orbax, HF export) reads back to the same config, in both readers.
    written = config.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == config
    hf_config = type(model.config)(**{k: v for k, v in written.items() if k != "architectures"})
    for field in ("layer_types", "sliding_window", "num_experts", "norm_topk_prob"):
        assert getattr(hf_config, field, None) == getattr(model.config, field, None), field
    if name == "gemma3":
        assert hf_config.rope_parameters == model.config.rope_parameters


def test_sharded_logits_match_transformers(family):
    name, path, _, ids, expected = family
    meshes = [{"tensor": 3}, *EXPERT_MESHES] if name in MOE else MESHES
    for mesh_spec in meshes:
        runner, run = forward(path, mesh_of(mesh_spec))
        np.testing.assert_allclose(run(ids), expected, atol=1e-4, rtol=0, err_msg=str(mesh_spec))
        if mesh_spec == {"tensor": 3}:  # 4 query heads do not divide: padded to 6
            assert runner.spec.config.head_layout is not None


def test_engine_greedy_output_matches_transformers_and_the_batch(family):
    name, path, model, ids, _ = family
    llm = jaxllm.LLM.load(path, **ENGINE)
    try:
        prompts = [list(map(int, ids[0, :n])) for n in (5, 17, 33, 40)]
        alone = [llm.generate(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
        together = llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompts[2]]),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[0, len(prompts[2]) :].tolist()
        assert alone[2].token_ids == ref
        stats = llm.engine.stats()
        if name in MOE:  # every computed token went to k experts in each layer
            cfg = llm.config
            computed = stats["prompt_tokens"] - stats["prefix_hit_tokens"]
            computed += sum(len(c.token_ids) - 1 for c in alone + together)
            assert stats["preemptions"] == 0
            assert len(stats["expert_tokens"]) == cfg.num_experts
            assert sum(stats["expert_tokens"]) == computed * cfg.experts_per_token * cfg.num_layers
            assert stats["expert_load_imbalance"] >= 1.0
        else:
            assert "expert_tokens" not in stats
    finally:
        llm.close()


def test_orbax_conversion_and_int8_weights(family, tmp_path):
    _, path, _, ids, expected = family
    ids = ids[0].tolist()
    out = convert_hf_to_orbax(path, tmp_path / "float")
    llm = jaxllm.LLM.load(out, warm_up=False, start=False, **ENGINE)
    np.testing.assert_allclose(llm.logits(ids), expected[0], atol=1e-4, rtol=0)
    assert llm.config == ModelConfig.from_hf_dir(path)

    # int8 weights compute exactly the float model whose weights are their dequantized values,
    # whether quantized at load or by `jaxllm convert --quantize int8`.
    llm_q = jaxllm.LLM.load(path, quantize="int8", warm_up=False, start=False, **ENGINE)
    dequantized = orbax_checkpoint.save_state(
        _state_with(llm, _dequantized_arrays(llm_q)),
        llm.config,
        tmp_path / "dq",
        tokenizer_dir=path,
    )
    llm_d = jaxllm.LLM.load(dequantized, warm_up=False, start=False, **ENGINE)
    np.testing.assert_allclose(llm_q.logits(ids), llm_d.logits(ids), atol=1e-4, rtol=1e-4)
    assert np.abs(llm_q.logits(ids) - expected[0]).max() > 1e-3  # rounding did happen
    out8 = convert_hf_to_orbax(path, tmp_path / "int8", quantize="int8")
    llm8 = jaxllm.LLM.load(out8, warm_up=False, start=False, **ENGINE)
    np.testing.assert_allclose(llm8.logits(ids), llm_q.logits(ids), atol=1e-4, rtol=0)


def test_moe_greedy_output_is_the_same_with_and_without_the_expert_axis(tmp_path):
    """Mixtral's greedy tokens through the engine: one device, against experts split over
    the expert axis and each expert's width over tensor (8 devices)."""
    hf_models.write("mixtral", tmp_path)
    byte_level_tokenizer().save(tmp_path)
    prompts = [list(range(40, 40 + n)) for n in (3, 19, 37)]
    outputs = []
    for mesh in (None, {"expert": 4, "tensor": 2}):
        llm = jaxllm.LLM.load(tmp_path, mesh=mesh, **ENGINE)
        try:
            if mesh is not None:
                assert llm.mesh.shape["expert"] == 4
            completions = llm.generate(prompts, max_tokens=16, temperature=0, ignore_eos=True)
            outputs.append([c.token_ids for c in completions])
            assert sum(llm.engine.stats()["expert_tokens"]) > 0
        finally:
            llm.close()
    assert outputs[0] == outputs[1]


def test_a_sliding_window_model_holds_only_its_window_of_pages(tmp_path):
    """Mistral (every layer within 16 positions): four 100-token sequences at once in a pool
    of 160 tokens. Holding every page they would need 100 pages of 4 and preempt each other;
    giving back the pages that fell out of the window, each holds about 6 and none waits. The
    tokens are those of each request alone, and transformers' for one of them."""
    model = hf_models.write("mistral_sliding", tmp_path)
    byte_level_tokenizer().save(tmp_path)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    assert cfg.shared_window == 16
    per_token = kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "float32")
    options = dict(ENGINE, max_seq_len=128, page_size=4, kv_cache_bytes=160 * per_token)
    llm = jaxllm.LLM.load(tmp_path, **options)
    try:
        assert llm.engine.num_pages == 40
        prompts = [list(range(30 + i, 70 + i)) for i in range(4)]
        together = llm.generate(prompts, max_tokens=60, temperature=0, ignore_eos=True)
        stats = llm.engine.stats()
        assert stats["preemptions"] == 0
        alone = [llm.generate(p, max_tokens=60, temperature=0, ignore_eos=True) for p in prompts]
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompts[0]]),
                max_new_tokens=60,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[0, 40:].tolist()
        assert alone[0].token_ids == ref
        llm.engine.wait_idle()
        llm.engine.pages.check()
        assert llm.engine.stats()["pages_used"] == 0
    finally:
        llm.close()
