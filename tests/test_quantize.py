"""int8 weights and int8 KV cache: the arithmetic, loading and saving quantized, sharding, and
the quality the issue asks for, measured on the bundled demo model."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
import jaxllm
from jaxllm import cli, kv_cache, orbax_checkpoint, prune, quantize
from jaxllm.params import named_params, param_bytes
from jaxllm.tokenizer import byte_level_tokenizer
from sharding import DEFAULT_RULES, make_mesh

HELDOUT_SAMPLE = Path(__file__).parent / "data" / "demo_heldout_sample.json"
MESH = {"data": 2, "tensor": 4}


def test_quantize_rounds_each_output_channel_to_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 10)).astype(np.float32)  # [D, N, H]: two input dims
    w[2] = 0.0  # an all-zero channel must not divide by zero
    q, scale = quantize.quantize(jnp.asarray(w), 2)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (6,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=(1, 2)) / 127, rtol=1e-6)
    err = np.abs(np.asarray(quantize.dequantize(q, scale)) - w)
    assert (err <= np.asarray(scale)[:, None, None] / 2 + 1e-7).all()
    assert int(jnp.abs(q).max()) == 127 and not np.asarray(q[2]).any()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])  # vector loop up to 8 rows, matmul after
def test_int8_linear_equals_the_float_product_of_the_dequantized_weight(rows):
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((48, 4, 8)), jnp.float32)  # [out, N, H]
    x = jnp.asarray(rng.standard_normal((1, rows, 32)), jnp.float32)
    q, scale = quantize.quantize(w, 2)
    got = jax.jit(quantize.linear, static_argnums=3)(x, q, scale, 2)
    want = jnp.einsum("BTI,OI->BTO", x, quantize.dequantize(q, scale).reshape(48, 32))
    assert got.shape == (1, rows, 48)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_int8_heads_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero head must not divide by zero
    q, scale = kv_cache.quantize_heads(jnp.asarray(x))
    assert q.dtype == jnp.int8 and scale.shape == (5, 3) and scale.dtype == jnp.float32
    np.testing.assert_allclose(scale, np.abs(x).max(axis=-1) / 127, rtol=1e-6)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[..., None] - x)
    assert (err <= np.asarray(scale)[..., None] / 2 + 1e-7).all()
    assert not np.asarray(q[1, 2]).any() and float(scale[1, 2]) == 0.0


def test_int8_kv_pool_write_round_trip_and_size():
    """Tokens written to flat slots of a paged int8 pool read back within half a step of
    their scale; a slot past the pool's end (padding) is dropped; a token takes (H + 4) / 4H
    of the float32 bytes."""
    rng = np.random.default_rng(1)
    P, page, K, H = 4, 8, 2, 64
    L, layer = 2, 1  # a stacked pool; the write goes to layer 1 only
    pages = kv_cache.KVPool(
        jnp.zeros((L, P, page, K, H), jnp.int8),
        jnp.zeros((L, P, page, K, H), jnp.int8),
        jnp.zeros((L, P, page, K), jnp.float32),
        jnp.zeros((L, P, page, K), jnp.float32),
    )
    new = rng.standard_normal((6, K, H)).astype(np.float32)
    # Two tokens on page 2, three across the end of page 0 and page 3, one padding token.
    slots = np.array([2 * page + 5, 2 * page + 6, 0 * page + 7, 3 * page, 3 * page + 1, P * page])
    write = jax.jit(kv_cache.write)
    out = write(pages, jnp.int32(layer), jnp.asarray(new), jnp.asarray(new * 2), slots)
    for buffer in out:
        assert not np.asarray(buffer[0]).any()  # the other layer is untouched
    for stored, scales, want in [
        (out.keys[layer], out.key_scales[layer], new),
        (out.values[layer], out.value_scales[layer], new * 2),
    ]:
        assert stored.dtype == jnp.int8 and stored.shape == (P, page, K, H)
        flat = np.asarray(stored, np.float32).reshape(P * page, K, H)
        flat_scales = np.asarray(scales).reshape(P * page, K)
        got = flat[slots[:-1]] * flat_scales[slots[:-1], :, None]
        step = flat_scales[slots[:-1], :, None]
        assert (step > 0).all()
        assert (np.abs(got - want[:-1]) <= step / 2 + 1e-6).all()
        untouched = np.setdiff1d(np.arange(P * page), slots[:-1])
        assert not flat[untouched].any() and not flat_scales[untouched].any()

    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    pools = {
        dtype: kv_cache.KVPool.create(2, P, page, K, H, dtype, mesh, DEFAULT_RULES)
        for dtype in (jnp.float32, "int8")
    }
    for dtype, pool in pools.items():
        assert pool.quantized == (dtype == "int8")
        assert pool.nbytes == P * page * kv_cache.bytes_per_token(2, K, H, dtype)
    assert pools[jnp.float32].nbytes / pools["int8"].nbytes >= 3.5  # 4H / (H + 4) = 3.76


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_models.write("llama3_gqa", path)
    byte_level_tokenizer().save(path)
    return path


def _dequantized_arrays(llm) -> dict:
    """Float weights exactly equal to what the int8 ones (and their scales) stand for."""
    params = named_params(llm.runner.state)
    arrays = {}
    for name, var in params.items():
        if name.endswith(quantize.SCALE_SUFFIX):
            continue
        value = var.value()
        if value.dtype == jnp.int8:
            value = quantize.dequantize(value, params[quantize.scale_name(name)].value())
        arrays[name] = value
    return arrays


def test_quantized_model_shards_like_float_and_computes_the_dequantized_model(hf_dir, tmp_path):
    llm_f = jaxllm.LLM.load(hf_dir, mesh=MESH, max_seq_len=64, warm_up=False)
    llm_q = jaxllm.LLM.load(hf_dir, mesh=MESH, max_seq_len=64, quantize="int8", warm_up=False)
    float_params, int8_params = named_params(llm_f.runner.state), named_params(llm_q.runner.state)
    for name, var in float_params.items():
        q = int8_params[name].value()
        assert q.sharding.spec == var.value().sharding.spec, name  # same rules, same layout
        if quantize.input_dims(name) is not None:
            assert q.dtype == jnp.int8
            scale = int8_params[quantize.scale_name(name)].value()
            expected_q, expected_scale = quantize.quantize(var.value(), quantize.input_dims(name))
            assert (np.asarray(q) == np.asarray(expected_q)).all(), name
            np.testing.assert_array_equal(scale, expected_scale)
    ratio = param_bytes(llm_q.runner.state) / param_bytes(llm_f.runner.state)
    # hidden 64: each scale costs 4 bytes per 64 int8 weights; the demo model test checks 0.27.
    assert 0.25 < ratio < 0.28

    # The int8 model computes exactly the float model whose weights are the dequantized ones.
    ids = np.random.default_rng(3).integers(0, 320, size=40).tolist()
    dequantized = orbax_checkpoint.save_state(
        _state_with(llm_f, _dequantized_arrays(llm_q)),
        llm_f.config,
        tmp_path / "dequantized",
        tokenizer_dir=hf_dir,
    )
    llm_d = jaxllm.LLM.load(dequantized, mesh=MESH, max_seq_len=64, warm_up=False)
    np.testing.assert_allclose(llm_q.logits(ids), llm_d.logits(ids), rtol=1e-4, atol=1e-4)
    assert np.abs(llm_q.logits(ids) - llm_f.logits(ids)).max() > 1e-4  # rounding did happen
    for llm in (llm_f, llm_q, llm_d):
        llm.close()


def _state_with(llm, values: dict):
    """``llm``'s state with ``values`` (by per-layer name) in place of its own."""
    spec = llm.runner.spec
    return spec.fill(lambda name, target: jax.device_put(values[name], target.sharding))[1]


