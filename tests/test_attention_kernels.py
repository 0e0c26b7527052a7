"""The attention chooser: what it picks per backend, and every kernel path that runs on CPU
(Pallas in interpret mode, ``jax.nn.dot_product_attention``'s XLA path) against the pure-JAX
attention of ``jaxllm.attention`` on random inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import attention, attention_kernels
from jaxllm.attention import RowGroup
from jaxllm.attention_kernels import choose
from jaxllm.kv_cache import KVPool

# float32 with the highest matmul precision (conftest): the kernels differ from the pure path
# only in summation order.
TOL = 2e-5


@pytest.mark.parametrize(
    "backend, decode, causal",
    [
        ("cpu", "jax", "jax"),
        ("tpu", "pallas_tpu", "jax"),
        ("gpu", "jax", "cudnn"),
        ("cuda", "jax", "cudnn"),
        ("rocm", "jax", "jax"),
    ],
)
def test_choice_per_backend(backend, decode, causal):
    kernels = choose(backend)
    assert (kernels.backend, kernels.decode, kernels.causal_impl) == (backend, decode, causal)
    assert f"decode={decode}" in kernels.describe() and backend in kernels.describe()
    if decode == "jax":
        assert kernels.paged is attention.paged
    if causal == "jax":
        assert kernels.causal is attention.causal


def test_default_backend_and_overrides():
    assert choose().backend == jax.default_backend()
    forced = choose("cpu", decode="pallas_gpu", causal="xla", interpret=True)
    assert (forced.decode, forced.causal_impl, forced.interpret) == ("pallas_gpu", "xla", True)
    assert "forced" in forced.describe() and "interpret" in forced.describe()
    with pytest.raises(ValueError, match="decode="):
        choose("cpu", decode="flash")
    with pytest.raises(ValueError, match="causal="):
        choose("cpu", causal="splash")


def _decode_inputs(seed=0, K=2, G=2, H=128, page_size=16, P=24, Pmax=6, dtype=np.float32):
    """Six decode rows in three groups of two: two real groups of different lengths (pages
    taken from a shuffled pool, so no row's pages are contiguous) and a padding group."""
    rng = np.random.default_rng(seed)
    kv_len = np.array([70, 45, 17, 1, 1, 1], np.int32)
    table = rng.permutation(P)[: 4 * Pmax].reshape(4, Pmax)
    table = np.concatenate([table, np.zeros((2, Pmax), table.dtype)]).astype(np.int32)
    block_pages = 2
    S = block_pages * page_size
    blocks = -(-kv_len // S)
    group_blocks = blocks.reshape(3, 2).max(axis=1)
    group_blocks[-1] = 0  # padding group
    rows = RowGroup(
        jnp.asarray(table), jnp.asarray(kv_len), jnp.asarray(kv_len - 1)[:, None],
        jnp.asarray(group_blocks, jnp.int32),
    )  # fmt: skip
    # Two layers; the tests read layer 1.
    keys = rng.standard_normal((2, P, page_size, K, H), np.float32)
    values = rng.standard_normal((2, P, page_size, K, H), np.float32)
    q = rng.standard_normal((6, 1, K * G, H), np.float32)
    pool = KVPool(jnp.asarray(keys, dtype), jnp.asarray(values, dtype))
    return jnp.asarray(q), rows, pool, block_pages


# The TPU kernel rounds what it loads to bfloat16 (the chooser gives it bfloat16 pools only):
# a bfloat16 pool with float32 queries is exact to float32 on both paths.
@pytest.mark.parametrize(
    "kernel, dtype", [("pallas_tpu", jnp.bfloat16), ("pallas_gpu", np.float32)]
)
def test_pallas_paged_decode_matches_pure_jax(kernel, dtype):
    q, rows, pages, block_pages = _decode_inputs(dtype=dtype)
    kernels = choose("cpu", decode=kernel, interpret=True)
    want = jax.jit(attention.paged, static_argnums=(4, 5))(q, rows, pages, 1, None, block_pages)
    got = jax.jit(kernels.paged, static_argnums=(4, 5))(q, rows, pages, 1, None, block_pages)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = float(jnp.max(jnp.abs(got - want)))
    print(f"{kernel}: max |error| {err:.2e}")
    assert err < TOL
    assert not jnp.any(got[4:])  # the padding group reads nothing, as in the pure path


def test_pallas_paged_row_position_limits_keys():
    """A row whose query sits before its kv_len sees keys up to its position only."""
    q, rows, pages, block_pages = _decode_inputs(seed=1, dtype=jnp.bfloat16)
    rows = rows._replace(positions=rows.positions.at[0, 0].set(33))
    kernels = choose("cpu", decode="pallas_tpu", interpret=True)
    want = attention.paged(q, rows, pages, 1, None, block_pages)
    got = kernels.paged(q, rows, pages, 1, None, block_pages)
    assert float(jnp.max(jnp.abs(got - want))) < TOL


def test_pallas_paged_falls_back_where_it_does_not_fit():
    """Prefill rows, a window or a float32 pool (for the TPU kernel) take the pure path
    (the same numbers)."""
    q, rows, pages, block_pages = _decode_inputs(seed=2, dtype=jnp.bfloat16)
    paged = choose("cpu", decode="pallas_tpu", interpret=True).paged
    _, _, f32_pages, _ = _decode_inputs(seed=2)
    np.testing.assert_array_equal(
        paged(q, rows, f32_pages, 1, None, block_pages),
        attention.paged(q, rows, f32_pages, 1, None, block_pages),
    )
    for window in (8, jnp.int32(8)):  # a Python int, or a layer's own traced by a scan
        np.testing.assert_array_equal(
            paged(q, rows, pages, 1, window, block_pages),
            attention.paged(q, rows, pages, 1, window, block_pages),
        )
    chunk = jnp.concatenate([q, q], axis=1)  # [R, 2, N, H]
    last = rows.positions[:, 0]
    prefill = rows._replace(positions=jnp.stack([last - 1, last], axis=1))
    np.testing.assert_array_equal(
        paged(chunk, prefill, pages, 1, None, block_pages),
        attention.paged(chunk, prefill, pages, 1, None, block_pages),
    )


def _causal_inputs(dtype, B=2, T=24, K=2, G=3, H=64, offset=0):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, T, K * G, H), dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), dtype)
    positions = jnp.broadcast_to(offset + jnp.arange(T, dtype=jnp.int32), (B, T))
    return q, k, v, positions


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("offset", [0, 7])
def test_dot_product_attention_xla_matches_causal(window, offset):
    q, k, v, positions = _causal_inputs(jnp.float32, offset=offset)
    causal = choose("cpu", causal="xla").causal
    want = attention.causal(q, k, v, positions, window)
    got = jax.jit(causal, static_argnums=(4,))(q, k, v, positions, window)
    err = float(jnp.max(jnp.abs(got - want)))
    print(f"dot_product_attention xla, window {window}, offset {offset}: max |error| {err:.2e}")
    assert err < TOL


