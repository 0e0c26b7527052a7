"""Quantized weight formats (int8 per channel or per group, packed int4) and every spelling
of their matmul: jaxllm's CPU kernel (one device, few rows), XLA's row products and blockwise
conversion, on one device and sharded over meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hf_models
import jaxllm
from jaxllm import cli, cpu_kernels, orbax_checkpoint, quantize
from jaxllm.params import param_bytes
from jaxllm.tokenizer import byte_level_tokenizer
from sharding import make_mesh

METHODS = ("int8", "int8-g32", "int4", "int4-g64", "int4-g128")
# The kernel multiplies exactly what round_activations(x) @ dequantize(w).T says, up to float
# summation order: int32 sums of int8 products, scaled per block in float32.
KERNEL_RTOL = 2e-5
# XLA's spellings multiply x itself by the dequantized weight.
XLA_RTOL = 2e-5


def _weight(seed: int, out: int = 96, width: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, width)).astype(np.float32)
    w[3] = 0.0  # an all-zero output channel: scale 0, values 0
    w[5, :32] *= 50  # one group far larger than the rest of its row
    return w


def test_int4_packs_two_values_per_byte_in_blocks_of_32_and_unpacks_exactly():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(3, 5, 128), dtype=np.int8)
    q[0, 0, :16] = np.arange(-8, 8)  # every value, in the low nibbles of the first block
    packed = np.asarray(quantize.pack_int4(jnp.asarray(q)))
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 64)
    # Byte j of a block: element j + 8 in the low nibble, element j + 16 + 8 in the high one.
    block = q[1, 2, 32:64].astype(np.int16) + 8
    np.testing.assert_array_equal(packed[1, 2, 16:32], block[:16] | (block[16:] << 4))
    np.testing.assert_array_equal(packed[0, 0, :16] & 15, np.arange(16))
    np.testing.assert_array_equal(np.asarray(quantize.unpack_int4(jnp.asarray(packed))), q)


@pytest.mark.parametrize("method", METHODS)
def test_grouped_quantization_rounds_each_group_to_within_half_a_step(method):
    w = _weight(1)
    q, scale = quantize.quantize(jnp.asarray(w), 1, method)
    how = quantize.scheme(method)
    group = how.group or w.shape[1]
    assert q.dtype == (jnp.int8 if how.bits == 8 else jnp.uint8)
    assert q.shape == (96, 256 * how.bits // 8)
    assert scale.shape == ((96,) if how.group is None else (96, 256 // group))
    steps = np.repeat(np.asarray(scale).reshape(96, -1), group, axis=1)
    err = np.abs(np.asarray(quantize.dequantize(q, scale)) - w)
    assert (err <= steps / 2 + 1e-6).all()
    assert not np.asarray(quantize.dequantize(q, scale))[3].any()
    values = quantize.unpack_int4(q) if how.bits == 4 else q
    assert int(jnp.abs(values).max()) == how.qmax  # each group's largest value uses the range


def test_method_names_are_checked_and_grouped_widths_must_divide():
    assert cli.QUANTIZE_METHODS == quantize.METHOD_NAMES  # the flag's choices
    assert quantize.scheme("int4") == quantize.Scheme(4, 32)
    assert quantize.scheme("int8") == quantize.Scheme(8, None)
    assert quantize.scheme("int4-g128") == quantize.Scheme(4, 128)
    for bad in ("int3", "int4-g48", "int4-", "fp8"):
        with pytest.raises(ValueError, match="unknown quantization"):
            quantize.check_method(bad)
    with pytest.raises(ValueError, match="head dim 80 is not a multiple of the group size 32"):
        quantize.check_widths("int4", {"hidden size": 4096, "head dim": 80})
    quantize.check_widths("int8", {"head dim": 80})  # per channel: any width


def _reference(x, q, scale, kernel: bool) -> np.ndarray:
    rows = np.asarray(x).reshape(-1, x.shape[-1])
    if kernel:
        rows = np.asarray(cpu_kernels.round_activations(jnp.asarray(rows)))
    w = np.asarray(quantize.dequantize(q, scale), np.float64)
    return (rows.astype(np.float64) @ w.T).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("method", METHODS)
def test_kernel_equals_the_dequantized_product_of_rounded_activations(method):
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler or no AVX2 here: the kernel cannot be built")
    q, scale = quantize.quantize(jnp.asarray(_weight(2)), 1, method)
    linear = jax.jit(quantize.linear, static_argnames=("in_dims", "kernel"))
    rng = np.random.default_rng(3)
    most = quantize.scheme(method).group and quantize.GROUPED_KERNEL_MAX_ROWS
    for rows in (1, 2, 3, 4, 5, 8, most or quantize.KERNEL_MAX_ROWS):
        x = jnp.asarray(rng.standard_normal((1, rows, 256)).astype(np.float32))
        x = x.at[0, 0, 7].set(40.0)  # an outlier: its block's other values round coarsely
        got = np.asarray(linear(x, q, scale, kernel=True))
        want = _reference(x, q, scale, kernel=True)
        np.testing.assert_allclose(got, want, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * 50)
        # The rounding of activations is real (else this test would not see the kernel).
        assert np.abs(got - _reference(x, q, scale, kernel=False)).max() > 1e-4


def test_kernel_rows_do_not_depend_on_the_rows_beside_them():
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler or no AVX2 here: the kernel cannot be built")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, quantize.KERNEL_MAX_ROWS, 256)).astype(np.float32))
    linear = jax.jit(quantize.linear, static_argnames=("in_dims", "kernel"))
    for method in ("int8", "int4"):
        q, scale = quantize.quantize(jnp.asarray(_weight(5)), 1, method)
        together = np.asarray(linear(x, q, scale, kernel=True))
        for count in (1, 3, 5):
            part = np.asarray(linear(x[:, :count], q, scale, kernel=True))
            np.testing.assert_array_equal(part, together[:, :count])  # bit for bit


def test_switched_off_kernel_traces_xla_code():
    q, scale = quantize.quantize(jnp.asarray(_weight(6)), 1, "int4")
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 2, 256)).astype(np.float32))
    with cpu_kernels.switched_off():
        assert not cpu_kernels.available()
        got = jax.jit(lambda x: quantize.linear(x, q, scale, kernel=True))(x)
    want = _reference(x, q, scale, kernel=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=XLA_RTOL, atol=1e-4)


# Weights [out, in] sharded by output channel ("tensor": column parallel) and by input
# channel (row parallel: groups split with their inputs), activations by row where the mesh
# has a data axis.
MESHES = {
    "one device": ({"tensor": 1}, PartitionSpec(), PartitionSpec()),
    "tensor 2, by output": ({"tensor": 2}, PartitionSpec("tensor"), PartitionSpec()),
    "data 2 x tensor 4, by input": (
        {"data": 2, "tensor": 4},
        PartitionSpec(None, "tensor"),
        PartitionSpec(None, "data"),
    ),
}


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("method", ("int8", "int8-g32", "int4", "int4-g128"))
def test_xla_spellings_equal_the_dequantized_product_on_meshes(mesh_name, method):
    shape, weight_spec, x_spec = MESHES[mesh_name]
    count = int(np.prod(list(shape.values())))
    mesh = make_mesh(shape, devices=jax.devices()[:count])
    q, scale = quantize.quantize(jnp.asarray(_weight(8)), 1, method)
    scale_spec = weight_spec if scale.ndim == 2 else PartitionSpec(*weight_spec[:1])
    if scale.ndim == 2 and scale.shape[1] % count:  # as the rules do: too few groups to split
        scale_spec = PartitionSpec()
    q = jax.device_put(q, NamedSharding(mesh, weight_spec))
    scale = jax.device_put(scale, NamedSharding(mesh, scale_spec))
    rng = np.random.default_rng(9)
    linear = jax.jit(quantize.linear, static_argnames=("in_dims", "kernel"))
    # 1-8 rows: row products (per channel) or blockwise; 20 and 300: blockwise (many rows).
    for rows in (1, 4, 8, 20, 300):
        x = jnp.asarray(rng.standard_normal((1, rows, 256)).astype(np.float32))
        spec = x_spec if rows % 2 == 0 else PartitionSpec()  # one row cannot split
        x = jax.device_put(x, NamedSharding(mesh, spec))
        got = np.asarray(linear(x, q, scale))
        want = _reference(x, q, scale, kernel=False)
        np.testing.assert_allclose(got, want, rtol=XLA_RTOL, atol=XLA_RTOL * 50)


# -- a whole model in int4 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama whose heads are 32 wide, so that int4's groups of 32 fit every layer."""
    path = tmp_path_factory.mktemp("llama_int4")
    hf_models.write("llama3_gqa", path, num_attention_heads=2, num_key_value_heads=1)
    byte_level_tokenizer().save(path)
    return path


