"""Next-token sampling on device, with its own parameters for every row (slot) of the batch.

Dimensions: `B` batch/slots, `V` vocab, `C` candidates (the `_NUM_CANDIDATES` largest logits).

Filters follow Hugging Face / vLLM, in their order: temperature, top-k, top-p (computed on the
top-k survivors, renormalised), min-p. Every filter is a threshold on the scaled logits, so the
kept set of a row is `{v : logits[v] / T >= thr}`; ties at a threshold are all kept (as in HF's
top-k). A disabled filter has threshold -inf, so it is an exact no-op.

A full sort of the vocabulary is what the textbook recipe uses, but on CPU XLA sorts slowly
(B=8, V=32000: 65 ms for the sort against 0.7 ms for `lax.top_k(x, 64)`). So thresholds come
from the C largest logits, and only rows whose kept set does not fit there fall back to an
exact radix select over V (32 masked passes) and an inverse-CDF draw over V. Which path a row
takes depends on that row alone, so a request's tokens never depend on what else is batched.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, UInt32

_NUM_CANDIDATES = 64
# Block width of the two-level inverse CDF over V: a flat cumsum over V costs about 4x more.
_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options, as a user gives them. `temperature == 0` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # Lists are accepted for convenience; tuples keep the dataclass hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be finite and in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters as arrays, the form `sample` takes inside jit.

    `seed` holds the two 32-bit words (high, low) of each row's 64-bit seed, which is the raw
    key data of a threefry2x32 key (`jax.random.key(seed)` gives the same words for seeds below
    2**32; above that jax drops the high word unless x64 is on, and this keeps it).
    """

    temperature: Float[Array, " B"]  # 0 = greedy
    top_k: Int[Array, " B"]  # 0 = off
    top_p: Float[Array, " B"]  # 1 = off
    min_p: Float[Array, " B"]  # 0 = off
    seed: UInt32[Array, "B 2"]

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], seeds: Sequence[int]
    ) -> "SamplingArrays":
        """Host-side numpy arrays for a batch. `seeds[b]` is row b's resolved seed, in
        [0, 2**64): the request's own `seed`, or one the engine drew when it had none."""
        if len(params) != len(seeds):
            raise ValueError(f"{len(params)} params but {len(seeds)} seeds")
        if any(not 0 <= s < 2**64 for s in seeds):
            raise ValueError(f"seeds must be in [0, 2**64), got {list(seeds)}")
        words = [(s >> 32, s & 0xFFFFFFFF) for s in seeds]
        return cls(
            temperature=np.array([p.temperature for p in params], np.float32),
            top_k=np.array([min(p.top_k, 2**31 - 1) for p in params], np.int32),
            top_p=np.array([p.top_p for p in params], np.float32),
            min_p=np.array([p.min_p for p in params], np.float32),
            seed=np.array(words, np.uint32).reshape(len(params), 2),
        )

    @classmethod
    def neutral(cls, batch: int) -> "SamplingArrays":
        """Greedy rows with every filter off, for empty slots (same tree, shapes and dtypes)."""
        return cls.from_params([SamplingParams(temperature=0.0)] * batch, [0] * batch)


def _col(x: Array) -> Array:
    return x[:, None]


def _take(x: Array, i: Array) -> Array:
    """x[b, i[b]] for each row b."""
    return jnp.take_along_axis(x, _col(i), axis=-1)[:, 0]


def _sortable(x: Array) -> Array:
    """float32 -> uint32 whose unsigned order is the float order (for the radix select)."""
    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _unsortable(u: Array) -> Array:
    b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
    return lax.bitcast_convert_type(b, jnp.float32)