def test_int8_checkpoints_from_convert_and_from_load_agree(hf_dir, tmp_path):
    out = tmp_path / "int8"
    assert cli.main(["convert", str(hf_dir), str(out), "--quantize", "int8"]) == 0
    meta = json.loads((out / orbax_checkpoint.METADATA_FILE).read_text())
    assert meta["quantization"] == "int8"
    assert meta["params"]["layers.0.mlp.w_up"]["dtype"] == "int8"
    assert meta["params"]["layers.0.mlp.w_up_scale"]["shape"] == [96]
    assert meta["params"]["layers.0.attn.wo_scale"]["shape"] == [64]

    with pytest.raises(ValueError, match="prune the float checkpoint, then quantize"):
        prune.prune_checkpoint(out, tmp_path / "pruned", mlp_fraction=0.25, calibration_text=["x"])

    float_ckpt = orbax_checkpoint.convert_hf_to_orbax(hf_dir, tmp_path / "f32")
    ids = np.random.default_rng(4).integers(0, 320, size=30).tolist()
    logits = []
    for path, options in [
        (out, {}),  # saved quantized: loads quantized without being asked
        (float_ckpt, {"quantize": "int8"}),  # quantized at load from Orbax
        (hf_dir, {"quantize": "int8"}),  # quantized at load from safetensors
    ]:
        llm = jaxllm.LLM.load(path, mesh=MESH, max_seq_len=64, warm_up=False, **options)
        assert llm.runner.spec.quantized == "int8"
        logits.append(llm.logits(ids))
        llm.close()
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[0], logits[2])

    # Saved again from the live quantized state: the same arrays come back.
    llm = jaxllm.LLM.load(out, mesh={"tensor": 8}, max_seq_len=64, warm_up=False)
    again = orbax_checkpoint.save_state(
        llm.runner.state, llm.config, tmp_path / "again", tokenizer_dir=hf_dir
    )
    assert orbax_checkpoint.read_quantization(again) == "int8"
    llm.close()
    llm = jaxllm.LLM.load(again, mesh=MESH, max_seq_len=64, warm_up=False)
    np.testing.assert_array_equal(llm.logits(ids), logits[0])
    llm.close()


