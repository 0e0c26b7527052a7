"""Quantized weight formats (int8 per channel or per group, packed int4) and every spelling
of their matmul: jaxllm's CPU kernel (one device, few rows), XLA's row products and blockwise
conversion, on one device and sharded over meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import cli, cpu_kernels, quantize
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
