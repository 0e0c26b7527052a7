"""Tests for jaxllm.sampling against a float64, sort-based reference written the way Hugging Face
applies its logits warpers (temperature, top-k, top-p, min-p).

V = 300 is above the sampler's candidate count, so the batches below exercise all three ways a
row can be drawn: from the top candidates, from the whole vocabulary with thresholds known, and
from the whole vocabulary after an exact radix select.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sampling
from jaxllm.sampling import SamplingArrays, SamplingParams, sample

V = 300
N_DRAWS = 20_000
P = SamplingParams

_sample = jax.jit(sample)


@jax.jit
def _draws(logits, params, steps):
    """Tokens [N, B] for steps [N, B]: the same logits drawn N times, in chunks to bound memory."""
    return jax.lax.map(lambda st: sample(logits, params, st), steps, batch_size=2000)


def _arrays(params, seeds=None):
    return SamplingArrays.from_params(params, range(len(params)) if seeds is None else seeds)


def _steps(n, batch):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, batch))


def _random_logits(seed, batch, vocab=V, scale=1.5):
    return np.array(jax.random.normal(jax.random.key(seed), (batch, vocab)) * scale)


def _geometric_logits(ratio=0.97, vocab=V):
    """Logits of known probabilities p_i proportional to ratio**i, strictly decreasing."""
    return np.log(ratio ** np.arange(vocab))


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
    P(temperature=1.5, min_p=0.2),
    P(temperature=1.2, top_k=20, top_p=0.6),  # candidates
    P(temperature=0.5, top_k=150),  # radix select for the k-th value only
    P(temperature=0.0),  # greedy
]


@pytest.fixture(scope="module")
def mixed_draws():
    logits = _random_logits(0, len(MIXED))
    tokens = np.asarray(_draws(logits, _arrays(MIXED), _steps(N_DRAWS, len(MIXED))))
    return logits, tokens


def test_mixed_batch_matches_reference_distributions(mixed_draws):
    logits, tokens = mixed_draws
    for b, p in enumerate(MIXED):
        if p.temperature == 0:
            assert (tokens[:, b] == np.argmax(logits[b])).all()
        else:
            assert_drawn_from(tokens[:, b], reference_probs(logits[b], p))


def test_top_k_never_leaves_the_k_largest(mixed_draws):
    logits, tokens = mixed_draws
    for b, p in enumerate(MIXED):
        if p.top_k:
            allowed = np.argsort(-logits[b])[: p.top_k]
            assert np.isin(tokens[:, b], allowed).all()


def _cut_between(mass_before, mass_after):
    """A top_p halfway between two cumulative masses, far from any rounding boundary."""
    return float((mass_before + mass_after) / 2)


@pytest.mark.parametrize("n_keep", [5, 40, 120])  # inside and beyond the candidates
def test_top_p_keeps_exactly_the_nucleus(n_keep):
    logits = _geometric_logits()
    probs = np.exp(logits) / np.exp(logits).sum()
    cum = np.cumsum(probs)
    p = P(top_p=_cut_between(cum[n_keep - 2], cum[n_keep - 1]))
    tokens = np.asarray(_draws(logits[None], _arrays([p]), _steps(N_DRAWS, 1)))[:, 0]
    assert tokens.max() == n_keep - 1  # the nucleus is tokens 0 .. n_keep-1, all reached
    expected = np.where(np.arange(V) < n_keep, probs, 0.0)
    assert_drawn_from(tokens, expected / expected.sum())
    assert_drawn_from(tokens, reference_probs(logits, p))


@pytest.mark.parametrize("min_p", [0.3, 0.01])  # 40 and 152 tokens kept
def test_min_p_drops_tokens_below_the_ratio(min_p):
    logits = _geometric_logits()
    tokens = np.asarray(_draws(logits[None], _arrays([P(min_p=min_p)]), _steps(N_DRAWS, 1)))
    n_keep = int(np.sum(0.97 ** np.arange(V) >= min_p))
    assert tokens.max() < n_keep
    assert_drawn_from(tokens[:, 0], reference_probs(logits, P(min_p=min_p)))


def test_candidate_only_batch_matches_reference():
    params = [P(temperature=0.9, top_k=30), P(top_p=0.5), P(temperature=2.0, top_k=64)]
    logits = _random_logits(1, len(params), scale=3.0)
    tokens = np.asarray(_draws(logits, _arrays(params), _steps(N_DRAWS, len(params))))
    for b, p in enumerate(params):
        assert_drawn_from(tokens[:, b], reference_probs(logits[b], p))


def test_greedy_is_argmax_with_ties_to_lowest_index():
    logits = _random_logits(2, 4)
    logits[1, [7, 3, 250]] = 50.0
    tokens = _sample(logits, SamplingArrays.neutral(4), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert int(tokens[1]) == 3
    # The same greedy rows in a batch that also samples.
    mixed = _arrays([P(temperature=0.0), P(temperature=0.0), P(), P(temperature=0.0)])
    tokens = _sample(logits, mixed, jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(tokens[[0, 1, 3]], np.argmax(logits, axis=-1)[[0, 1, 3]])


def test_top_k_1_is_greedy():
    logits = _random_logits(3, 8)
    params = _arrays([P(temperature=1.3, top_k=1)] * 8)
    tokens = np.asarray(_draws(logits, params, _steps(200, 8)))
    assert (tokens == np.argmax(logits, axis=-1)).all()


def test_row_token_depends_only_on_its_own_row(mixed_draws):
    """Permuting the batch permutes the tokens, and a row's tokens stay the same when every
    other row changes, including when that switches the batch between candidate-only,
    whole-vocabulary and radix-select paths."""
    logits, tokens = mixed_draws
    n = 200
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    seeds = np.arange(len(MIXED))
    permuted = _draws(
        logits[perm], _arrays([MIXED[i] for i in perm], seeds[perm]), _steps(n, len(MIXED))
    )
    np.testing.assert_array_equal(np.asarray(permuted), tokens[:n, perm])

    others = _random_logits(4, len(MIXED))
    for row in range(len(MIXED) - 1):
        for filler in (P(temperature=0.0), P(temperature=0.3, top_k=3), P(top_p=0.95)):
            batch = [filler] * 3
            batch[1] = MIXED[row]
            rows = others[:3].copy()
            rows[1] = logits[row]
            seeds = [11, row, 12]
            alone = _draws(rows, _arrays(batch, seeds), _steps(n, 3))
            np.testing.assert_array_equal(np.asarray(alone)[:, 1], tokens[:n, row])


def test_same_seed_and_step_reproduce_and_different_seeds_differ():
    logits = np.zeros((4, V), np.float32)  # uniform: two streams agree 1 time in V
    steps = _steps(500, 4)
    a = np.asarray(_draws(logits, _arrays([P()] * 4, [7, 7, 8, 2**40 + 7]), steps))
    b = np.asarray(_draws(logits, _arrays([P()] * 4, [7, 7, 8, 2**40 + 7]), steps))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 0], a[:, 1])
    assert np.mean(a[:, 0] == a[:, 2]) < 0.03
    assert np.mean(a[:, 0] == a[:, 3]) < 0.03  # the high word of the seed counts
    assert len(np.unique(a[:, 0])) > 200  # steps give fresh draws


def test_disabled_filters_are_no_ops():
    logits = _random_logits(5, 1)
    off = [P(top_k=V), P(top_k=V + 10), P(top_p=1.0, min_p=0.0), P(top_k=0)]
    rows = np.repeat(logits, len(off), axis=0)
    steps = _steps(300, len(off))
    tokens = np.asarray(_draws(rows, _arrays(off, [9] * len(off)), steps))
    for b in range(1, len(off)):
        np.testing.assert_array_equal(tokens[:, b], tokens[:, 0])


def test_masked_vocabulary_is_never_drawn():
    logits = _random_logits(6, 2)
    logits[:, 10:] = -np.inf  # fewer finite logits than candidates
    params = _arrays([P(temperature=2.0), P(top_p=0.99)])
    tokens = np.asarray(_draws(logits, params, _steps(2000, 2)))
    assert tokens.max() < 10


def test_arrays_layout():
    neutral = SamplingArrays.neutral(3)
    built = _arrays([P(temperature=0.5, top_k=4, top_p=0.9, min_p=0.1, seed=1)] * 3)
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
