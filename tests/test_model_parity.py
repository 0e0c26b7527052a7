"""Logit parity with Hugging Face transformers (PyTorch, float32) on every supported variant:
the plain causal forward, and the engine's paged step (chunked prefill and decode over a
shared KV pool) driven row by row."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxllm import step
from jaxllm.config import ModelConfig
from jaxllm.engine_config import EngineConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import SamplingParams
from jaxllm.scheduler import Chunk, Sequence, StepPlan
from sharding import DEFAULT_RULES, make_mesh

PROMPT_LEN = 64
# Small pages and attention blocks, so that a 64-token sequence spans 16 pages read in 8
# blocks of the attention loop, and the sliding window (16) masks whole blocks.
ENGINE = EngineConfig(
    max_seq_len=72, max_num_seqs=2, max_step_tokens=32, chunk=16, page_size=4, attention_block=8
)
NUM_PAGES = 48
# Every step is padded to 2 decode rows and 2 prefill rows: one compile per variant, and most
# steps carry padding rows that must not disturb the real ones.
SHAPE = (2, 2)
PREFIX = 12  # sequence "c" starts with "a"'s first 12 tokens, read from "a"'s pages
# name: (step it starts at, prompt chunks as boundaries; every later token is decoded).
# Chunks deliberately start and end off page boundaries and vary in length.
SCRIPT = {
    "a": (0, [0, 13, 29, 40]),
    "b": (1, [0, 16, 32, 45, 61]),
    "c": (4, [PREFIX, 28, 44]),
}
# What step.build reads of a sequence's payload (the engine's request): params and seed.
GREEDY = types.SimpleNamespace(
    output=types.SimpleNamespace(params=SamplingParams(temperature=0.0)), seed=0
)


def load_runner(path, scan_layers: bool | None = None) -> ModelRunner:
    """On one device: sharded layouts are checked against this in test_sharding_parity."""
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    config = ModelConfig.from_hf_dir(path)
    spec = ModelSpec(config, jnp.float32, mesh, DEFAULT_RULES, scan_layers=scan_layers)
    return ModelRunner(spec, *load_hf_state(path, spec))


# Every variant with its layers unrolled (the CPU default); scanned over stacked weights (the
# TPU/GPU default), the variants whose layer code differs: embeddings tied or not, biases, a
# window shared by every layer, windows that differ by layer.
SCANNED = (
    "llama3_gqa",
    "llama_tied",
    "qwen2_bias",
    "mistral_sliding",
    "qwen2_window_layers",
    "gemma3",
    "mixtral",
)


@pytest.fixture(
    scope="module",
    params=[(v, False) for v in sorted(hf_models.VARIANTS)] + [(v, True) for v in SCANNED],
    ids=lambda p: f"{p[0]}-{'scanned' if p[1] else 'unrolled'}",
)
def variant(request, tmp_path_factory):
    """A one-device runner, three prompts (the third shares the first's first PREFIX
    tokens) and transformers' logits for them."""
    name, scan = request.param
    path = tmp_path_factory.mktemp(name)
    model = hf_models.write(name, path)
    ids = np.random.default_rng(1).integers(0, 320, size=(3, PROMPT_LEN))
    ids[2, :PREFIX] = ids[0, :PREFIX]
    runner = load_runner(path, scan)
    assert runner.spec.scan_layers == scan
    return runner, ids, hf_models.torch_logits(model, ids).numpy()


def test_full_forward_matches_transformers(variant):
    runner, ids, expected = variant
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LEN), ids.shape)
    logits = runner.forward(runner.params, jnp.asarray(ids), positions)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero logits


def paged_logits(runner: ModelRunner, ids: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """Runs ``SCRIPT`` through the engine's step function (model part: logits, not samples)
    on a fresh pool; returns the logits each row produced, by (sequence, position)."""
    names = list(SCRIPT)
    perm = np.random.default_rng(2).permutation(NUM_PAGES).tolist()
    per_seq = PROMPT_LEN // ENGINE.page_size
    pages = {"a": perm[:per_seq], "b": perm[per_seq : 2 * per_seq]}
    # "c" reads "a"'s first pages, as a prefix-cache hit would, then writes its own.
    shared = PREFIX // ENGINE.page_size
    pages["c"] = pages["a"][:shared] + perm[2 * per_seq : 3 * per_seq - shared]
    seqs = {
        name: Sequence(
            id=name,
            tokens=ids[i].tolist(),  # all known: each row computes the given token
            num_prompt=PROMPT_LEN,
            max_tokens=1,
            payload=GREEDY,
            computed=SCRIPT[name][1][0],
            pages=pages[name],
        )
        for i, name in enumerate(names)
    }
    chunks = {name: list(zip(b[:-1], b[1:], strict=True)) for name, (_, b) in SCRIPT.items()}

    pool = runner.new_pool(NUM_PAGES, ENGINE.page_size)
    fn = step.StepFunction(runner, ENGINE, pool)
    got = {}
    t = 0
    while any(seq.computed < PROMPT_LEN for seq in seqs.values()):
        plan = StepPlan()
        for name in names:
            seq, (first, _) = seqs[name], SCRIPT[name]
            if t < first or seq.computed == PROMPT_LEN:
                continue
            if chunks[name] and len(plan.prefills) < SHAPE[1]:
                start, end = chunks[name].pop(0)
                assert start == seq.computed
                plan.prefills.append(Chunk(seq, start, end - start, end == PROMPT_LEN))
            elif not chunks[name] and len(plan.decodes) < SHAPE[0]:
                plan.decodes.append(seq)
        inp = step.build(plan, ENGINE, NUM_PAGES, SHAPE)
        logits, pool, _ = fn._model(
            runner.params, pool, inp._replace(sampling=None, sample_step=None)
        )
        logits = np.asarray(logits)
        rows = [(i, s, s.computed, 1) for i, s in enumerate(plan.decodes)]
        rows += [(SHAPE[0] + i, c.seq, c.start, c.length) for i, c in enumerate(plan.prefills)]
        for row, seq, start, length in rows:
            got[seq.id, start + length - 1] = logits[row]
            seq.computed = start + length
        t += 1
    return got


def test_paged_steps_match_transformers(variant):
    """Three sequences through one pool, in steps that mix decode rows and prompt chunks of
    different sequences: each row's logits equal transformers' at that position."""
    runner, ids, expected = variant
    got = paged_logits(runner, ids)
    rows = {name: i for i, name in enumerate(SCRIPT)}
    # Every decoded position and every chunk's last position was computed once.
    decoded = {(n, p) for n, (_, b) in SCRIPT.items() for p in range(b[-1], PROMPT_LEN)}
    ends = {(n, e - 1) for n, (_, b) in SCRIPT.items() for e in b[1:]}
    assert set(got) == decoded | ends
    keys = sorted(got)
    actual = np.stack([got[k] for k in keys])
    reference = np.stack([expected[rows[name], pos] for name, pos in keys])
    assert np.abs(actual - reference).max() <= 1e-4