def test_dot_product_attention_xla_bfloat16():
    q, k, v, positions = _causal_inputs(jnp.bfloat16)
    got = choose("cpu", causal="xla").causal(q, k, v, positions, None)
    want = attention.causal(q, k, v, positions, None)
    assert got.dtype == jnp.bfloat16
    # bfloat16 outputs of two summation orders: a few units in the last place (2**-8).
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    assert err < 0.05


def test_cudnn_path_falls_back_where_cudnn_does_not_fit():
    """float32 (cuDNN takes bf16/f16 only) and an int8 KV dtype take the pure path: on CPU
    this runs without cuDNN and gives the pure numbers exactly."""
    q, k, v, positions = _causal_inputs(jnp.float32)
    causal = choose("gpu").causal
    for kv_dtype in (None, "int8"):
        np.testing.assert_array_equal(
            causal(q, k, v, positions, None, kv_dtype),
            attention.causal(q, k, v, positions, None, kv_dtype),
        )
    assert attention_kernels.cudnn_fits(jnp.bfloat16, 128, None)
    assert not attention_kernels.cudnn_fits(jnp.bfloat16, 256, None)
    assert not attention_kernels.cudnn_fits(jnp.bfloat16, 128, "int8")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_matches_causal_on_gpu():
    q, k, v, positions = _causal_inputs(jnp.bfloat16, T=256, H=128)
    for window in (None, 32):
        got = choose("gpu").causal(q, k, v, positions, window)
        want = attention.causal(q, k, v, positions, window)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err < 0.05, (window, err)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Triton needs a GPU")
def test_pallas_gpu_paged_compiled_on_gpu():
    q, rows, pages, block_pages = _decode_inputs()
    paged = functools.partial(choose("gpu", decode="pallas_gpu").paged)
    got = jax.jit(paged, static_argnums=(4, 5))(q, rows, pages, 1, None, block_pages)
    want = attention.paged(q, rows, pages, 1, None, block_pages)
    assert float(jnp.max(jnp.abs(got - want))) < 1e-2  # TF32-class dots on the GPU
