"""Scanned layers on CPU: jaxllm's kernels read a layer of a stacked weight in place (XLA
copies it out of the stack first), equal XLA's product, and a scanned model's compiled step
holds no weight-sized copy."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import cpu_kernels, quantize
from jaxllm.config import ModelConfig
from jaxllm.model import Transformer

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels here")

# float32 sums of a few hundred products in another order than numpy's float64 reference.
RTOL = 1e-5


def _stack(layers=4, out=21, width=203, seed=0) -> np.ndarray:
    # Odd sizes: outputs not a multiple of the kernel's 4-row tiles, widths not of 8 lanes.
    return np.random.default_rng(seed).standard_normal((layers, out, width)).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 64])
def test_float_kernel_multiplies_the_chosen_layer(rows):
    w = _stack()
    x = np.random.default_rng(rows).standard_normal((rows, w.shape[2])).astype(np.float32)
    product = jax.jit(cpu_kernels.matmul)
    for layer in range(w.shape[0]):
        got = np.asarray(product(jnp.asarray(x), jnp.asarray(w), layer))
        want = x.astype(np.float64) @ w[layer].astype(np.float64).T
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    # A layer past either end reads the nearest one, as XLA clamps a dynamic slice.
    np.testing.assert_array_equal(product(x, w, 9), product(x, w, 3))
    np.testing.assert_array_equal(product(x, w, -2), product(x, w, 0))
    np.testing.assert_array_equal(product(x, w[1], None), product(x, w, 1))


def test_float_kernel_rows_do_not_depend_on_the_rows_beside_them():
    w = jnp.asarray(_stack(layers=2, out=64, width=256))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((9, 256)).astype(np.float32))
    full = np.asarray(jax.jit(cpu_kernels.matmul)(x, w, 1))
    for rows in range(1, 9):
        np.testing.assert_array_equal(np.asarray(cpu_kernels.matmul(x[:rows], w, 1)), full[:rows])
        one = np.asarray(cpu_kernels.matmul(x[rows : rows + 1], w, 1))
        np.testing.assert_array_equal(one, full[rows : rows + 1])


@pytest.mark.parametrize("method", ["int8", "int4", "int4-g128"])
def test_quantized_kernel_reads_a_stacked_layer_as_the_layer_alone(method):
    w = jnp.asarray(_stack(layers=3, out=40, width=256))
    q, scale = quantize.quantize(w, 1, method)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32))
    s = scale.reshape(3, 40, -1)
    for layer in range(3):
        stacked = cpu_kernels.qmatmul(x, q, s, layer=jnp.int32(layer))
        alone = cpu_kernels.qmatmul(x, q[layer], s[layer])
        np.testing.assert_array_equal(np.asarray(stacked), np.asarray(alone))


@pytest.mark.parametrize("quantized", [None, "int8", "int4"])
def test_linear_of_a_stacked_layer_equals_the_layer_as_xla_multiplies_it(quantized):
    w = jnp.asarray(_stack(layers=3, out=48, width=128))
    stack, scale = (w, None) if quantized is None else quantize.quantize(w, 1, quantized)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 6, 128)).astype(np.float32))

    @jax.jit
    def both(x, layer):
        kernel = quantize.linear(x, stack, scale, kernel=True, layer=layer)
        w_l, s_l = stack[layer], None if scale is None else scale[layer]
        if quantized:  # XLA's spelling multiplies x; the kernel, x rounded per block of 32
            x = cpu_kernels.round_activations(x[0])[None]
        return kernel, quantize.linear(x, w_l, s_l)

    for layer in range(3):
        kernel, xla = both(x, jnp.int32(layer))
        np.testing.assert_allclose(kernel, xla, rtol=2e-5, atol=2e-5 * np.abs(xla).max())


def _weight_sized_copies(hlo: str, smallest: int) -> list[str]:
    """Instructions of a compiled program (outside fused computations, which read their
    operands in place) that slice or copy out at least ``smallest`` float32 elements into
    a buffer of their own: a layer's weight taken out of its stack."""
    found = []
    for computation in hlo.split("\n\n"):
        if computation.lstrip().startswith("%fused"):
            continue
        for line in computation.splitlines():
            m = re.search(r"%([\w.-]+) = f32\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", line)
            if not m or np.prod([int(d) for d in m.group(2).split(",")]) < smallest:
                continue
            name, op = m.group(1), m.group(3)
            if op in ("copy", "dynamic-slice") or (op == "fusion" and "dynamic" in name):
                found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("rows", [1, 8])
def test_scanned_model_step_reads_weights_in_place(rows):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    )
    model = Transformer(cfg, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def compiled_text() -> str:  # traced afresh each call (jit caches traces per function)
        def forward(state, tokens, positions):
            return nnx.merge(graphdef, state)(tokens, positions)[0]

        tokens = jnp.zeros((1, rows), jnp.int32)
        positions = jnp.arange(rows)[None]
        return jax.jit(forward).lower(state, tokens, positions).compile().as_text()

    hlo = compiled_text()
    smallest = 128 * 32  # the smallest linear weight: wk, [2, 32, 128]
    assert _weight_sized_copies(hlo, smallest) == []
    assert hlo.count("jaxllm_fmatmul") >= 7  # q, k, v, o, gate, up, down (in the scan body)
    # The check can fail: with the kernels off, XLA copies each weight out of its stack
    # before a matmul of several rows (one row: a vector-matrix loop that reads in place).
    if rows > quantize.SLICED_ROW_LOOP_MAX_ROWS:
        with cpu_kernels.switched_off():
            plain = compiled_text()
        assert len(_weight_sized_copies(plain, smallest)) >= 7


def test_float_kernel_gradients_are_the_products_gradients():
    # Training a scanned model on one CPU device differentiates through the kernel.
    w = jnp.asarray(_stack(layers=3, out=24, width=40))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 40)).astype(np.float32))

    def loss(product):
        return lambda x, w: jnp.sum(jnp.tanh(product(x, w)))

    for layer in (0, 2):
        got = jax.grad(loss(lambda x, w, i=layer: cpu_kernels.matmul(x, w, jnp.int32(i))), (0, 1))
        want = jax.grad(loss(lambda x, w, i=layer: x @ w[i].T), (0, 1))
        for g, r in zip(got(x, w), want(x, w), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
