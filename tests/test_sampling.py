"""Tests for jaxllm.sampling against a float64, sort-based reference written the way Hugging Face
applies its logits warpers (temperature, top-k, top-p, min-p).

V = 300 is above the sampler's candidate count, so the batches below exercise all three ways a
row can be drawn: from the top candidates, from the whole vocabulary with thresholds known, and
from the whole vocabulary after an exact radix select.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sampling
from jaxllm.sampling import SamplingArrays, SamplingParams, sample

V = 300
B = 8
N_DRAWS = 20_000
P = SamplingParams


@functools.cache
def _compiled_draws():
    """The sampler drawing N_DRAWS times per row, compiled once for the whole file."""

    def many(logits, params, steps):
        return jax.lax.map(lambda st: sample(logits, params, st), steps, batch_size=2000)

    args = (
        jax.ShapeDtypeStruct((B, V), jnp.float32),
        SamplingArrays.neutral(B),
        jax.ShapeDtypeStruct((N_DRAWS, B), jnp.int32),
    )
    return jax.jit(many).lower(*args).compile()


def draws(logits, params, seeds=None):
    """Tokens [N_DRAWS, B]: row b drawn N_DRAWS times from logits[b] (steps 0, 1, ...)."""
    assert len(params) == B
    seeds = range(B) if seeds is None else [int(s) for s in seeds]
    arrays = SamplingArrays.from_params(params, seeds)
    steps = jnp.broadcast_to(jnp.arange(N_DRAWS, dtype=jnp.int32)[:, None], (N_DRAWS, B))
    return np.asarray(_compiled_draws()(jnp.asarray(logits, jnp.float32), arrays, steps))


def test_compiled_sampler_keeps_fast_top_k():
    # XLA turns lax.top_k into a sort plus a slice and matches that back to its top-k kernel
    # only in some shapes of graph; a full sort of V is ~50x slower on CPU.
    assert " sort(" not in _compiled_draws().as_text()


def _random_logits(seed, batch, vocab=V, scale=1.5):
    return np.array(jax.random.normal(jax.random.key(seed), (batch, vocab)) * scale)


def reference_probs(logits, p: SamplingParams) -> np.ndarray:
    """The distribution one row should be drawn from, in float64 with a full sort."""
    s = np.asarray(logits, np.float64) / p.temperature
    if 0 < p.top_k < s.size:
        s = np.where(s < np.sort(s)[::-1][p.top_k - 1], -np.inf, s)
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        exclusive = np.cumsum(probs[order]) - probs[order]
        probs[order[exclusive >= p.top_p]] = 0.0
    probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def assert_drawn_from(tokens, probs):
    """No draw outside the support, and a chi-square test of the frequencies (bins expecting
    fewer than 5 draws pooled) at a bound a wrong distribution of this size would exceed."""
    n = tokens.size
    counts = np.bincount(tokens, minlength=probs.size)
    outside = np.flatnonzero((counts > 0) & (probs == 0))
    assert outside.size == 0, f"drew tokens outside the support: {outside}"
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if expected[~big].sum() >= 5:
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    dof = max(obs.size - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, f"chi2 {chi2:.1f} with {dof} dof"


# One batch with every kind of row; the comments say how each row is drawn.
MIXED = [
    P(temperature=1.0),  # whole vocabulary, no filter
    P(temperature=0.7, top_k=10),  # candidates
    P(temperature=1.0, top_p=0.9),  # nucleus wider than the candidates: radix select
    P(temperature=0.8, top_k=100, top_p=0.8),  # top-k past the candidates: radix select
    P(temperature=1.5, min_p=0.2),  # candidates
    P(temperature=1.2, top_k=20, top_p=0.6),  # candidates
    P(temperature=0.5, top_k=150),  # radix select for the k-th value only
    P(temperature=0.0),  # greedy
]


@pytest.fixture(scope="module")
def mixed():
    logits = _random_logits(0, B)
    return logits, draws(logits, MIXED)


def test_mixed_batch_matches_reference_distributions(mixed):
    logits, tokens = mixed
    for b, p in enumerate(MIXED):
        if p.temperature == 0:
            assert (tokens[:, b] == np.argmax(logits[b])).all()
        else:
            assert_drawn_from(tokens[:, b], reference_probs(logits[b], p))


def test_top_k_never_leaves_the_k_largest(mixed):
    logits, tokens = mixed
    for b, p in enumerate(MIXED):
        if p.top_k:
            allowed = np.argsort(-logits[b])[: p.top_k]
            assert np.isin(tokens[:, b], allowed).all()


def _top_p_keeping(n_keep, probs):
    """A top_p whose nucleus is the n_keep most likely tokens, halfway between two cumulative
    masses so that no rounding can move the cut."""
    cum = np.cumsum(np.sort(probs)[::-1])
    return float((cum[n_keep - 2] + cum[n_keep - 1]) / 2)


def test_top_p_and_min_p_keep_exactly_their_sets():
    """Known probabilities p_i proportional to 0.99**i; the kept sets sit inside and beyond
    the candidates, and each cut is far from any rounding boundary."""
    ratio = 0.99 ** np.arange(V)
    logits, probs = np.log(ratio), ratio / ratio.sum()
    n_top_p = [5, 40, 120, 250]
    params = [P(top_p=_top_p_keeping(n, probs)) for n in n_top_p]
    params += [P(min_p=0.3), P(min_p=0.08)]  # ratios 0.3024 | 0.2994 and 0.0802 | 0.0794
    params += [P(top_k=30, top_p=_top_p_keeping(20, probs[:30] / probs[:30].sum())), P()]
    n_keep = [*n_top_p, 120, 252, 20, V]
    tokens = draws(np.tile(logits, (B, 1)), params)
    for b, n in enumerate(n_keep):
        assert tokens[:, b].max() == n - 1  # tokens 0 .. n-1 are kept, the last one is reached
        expected = np.where(np.arange(V) < n, probs, 0.0)
        assert_drawn_from(tokens[:, b], expected / expected.sum())
        assert_drawn_from(tokens[:, b], reference_probs(logits, params[b]))


def test_candidate_only_batch_matches_reference():
    """Every kept set fits in the candidates (top_k = C exactly included), so the batch is
    drawn without any pass over the whole vocabulary after top-k."""
    params = [P(temperature=0.9, top_k=30), P(temperature=1.5, top_p=0.8)]
    params += [P(temperature=2.0, top_k=sampling._NUM_CANDIDATES), P(temperature=0.0)]
    params += [P(min_p=0.05)] + [P(top_k=5)] * 3
    logits = _random_logits(1, B, scale=3.0)
    tokens = draws(logits, params)
    for b, p in enumerate(params):
        if p.temperature == 0:
            assert (tokens[:, b] == np.argmax(logits[b])).all()
        else:
            assert_drawn_from(tokens[:, b], reference_probs(logits[b], p))


def test_greedy_is_argmax_with_ties_to_lowest_index():
    logits = _random_logits(2, B)
    logits[1, [7, 3, 250]] = 50.0
    logits[2, [9, 40]] = 50.0
    assert (draws(logits, [P(temperature=0.0)] * B) == np.argmax(logits, axis=-1)).all()
    # The same greedy rows in a batch that also samples.
    params = [P(temperature=0.0)] * 4 + [P(), P(top_p=0.9), P(top_k=200), P(min_p=0.1)]
    tokens = draws(logits, params)
    assert (tokens[:, :4] == np.argmax(logits[:4], axis=-1)).all()
    assert (tokens[:, 1] == 3).all() and (tokens[:, 2] == 9).all()


@pytest.mark.parametrize("vocab", [31, 32, 1000, 50257])
def test_two_level_argmax_is_numpy_argmax(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[1, [vocab - 1, vocab // 2]] = 9.0  # a tie: the lower index wins
    logits[2, :] = -np.inf
    logits[2, vocab - 1] = 0.0  # the only finite logit, in the padded last block
    logits[3, : vocab // 2] = -np.inf
    got = np.asarray(jax.jit(sampling._argmax)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


def test_top_k_1_is_greedy():
    logits = _random_logits(3, B)
    params = [P(temperature=t, top_k=1) for t in (0.1, 0.5, 1.0, 1.5, 2.0, 5.0, 50.0, 100.0)]
    assert (draws(logits, params) == np.argmax(logits, axis=-1)).all()


def test_row_token_depends_only_on_its_own_row(mixed):
    """Permuting the batch permutes the tokens, and a row's tokens stay the same when the
    other rows change, including when that switches the batch between the candidate-only,
    whole-vocabulary and radix-select paths."""
    logits, tokens = mixed
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    permuted = draws(logits[perm], [MIXED[i] for i in perm], seeds=perm)
    np.testing.assert_array_equal(permuted, tokens[:, perm])

    others = _random_logits(4, B)
    # Candidate rows 1 and 5 beside greedy rows only: the batch never leaves the candidates.
    # Row 0 (whole vocabulary, no filter) beside candidate rows: no radix select runs.
    for moved, filler in [({6: 1, 2: 5}, P(temperature=0.0)), ({3: 0}, P(top_k=3))]:
        rows, params, seeds = others.copy(), [filler] * B, list(range(100, 100 + B))
        for at, row in moved.items():
            rows[at], params[at], seeds[at] = logits[row], MIXED[row], row
        alone = draws(rows, params, seeds)
        for at, row in moved.items():
            np.testing.assert_array_equal(alone[:, at], tokens[:, row])


def test_same_seed_and_step_reproduce_and_different_seeds_differ():
    logits = np.zeros((B, V), np.float32)  # uniform: two streams agree 1 time in V
    seeds = [7, 7, 8, 2**40 + 7, 2**63 - 1, 0, 1, 2]
    a = draws(logits, [P()] * B, seeds)
    np.testing.assert_array_equal(a, draws(logits, [P()] * B, seeds))
    np.testing.assert_array_equal(a[:, 0], a[:, 1])
    for b in range(2, B):
        assert np.mean(a[:, 0] == a[:, b]) < 0.01  # 2**40 + 7: the high word counts
    assert np.mean(a[1:, 0] == a[:-1, 0]) < 0.01  # each step is a fresh draw


def test_disabled_filters_are_no_ops():
    off = [P(top_k=V), P(top_k=V + 10), P(top_p=1.0, min_p=0.0), P(top_k=0)] * 2
    off[4:] = [dataclasses.replace(p, temperature=0.6, top_p=0.5) for p in off[4:]]
    tokens = draws(np.tile(_random_logits(5, 1), (B, 1)), off, seeds=[9] * B)
    for b in (1, 2, 3):
        np.testing.assert_array_equal(tokens[:, b], tokens[:, 0])
        np.testing.assert_array_equal(tokens[:, 4 + b], tokens[:, 4])


def test_masked_vocabulary_is_never_drawn():
    logits = _random_logits(6, B)
    logits[:, 10:] = -np.inf  # fewer finite logits than candidates
    params = [P(temperature=2.0), P(top_p=0.99), P(min_p=0.0), P(top_k=100)] * 2
    assert draws(logits, params).max() < 10


def test_arrays_layout():
    neutral = SamplingArrays.neutral(3)
    built = SamplingArrays.from_params([P(temperature=0.5, top_k=4, min_p=0.1)] * 3, [1, 2, 3])
    same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), neutral, built)
    assert jax.tree.structure(neutral) == jax.tree.structure(built) and all(jax.tree.leaves(same))
    assert (neutral.temperature == 0).all() and (neutral.top_p == 1).all()
    words = SamplingArrays.from_params([P(), P()], [2**40 + 5, 123]).seed
    np.testing.assert_array_equal(words, [[256, 5], [0, 123]])
    # Below 2**32 the words are jax's own threefry key data for that seed.
    np.testing.assert_array_equal(words[1], jax.random.key_data(jax.random.key(123)))
    with pytest.raises(ValueError, match="seeds"):
        SamplingArrays.from_params([P()], [1, 2])


def test_params_accepts_lists_and_stays_hashable():
    p = P(stop=["\n\n", "END"], stop_token_ids=[2, 3])
    assert p.stop == ("\n\n", "END") and p.stop_token_ids == (2, 3)
    assert hash(p) == hash(P(stop=("\n\n", "END"), stop_token_ids=(2, 3)))
    assert P(stop="END").stop == ("END",)  # one string is one stop string, not its letters


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", 101.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", -1),
        ("seed", 2**63),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        P(**{field: value})


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        P(stop=["ok", ""])


def test_candidate_count_is_below_test_vocab():
    # The tests above only reach the whole-vocabulary paths if V exceeds the candidate count.
    assert sampling._NUM_CANDIDATES < V / 2


def test_params_accept_ints_for_floats():
    assert P(temperature=0, top_p=1, min_p=0).temperature == 0  # the usual way to ask for greedy


def test_logprobs_are_of_the_distribution_drawn_from_and_the_tokens_unchanged():
    """Every kind of row in MIXED: the token's logprob and the top 20 are those of the
    reference distribution (greedy rows: the unmodified one); the tokens are `sample`'s."""
    logits = jnp.asarray(_random_logits(3, B))
    params = [dataclasses.replace(p, logprobs=20) for p in MIXED]
    arrays = SamplingArrays.from_params(params, range(B))
    steps = jnp.arange(B, dtype=jnp.int32)
    fn = jax.jit(sampling.sample_with_logprobs)
    assert " sort(" not in fn.lower(logits, arrays, steps).compile().as_text()
    out = fn(logits, arrays, steps)
    np.testing.assert_array_equal(out.tokens, sample(logits, arrays, steps))
    for b, p in enumerate(params):
        greedy = p.temperature == 0
        row = np.asarray(logits[b])
        probs = reference_probs(row, dataclasses.replace(p, temperature=1.0) if greedy else p)
        with np.errstate(divide="ignore"):
            ref = np.log(probs)
        token = int(out.tokens[b])
        assert float(out.logprob[b]) == pytest.approx(ref[token], abs=1e-5)
        top_ids = np.asarray(out.top_ids[b])
        np.testing.assert_array_equal(top_ids, np.argsort(-row, kind="stable")[:20])
        np.testing.assert_allclose(np.asarray(out.top_logprobs[b]), ref[top_ids], atol=1e-5)


def test_logprobs_are_skipped_when_no_row_asks():
    logits = jnp.asarray(_random_logits(4, B))
    arrays = SamplingArrays.from_params(MIXED, range(B))
    out = jax.jit(sampling.sample_with_logprobs)(logits, arrays, jnp.zeros(B, jnp.int32))
    assert not np.asarray(out.top_logprobs).any() and not np.asarray(out.logprob).any()
