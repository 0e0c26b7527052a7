"""Logit parity with Hugging Face transformers (PyTorch, float32) on every supported variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec
from jaxllm.runtime import ModelRunner
from sharding import DEFAULT_RULES, make_mesh

PROMPT_LEN = 64
CACHE_LEN = PROMPT_LEN + 8  # one cache size for every test, so each step compiles once


def load_runner(path) -> ModelRunner:
    """On one device: sharded layouts are checked against this in test_sharding_parity."""
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    spec = ModelSpec(ModelConfig.from_hf_dir(path), jnp.float32, mesh, DEFAULT_RULES)
    return ModelRunner(spec, *load_hf_state(path, spec))


@pytest.fixture(scope="module", params=sorted(hf_models.VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_models.write(request.param, path)
    ids = np.random.default_rng(1).integers(0, 320, size=(1, PROMPT_LEN))
    return load_runner(path), ids, hf_models.torch_logits(model, ids).numpy()[0]


def test_full_forward_matches_transformers(variant):
    runner, ids, expected = variant
    cache = runner.new_cache(1, CACHE_LEN)
    logits, _ = runner.forward(runner.params, jnp.asarray(ids), jnp.arange(PROMPT_LEN)[None], cache)
    assert np.abs(np.asarray(logits)[0] - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero logits


def decode_one_by_one(runner, ids, start, cache) -> list[np.ndarray]:
    """Feeds tokens ``start..`` one at a time at their positions; logits of each step."""
    got = []
    for t in range(start, ids.shape[1]):
        logits, cache = runner.forward_at(
            runner.params,
            jnp.asarray(ids[:, t : t + 1]),
            jnp.full((1, 1), t),
            cache,
            jnp.zeros((1,), jnp.int32),
        )
        got.append(np.asarray(logits)[0])
    return got


def test_cached_decode_token_by_token_matches_transformers(variant):
    runner, ids, expected = variant
    got = decode_one_by_one(runner, ids, 0, runner.new_cache(1, CACHE_LEN))
    assert np.abs(np.stack(got) - expected).max() <= 1e-4


def test_prefill_then_decode_matches_transformers(variant):
    """A padded prompt prefill followed by single-token steps, as the engine runs them."""
    runner, ids, expected = variant
    cache = runner.new_cache(1, CACHE_LEN)
    split = 40
    padded = np.zeros((1, 48), np.int64)
    padded[:, :split] = ids[:, :split]
    logits, cache = runner.forward_at(
        runner.params, jnp.asarray(padded), jnp.arange(48)[None], cache, jnp.array([split - 1])
    )
    got = [np.asarray(logits)[0], *decode_one_by_one(runner, ids, split, cache)]
    assert np.abs(np.stack(got) - expected[split - 1 :]).max() <= 1e-4
