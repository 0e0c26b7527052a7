"""The accelerator numerics, run on CPU: bfloat16 weights and activations, float32
accumulation in every matmul and einsum, float32 softmax, norms and logits.

Tolerance (documented in the README): on the demo model, bfloat16 logits differ from float32
ones by at most 5% of the largest float32 logit at any position, and the most likely next
token agrees at >= 90% of positions (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding,
compounded over the layers)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import step

MAX_ERROR_OF_MAX_LOGIT = 0.05
MIN_TOP1_AGREEMENT = 0.90
TEXT = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
'''


@pytest.fixture(scope="module")
def pair():
    options = dict(warm_up=False, max_num_seqs=2, max_seq_len=128, compilation_cache=False)
    with (
        jaxllm.LLM.load(dtype="float32", **options) as f32,
        jaxllm.LLM.load(dtype="bfloat16", **options) as bf16,
    ):
        yield f32, bf16


def test_bf16_logits_track_float32_within_the_documented_tolerance(pair):
    f32, bf16 = pair
    assert bf16.runner.spec.dtype == jnp.bfloat16
    ids = f32.tokenizer.encode(TEXT)
    assert len(ids) > 40
    want, got = f32.logits(ids), bf16.logits(ids)
    assert got.dtype == np.float32  # logits are float32 whatever the weights
    error = np.abs(got - want).max() / np.abs(want).max()
    agreement = (got.argmax(-1) == want.argmax(-1)).mean()
    assert error <= MAX_ERROR_OF_MAX_LOGIT, error
    assert agreement >= MIN_TOP1_AGREEMENT, agreement
    assert error > 0  # the bf16 path did round


def _dots(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "dot_general" in line]


def test_every_bf16_matmul_accumulates_in_float32(pair):
    """In the forward pass and in an engine step (paged attention included), every product
    of bfloat16 operands produces float32."""
    _, bf16 = pair
    runner, engine = bf16.runner, bf16.engine
    tokens = jnp.zeros((1, 8), jnp.int32)
    forward = runner.forward.lower(runner.params, tokens, jnp.arange(8)[None]).as_text()
    shape = engine.config.step_shapes[-1]
    inp = step.padding_only(shape, engine.config, engine.num_pages)
    step_fn = engine._step._model.lower(
        runner.params, engine.pool, inp._replace(sampling=None, sample_step=None)
    ).as_text()
    for program in (forward, step_fn):
        dots = _dots(program)
        bf16_dots = [d for d in dots if "bf16" in d.split("->")[0]]
        assert len(bf16_dots) >= 7  # q, k, v, o, gate, up, down at least
        for dot in bf16_dots:
            result = dot.split("->")[-1]
            assert re.search(r"tensor<[0-9x]*f32>", result), dot