def test_bad_quantization_options_are_rejected(hf_dir):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        jaxllm.LLM.load(hf_dir, mesh=MESH, quantize="int3", warm_up=False)
    with pytest.raises(ValueError, match="unknown quantization 'int4-g48'"):
        jaxllm.LLM.load(hf_dir, mesh=MESH, quantize="int4-g48", warm_up=False)
    # This model's heads are 16 wide: the output projection's input groups cannot be 32.
    with pytest.raises(ValueError, match="head dim 16 is not a multiple of the group size 32"):
        jaxllm.LLM.load(hf_dir, mesh=MESH, quantize="int4", warm_up=False)
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8'"):
        jaxllm.LLM.load(hf_dir, mesh=MESH, kv_cache_dtype="fp8", warm_up=False)


# -- the demo model: the quality and memory bars --------------------------------------


def _heldout_windows(llm, count=4, length=256):
    files = json.loads(HELDOUT_SAMPLE.read_text())["files"]
    ids = [t for f in files for t in llm.tokenizer.encode(f["text"])]
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def _perplexity(llm, windows) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = llm.logits(ids)[:-1]
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        nll -= float(np.take_along_axis(np.asarray(logp), np.asarray(ids)[1:, None], 1).sum())
        count += len(ids) - 1
    return float(np.exp(nll / count))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef main():",
    "for i in range(10):",
    "    def __repr__(self):",
    "if __name__ == '__main__':",
]


# The same KV pool budget for every model: a float32 pool of 64 pages (16 tokens each) holds
# 4 sequences of 256 tokens on MESH, whose tensor=4 gives the demo model 4 KV heads.
KV_CACHE_BYTES = 8 << 20


@pytest.fixture(scope="module")
def demo_models():
    options = dict(
        mesh=MESH, max_seq_len=256, max_num_seqs=4, kv_cache_bytes=KV_CACHE_BYTES, warm_up=False
    )
    models = {
        "f32": jaxllm.LLM.load(**options),
        "int8": jaxllm.LLM.load(quantize="int8", **options),
        "int8_kv": jaxllm.LLM.load(kv_cache_dtype="int8", **options),
    }
    yield models
    for llm in models.values():
        llm.close()