def test_int4_model_loads_converts_and_saves_as_int4_on_one_device_and_a_mesh(hf_dir, tmp_path):
    ids = np.random.default_rng(3).integers(0, 320, size=40).tolist()
    options = dict(max_seq_len=64, warm_up=False)
    f32 = jaxllm.LLM.load(hf_dir, **options)
    at_load = jaxllm.LLM.load(hf_dir, quantize="int4", **options)  # one device: the kernel
    out = tmp_path / "int4"
    assert cli.main(["convert", str(hf_dir), str(out), "--quantize", "int4"]) == 0
    meta = orbax_checkpoint.read_metadata(out)
    assert meta["quantization"] == "int4"
    assert meta["params"]["layers.0.mlp.w_up"] == {"shape": [96, 32], "dtype": "uint8"}
    assert meta["params"]["layers.0.mlp.w_up_scale"]["shape"] == [96, 2]
    assert meta["params"]["layers.0.attn.wo"]["shape"] == [64, 2, 16]  # [D, N, H / 2]
    assert meta["params"]["embed"]["dtype"] == "int8"  # the table stays int8 per row
    stored = jaxllm.LLM.load(out, **options)
    sharded = jaxllm.LLM.load(out, mesh={"data": 2, "tensor": 4}, **options)
    assert stored.runner.spec.quantized == sharded.runner.spec.quantized == "int4"

    # The same int4 arrays whether quantized at load or stored: the same logits. On the mesh
    # XLA multiplies (activations not rounded to int8): close, not equal.
    np.testing.assert_array_equal(stored.logits(ids), at_load.logits(ids))
    np.testing.assert_allclose(sharded.logits(ids), at_load.logits(ids), rtol=0.05, atol=0.1)
    # Rounding to 4 bits moved the logits, but they still follow the float model's.
    base, got = np.asarray(f32.logits(ids)), np.asarray(at_load.logits(ids))
    assert np.abs(got - base).max() > 1e-3
    assert np.corrcoef(got.ravel(), base.ravel())[0, 1] > 0.95
    ratio = param_bytes(at_load.runner.state) / param_bytes(f32.runner.state)
    assert ratio < 0.3, ratio  # layer weights 0.16x; the int8 embedding and head weigh more

    # Decode (the kernel on one device, XLA's code on the mesh): every token generated.
    for llm in (at_load, sharded):
        done = llm.generate("hello", max_tokens=6, temperature=0, ignore_eos=True)
        assert len(done.token_ids) == 6

    again = tmp_path / "saved"
    orbax_checkpoint.save_state(at_load.runner.state, at_load.config, again, tokenizer_dir=hf_dir)
    assert orbax_checkpoint.read_quantization(again) == "int4"
    for llm in (f32, at_load, stored, sharded):
        llm.close()