def _radix_select(s: Array, holds) -> Array:
    """Per row, the largest value t among s[b] such that `holds(s >= t)` (monotone: true for
    small t), found bit by bit in 32 masked passes over s [B, V]; returns t as float32 [B]."""
    keys = _sortable(s)

    def step(i, t):
        trial = t | lax.shift_left(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(holds(keys >= _col(trial)), trial, t)

    return _unsortable(lax.fori_loop(0, 32, step, jnp.zeros(s.shape[:1], jnp.uint32)))


def _pick(cdf: Array, target: Array, weight: Array) -> Array:
    """Index i with cdf[i-1] <= target < cdf[i] per row; rounding could push it past the last
    entry of nonzero weight, so it is clamped there. cdf, weight [B, n]; target [B]."""
    i = jnp.sum(cdf <= _col(target), axis=-1)
    last = jnp.max(jnp.where(weight > 0, lax.broadcasted_iota(jnp.int32, cdf.shape, 1), 0), axis=-1)
    return jnp.minimum(i, last)


def _draw_full(s: Array, m: Array, thr: Array, u: Array) -> Array:
    """Inverse-CDF draw over the whole vocabulary in token order: pick a block of `_BLOCK`
    tokens from the block masses, then a token inside it. s [B, V], m/thr/u [B]."""
    batch, vocab = s.shape
    n = -(-vocab // _BLOCK)
    w = jnp.where(s >= _col(thr), jnp.exp(s - _col(m)), 0.0)
    w = jnp.pad(w, ((0, 0), (0, n * _BLOCK - vocab))).reshape(batch, n, _BLOCK)
    mass = jnp.sum(w, axis=-1)  # [B, n]
    cdf = jnp.cumsum(mass, axis=-1)
    target = u * cdf[:, -1]
    blk = _pick(cdf, target, mass)
    before = jnp.where(blk > 0, _take(cdf, jnp.maximum(blk - 1, 0)), 0.0)
    inner = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
    j = _pick(_col(before) + jnp.cumsum(inner, axis=-1), target, inner)
    return blk * _BLOCK + j


def _when(pred: Array, fn, otherwise: Array) -> Array:
    """fn() if pred else `otherwise`: skips a pass over V that no row of this batch needs.
    Callers only read fn's rows where pred's own row condition holds, so no row's result
    depends on which branch ran."""
    return lax.cond(pred, fn, lambda: otherwise)


def _mass(s: Array, m: Array, thr: Array) -> Array:
    """Unnormalised weights exp(s - max) of the tokens at or above thr. s [..., n], m/thr [B]."""
    return jnp.where(s >= _col(thr), jnp.exp(s - _col(m)), 0.0)


def sample(
    logits: Float[Array, "B V"], params: SamplingArrays, step: Int[Array, " B"]
) -> Int[Array, " B"]:
    """Draw one token per row. Pure and jittable.

    Row b draws with `fold_in(key(params.seed[b]), step[b])`, where step[b] is the index (or
    absolute position) of the token being generated for that request, so its token depends
    only on its own logits, parameters, seed and step. Greedy rows (temperature 0) take the
    argmax, ties to the lowest index. Assumes every row has at least one finite logit.

    Returns int32 token ids [B].
    """
    logits = logits.astype(jnp.float32)
    greedy = params.temperature <= 0
    return lax.cond(
        jnp.all(greedy),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        lambda: _sample_rows(logits, params, step, greedy),
    )


def _sample_rows(logits: Array, params: SamplingArrays, step: Array, greedy: Array) -> Array:
    """Tokens [B] for a batch with at least one sampled row."""
    vocab = logits.shape[-1]
    c = min(_NUM_CANDIDATES, vocab)
    temp = _col(jnp.where(greedy, 1.0, params.temperature))
    top, top_idx = lax.top_k(logits, c)
    # Dividing by T > 0 keeps the order, so these are the C largest scaled logits, descending.
    cand = top / temp  # [B, C]
    m = cand[:, 0]
    s = logits / temp  # [B, V]; XLA fuses this into each pass that reads it.
    floor = cand[:, -1]

    k, top_p = params.top_k, params.top_p
    k_on = (k > 0) & (k < vocab)
    p_on = top_p < 1
    thr_k = jnp.where(k_on & (k <= c), _take(cand, jnp.clip(k - 1, 0, c - 1)), -jnp.inf)
    # Top-p is measured against the mass that survives top-k: a sum over the candidates when
    # top-k keeps only candidates, else over all of V.
    k_inside = k_on & (k <= c) & (thr_k > floor)
    w = _mass(cand, m, thr_k)
    full_total = _when(
        jnp.any(~greedy & p_on & ~k_inside),
        lambda: jnp.sum(_mass(s, m, thr_k), axis=-1),
        jnp.zeros_like(m),
    )
    total = jnp.where(k_inside, jnp.sum(w, axis=-1), full_total)
    cdf = jnp.cumsum(w, axis=-1)  # [B, C]
    n_below = jnp.sum(cdf < _col(top_p * total), axis=-1)
    thr_p = jnp.where(p_on & (n_below < c), _take(cand, jnp.minimum(n_below, c - 1)), -jnp.inf)
    # p < min_p * p_max  <=>  s < max(s) + log(min_p); log(0) = -inf switches it off.
    thr_min = m + jnp.log(params.min_p)
    thr = jnp.maximum(jnp.maximum(thr_k, thr_p), thr_min)

    # The kept set lies inside the candidates when the threshold is above the smallest one,
    # or when everything outside them is -inf (masked tokens) and so weighs nothing.
    within = (thr > floor) | (floor == -jnp.inf) | (c == vocab)
    # thr is exact unless top-k reaches past C, or the nucleus does and nothing else cuts
    # inside the candidates (an unresolved top-p threshold is then <= floor).
    known = (~k_on | (k <= c)) & (~p_on | (n_below < c) | within)
    from_cand = greedy | (known & within)

    def row_key(words, i):
        return jax.random.fold_in(jax.random.wrap_key_data(words, impl="threefry2x32"), i)

    u = jax.vmap(lambda w, i: jax.random.uniform(row_key(w, i), (), jnp.float32))(params.seed, step)
    # The kept candidates are a prefix of the sorted ones, and there the top-k cdf is theirs.
    kept_mass = _take(cdf, jnp.sum(cand >= _col(thr), axis=-1) - 1)
    cand_tokens = _take(top_idx, _pick(cdf, u * kept_mass, _mass(cand, m, thr)))

    def full_vocab():
        lost = ~greedy & ~known
        exact = _when(
            jnp.any(lost), lambda: _exact_thresholds(s, m, params, thr_k, thr_min, lost), thr
        )
        return jnp.where(from_cand, cand_tokens, _draw_full(s, m, jnp.where(known, thr, exact), u))

    sampled = lax.cond(jnp.all(from_cand), lambda: cand_tokens, full_vocab)
    argmax = _when(jnp.any(greedy), lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
    return jnp.where(greedy, argmax, sampled)


def _exact_thresholds(
    s: Array, m: Array, params: SamplingArrays, thr_k: Array, thr_min: Array, lost: Array
) -> Array:
    """Combined threshold [B] by radix select over all of V, for the rows marked `lost`.
    thr_k is already exact where top_k <= C. s [B, V]; m, thr_k, thr_min [B]."""
    vocab, c = s.shape[-1], min(_NUM_CANDIDATES, s.shape[-1])
    k, top_p = params.top_k, params.top_p
    k_far = (k > c) & (k < vocab)
    p_on = top_p < 1

    def kth():
        return _radix_select(s, lambda keep: jnp.sum(keep, axis=-1) >= k)

    thr_k = jnp.where(k_far, _when(jnp.any(lost & k_far), kth, thr_k), thr_k)
    w = _mass(s, m, thr_k)
    target = top_p * jnp.sum(w, axis=-1)

    def nucleus():
        return _radix_select(s, lambda keep: jnp.sum(jnp.where(keep, w, 0.0), axis=-1) >= target)

    thr_p = jnp.where(p_on, _when(jnp.any(lost & p_on), nucleus, thr_min), -jnp.inf)
    return jnp.maximum(jnp.maximum(thr_k, thr_p), thr_min)