def test_demo_int8_weights_quarter_memory_and_perplexity_within_2_percent(demo_models):
    f32, int8 = demo_models["f32"], demo_models["int8"]
    ratio = param_bytes(int8.runner.state) / param_bytes(f32.runner.state)
    assert ratio <= 0.27, ratio
    windows = _heldout_windows(f32)
    base, quantized = _perplexity(f32, windows), _perplexity(int8, windows)
    assert abs(quantized / base - 1) <= 0.02, (base, quantized)


def test_demo_int8_kv_cache_holds_3_5x_tokens_and_keeps_greedy_output(demo_models):
    f32, int8_kv = demo_models["f32"], demo_models["int8_kv"]
    for llm in (f32, int8_kv):
        assert llm.engine.kv_cache_bytes <= KV_CACHE_BYTES
    assert f32.engine.num_pages >= 4 * f32.engine.config.max_pages_per_seq
    # The same bytes hold 3.5x the pages (and tokens) in int8.
    pages = [llm.engine.num_pages for llm in (f32, int8_kv)]
    assert pages[1] / pages[0] >= 3.5, pages
    per_page = [llm.engine.kv_cache_bytes / llm.engine.num_pages for llm in (f32, int8_kv)]
    assert per_page[0] / per_page[1] >= 3.5, per_page
    want = f32.generate(PROMPTS, max_tokens=32, temperature=0, ignore_eos=True)
    got = int8_kv.generate(PROMPTS, max_tokens=32, temperature=0, ignore_eos=True)
    # Counted as the common prefix: after the first difference nothing is counted as a match.
    same = sum(_common_prefix(w.token_ids, g.token_ids) for w, g in zip(want, got, strict=True))
    assert same >= 0.9 * 32 * len(PROMPTS), same
    # Alone or batched, an int8-cache engine gives the same tokens (no batch dependence).
    alone = int8_kv.generate(PROMPTS[0], max_tokens=32, temperature=0, ignore_eos=True)
    assert alone.token_ids == got[0].token_ids


def test_scanned_models_load_save_and_compute_as_unrolled_ones(hf_dir, tmp_path):
    """An int8 checkpoint restored into stacked (scanned) layers on a sharded mesh: the same
    weights, the same logits and greedy tokens as one array per layer, and a state saved
    from the scanned model holds the same arrays under the same per-layer names."""
    out = tmp_path / "int8"
    assert cli.main(["convert", str(hf_dir), str(out), "--quantize", "int8"]) == 0
    options = dict(mesh=MESH, max_seq_len=64, max_num_seqs=2, warm_up=False)
    ids = np.random.default_rng(5).integers(0, 320, size=24).tolist()
    with (
        jaxllm.LLM.load(out, scan_layers=False, **options) as unrolled,
        jaxllm.LLM.load(out, scan_layers=True, **options) as scanned,
    ):
        assert "layers.attn.wq" in {".".join(map(str, p)) for p, _ in _flat(scanned)}
        np.testing.assert_allclose(scanned.logits(ids), unrolled.logits(ids), atol=1e-5)
        greedy = dict(max_tokens=8, temperature=0, ignore_eos=True)
        assert (
            scanned.generate(ids, **greedy).token_ids == unrolled.generate(ids, **greedy).token_ids
        )
        saved = orbax_checkpoint.save_state(
            scanned.runner.state, scanned.config, tmp_path / "resaved", tokenizer_dir=hf_dir
        )
        expected = named_params(unrolled.runner.state)
        got = named_params(scanned.runner.state)
        assert got.keys() == expected.keys()
        for name in ("layers.1.attn.wq", "layers.0.mlp.w_down_scale", "embed"):
            np.testing.assert_array_equal(np.asarray(got[name].value()), expected[name].value())
    with jaxllm.LLM.load(saved, scan_layers=False, **options) as again:
        np.testing.assert_allclose(again.logits(ids), unrolled.logits(ids), atol=1e-5)


def _flat(llm):
    from flax import nnx

    return nnx.to_flat_state(llm.runner.state)
