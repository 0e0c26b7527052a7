"""Next-token sampling on device, with its own parameters for every row (slot) of the batch.

Dimensions: `B` batch/slots, `V` vocab, `C` candidates (the `_NUM_CANDIDATES` largest logits),
`K` the most likely tokens reported with logprobs (`MAX_LOGPROBS`, or V if smaller).

Filters follow Hugging Face / vLLM, in their order: temperature, top-k, top-p (computed on the
top-k survivors, renormalised), min-p. Every filter is a threshold on the scaled logits, so the
kept set of a row is `{v : logits[v] / T >= thr}`; ties at a threshold are all kept (as in HF's
top-k). A disabled filter has threshold -inf, so it is an exact no-op.

A full sort of the vocabulary is what the textbook recipe uses, but on CPU XLA sorts slowly
(B=8, V=32000: 65 ms for the sort against 0.7 ms for `lax.top_k(x, 64)`). So thresholds come
from the C largest logits, and only rows whose kept set does not fit there fall back to an
exact radix select over V (32 masked passes) and an inverse-CDF draw over V. Which path a row
takes depends on that row alone, so a request's tokens never depend on what else is batched.

Logprobs (`sample_with_logprobs`) are those of the distribution a row was actually drawn from:
`log_softmax(logits / T)` renormalised over the kept set `{v : logits[v] / T >= thr}` (the
tokens the filters removed get -inf). Greedy rows report the unmodified `log_softmax(logits)`,
as vLLM does: the argmax "distribution" would give 0 to the chosen token and -inf to the rest.
They are computed in the same jitted call as the tokens, behind a `lax.cond` on whether any
row asked, so a step without logprob requests skips that work.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxllm.structured import StructuredOutput

_NUM_CANDIDATES = 64
_ARGMAX_BLOCK = 32
# Most alternatives a request may ask for per token (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
# Temperatures below this draw greedily, as in vLLM: the scaled logits would be all but one-hot.
_MIN_TEMPERATURE = 1e-5
# Fan-out of the tree of block sums that a draw over the whole vocabulary walks down.
_FANOUT = 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options, as a user gives them. `temperature == 0` is greedy."""

    # `float | int` spells out PEP 484's numeric tower, which runtime checkers (beartype) do
    # not assume: temperature=0 must be accepted.
    max_tokens: int = 16
    temperature: float | int = 1.0
    top_p: float | int = 1.0
    top_k: int = 0  # 0 = off
    min_p: float | int = 0.0
    seed: int | None = None
    # Any sequence, or one string (as in the OpenAI API); stored as a tuple to stay hashable.
    stop: str | Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # None = off; k = the sampled token's logprob plus the k most likely alternatives.
    logprobs: int | None = None
    # None = off; k = each prompt token's logprob given the tokens before it, plus top k.
    prompt_logprobs: int | None = None
    # None = free text; else what the output must match (a JSON Schema, a regex, a grammar).
    structured: StructuredOutput | None = None
    # Speculative decoding for this request: None = the engine's setting, False = off, True =
    # on (the engine must have a speculative method configured).
    speculative: bool | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
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
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {self.structured!r}")
        if self.speculative not in (None, True, False):
            raise ValueError(f"speculative must be None, True or False, got {self.speculative!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (
                not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS
            ):
                raise ValueError(
                    f"{name} must be None (off) or an integer in [0, {MAX_LOGPROBS}], got {k!r}"
                )


_Arr = Array | np.ndarray  # numpy on the host, jax arrays on the device


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters as arrays, the form `sample` takes inside jit.

    `seed` holds the two 32-bit words (high, low) of each row's 64-bit seed, which is the raw
    key data of a threefry2x32 key (`jax.random.key(seed)` gives the same words for seeds below
    2**32; above that jax drops the high word unless x64 is on, and this keeps it).
    """

    temperature: Float[_Arr, " B"]  # 0 = greedy
    top_k: Int[_Arr, " B"]  # 0 = off
    top_p: Float[_Arr, " B"]  # 1 = off
    min_p: Float[_Arr, " B"]  # 0 = off
    seed: UInt32[_Arr, "B 2"]
    logprobs: Bool[_Arr, " B"]  # the row's request asked for logprobs

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
            logprobs=np.array([p.logprobs is not None for p in params], np.bool_),
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


def _mass(s: Array, m: Array, thr: Array) -> Array:
    """Unnormalised weights exp(s - max) of the tokens at or above thr. s [..., n], m/thr [B]."""
    return jnp.where(s >= _col(thr), jnp.exp(s - _col(m)), 0.0)


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

    def step(_, carry):
        t, bit = carry  # bit: the one being decided, from the top down
        trial = t | bit
        return jnp.where(holds(keys >= _col(trial)), trial, t), bit >> 1

    init = (jnp.zeros(s.shape[:1], jnp.uint32), jnp.uint32(1 << 31))
    return _unsortable(lax.fori_loop(0, 32, step, init)[0])


def _pick(cdf: Array, target: Array, weight: Array) -> Array:
    """Index i with cdf[i-1] <= target < cdf[i] per row; rounding could push it past the last
    entry of nonzero weight, so it is clamped there. cdf, weight [B, n]; target [B]."""
    i = jnp.sum(cdf <= _col(target), axis=-1)
    last = jnp.max(jnp.where(weight > 0, lax.broadcasted_iota(jnp.int32, cdf.shape, 1), 0), axis=-1)
    return jnp.minimum(i, last)


def _cdf(w: Array) -> Array:
    """Inclusive prefix sums of w [B, n] along n, for small n, as one masked sum per entry
    rather than a scan: XLA compiles and batches it faster, and with one reduction order for
    every entry it is monotone, and flat exactly where the weight is zero."""
    n = w.shape[-1]
    upto = lax.broadcasted_iota(jnp.int32, (1, n, n), 2) <= lax.broadcasted_iota(
        jnp.int32, (1, n, n), 1
    )  # [1, j, i]: i <= j
    return jnp.sum(jnp.where(upto, w[:, None, :], 0.0), axis=-1)


def _draw_full(s: Array, m: Array, thr: Array, u: Array) -> Array:
    """Inverse-CDF draw over the whole vocabulary in token order, down a tree of block sums
    with fan-out `_FANOUT`, so that one draw reads a few blocks rather than all of V.
    s [B, V]; m, thr, u [B]."""
    levels = [_mass(s, m, thr)]  # finest first
    while levels[-1].shape[1] > _FANOUT:
        n = -(-levels[-1].shape[1] // _FANOUT)
        levels[-1] = jnp.pad(levels[-1], ((0, 0), (0, n * _FANOUT - levels[-1].shape[1])))
        levels.append(jnp.sum(levels[-1].reshape(-1, n, _FANOUT), axis=-1))
    target = u * jnp.sum(levels[-1], axis=-1)
    idx = jnp.zeros(s.shape[:1], jnp.int32)
    for w in reversed(levels):
        width = min(_FANOUT, w.shape[1])
        chunk = jnp.take_along_axis(w, _col(idx * width) + jnp.arange(width)[None], axis=-1)
        cdf = _cdf(chunk)  # [B, width]
        j = _pick(cdf, target, chunk)
        target = target - jnp.where(j > 0, _take(cdf, jnp.maximum(j - 1, 0)), 0.0)
        idx = idx * width + j
    return idx


def _argmax(logits: Float[Array, "B V"]) -> Int[Array, " B"]:
    """``jnp.argmax`` over V (ties to the lowest index), in two levels: the block of
    ``_ARGMAX_BLOCK`` logits holding the maximum, then the maximum within it. XLA:CPU runs one
    (value, index) reduction over all of V about 13x slower (6 ms against 0.45 ms for
    72 x 32,000 here); the maxima of the blocks are a plain, fast reduction."""
    B, vocab = logits.shape
    blocks = -(-vocab // _ARGMAX_BLOCK)
    padded = jnp.pad(
        logits, ((0, 0), (0, blocks * _ARGMAX_BLOCK - vocab)), constant_values=-jnp.inf
    )
    padded = padded.reshape(B, blocks, _ARGMAX_BLOCK)
    block = jnp.argmax(jnp.max(padded, axis=-1), axis=-1)  # [B]: the first block with the max
    within = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]  # [B, block]
    return (block * _ARGMAX_BLOCK + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def _when(pred: Array, fn, otherwise: Array) -> Array:
    """fn() if pred else `otherwise`, to skip a pass over V that no row needs. Callers read
    fn's value only in rows whose own condition makes pred true, so no row depends on this."""
    return lax.cond(pred, fn, lambda: otherwise)


class Sampled(NamedTuple):
    """One draw per row and, where a row asked, the logprobs of the distribution it was drawn
    from (zeros in a batch where no row asked)."""

    tokens: Int[Array, " B"]
    logprob: Float[Array, " B"]  # of the sampled token
    top_ids: Int[Array, "B K"]  # the K most likely tokens, most likely first
    top_logprobs: Float[Array, "B K"]  # their logprobs; -inf where the filters removed them


def sample(
    logits: Float[Array, "B V"], params: SamplingArrays, step: Int[Array, " B"]
) -> Int[Array, " B"]:
    """Draw one token per row. Pure and jittable.

    Row b draws with `fold_in(key(params.seed[b]), step[b])`, where step[b] is the index (or
    absolute position) of the token being generated for that request, so its token depends
    only on its own logits, parameters, seed and step. Greedy rows (temperature 0, or below
    1e-5) take the argmax, ties to the lowest index. Every row needs one finite logit.

    Returns int32 token ids [B].
    """
    return _draw(logits, params, step)[0]


def sample_with_logprobs(
    logits: Float[Array, "B V"], params: SamplingArrays, step: Int[Array, " B"]
) -> Sampled:
    """`sample`'s tokens (the same ones) and, when any row has `params.logprobs`, every row's
    logprobs in the distribution it was drawn from (see the module's docstring)."""
    logits = logits.astype(jnp.float32)
    tokens, temp, thr = _draw(logits, params, step)
    k = min(MAX_LOGPROBS, logits.shape[-1])

    def skip():
        return (
            jnp.zeros(tokens.shape, jnp.float32),
            jnp.zeros((*tokens.shape, k), jnp.int32),
            jnp.zeros((*tokens.shape, k), jnp.float32),
        )

    wanted = jnp.any(jnp.asarray(params.logprobs))
    return Sampled(tokens, *lax.cond(wanted, lambda: _logprobs(logits, tokens, temp, thr, k), skip))


def _logprobs(logits: Array, tokens: Array, temp: Array, thr: Array, k: int):
    """Logprobs of `tokens` [B] and of the k largest logits per row, in the distribution of
    `logits / temp` [B] restricted to `{s >= thr}` and renormalised."""
    s = logits / _col(temp)  # [B, V]
    m = jnp.max(s, axis=-1)
    log_z = m + jnp.log(jnp.sum(_mass(s, m, thr), axis=-1))
    token_lp = _take(s, tokens) - log_z
    top, top_ids = lax.top_k(logits, k)  # dividing by T > 0 keeps the order
    top = top / _col(temp)
    top_lp = jnp.where(top >= _col(thr), top - _col(log_z), -jnp.inf)
    return token_lp, top_ids.astype(jnp.int32), top_lp


def _draw(logits: Array, params: SamplingArrays, step: Array) -> tuple[Array, Array, Array]:
    """Tokens [B], and the temperature [B] and threshold [B] on the scaled logits that
    define each row's distribution (greedy rows: 1 and -inf, the unmodified one)."""
    logits = logits.astype(jnp.float32)
    params = SamplingArrays(*(jnp.asarray(x) for x in params))  # host arrays work eagerly too
    greedy = params.temperature < _MIN_TEMPERATURE

    def all_greedy():
        ones = jnp.ones(greedy.shape, jnp.float32)
        return _argmax(logits), ones, jnp.full_like(ones, -jnp.inf)

    return lax.cond(jnp.all(greedy), all_greedy, lambda: _sample_rows(logits, params, step, greedy))


def _sample_rows(
    logits: Array, params: SamplingArrays, step: Array, greedy: Array
) -> tuple[Array, Array, Array]:
    """Tokens, temperatures and thresholds [B] (as `_draw`) for a batch with at least one
    sampled row."""
    vocab = logits.shape[-1]
    c = min(_NUM_CANDIDATES, vocab)
    temp_row = jnp.where(greedy, 1.0, params.temperature)
    temp = _col(temp_row)
    # Dividing by T > 0 keeps the order, so these are the largest scaled logits, descending.
    top, top_idx = lax.top_k(logits, min(c + 1, vocab))
    top = top / temp  # [B, W], W = C + 1 (or V)
    # The first C are the candidates; the (C+1)-th bounds every token outside them. Masks and
    # reductions rather than slices: XLA turns top_k into a sort and one slice, and finds its
    # fast top-k kernel again only if no other slice of that sort remains (a sort is ~50x slower).
    is_cand = lax.broadcasted_iota(jnp.int32, top.shape, 1) < c
    m = jnp.max(top, axis=-1)
    floor = jnp.max(jnp.where(is_cand, -jnp.inf, top), axis=-1)
    s = logits / temp  # [B, V]; XLA fuses this into each pass that reads it.

    k, top_p = params.top_k, params.top_p
    k_on = (k > 0) & (k < vocab)
    p_on = top_p < 1
    thr_k = jnp.where(k_on & (k <= c), _take(top, jnp.clip(k - 1, 0, c - 1)), -jnp.inf)
    # Top-p is measured against the mass that survives top-k: a sum over the candidates when
    # top-k keeps only candidates, else over all of V.
    k_inside = k_on & (k <= c) & (thr_k > floor)
    w = jnp.where(is_cand, _mass(top, m, thr_k), 0.0)
    full_total = _when(
        jnp.any(~greedy & p_on & ~k_inside),
        lambda: jnp.sum(_mass(s, m, thr_k), axis=-1),
        jnp.zeros_like(m),
    )
    total = jnp.where(k_inside, jnp.sum(w, axis=-1), full_total)
    cdf = _cdf(w)  # [B, W]
    n_below = jnp.sum(is_cand & (cdf < _col(top_p * total)), axis=-1)
    thr_p = jnp.where(p_on & (n_below < c), _take(top, jnp.minimum(n_below, c - 1)), -jnp.inf)
    # p < min_p * p_max  <=>  s < max(s) + log(min_p); log(0) = -inf switches it off.
    thr_min = m + jnp.log(params.min_p)
    thr = jnp.maximum(jnp.maximum(thr_k, thr_p), thr_min)

    # The kept set lies inside the candidates when the threshold is above every token outside
    # them, or when those are all -inf (masked, or none) and so weigh nothing.
    within = (thr > floor) | (floor == -jnp.inf)
    # thr is exact unless top-k reaches past C, or the nucleus does and something else cuts
    # inside the candidates (an unresolved top-k or top-p threshold is <= floor).
    known = (~k_on | (k <= c)) & (~p_on | (n_below < c) | within)
    from_cand = greedy | (known & within)

    def row_key(words, i):
        return jax.random.fold_in(jax.random.wrap_key_data(words, impl="threefry2x32"), i)

    u = jax.vmap(lambda w, i: jax.random.uniform(row_key(w, i), (), jnp.float32))(params.seed, step)
    # The kept candidates are a prefix of the sorted ones, and there the top-k cdf is theirs.
    kept_mass = _take(cdf, jnp.sum(is_cand & (top >= _col(thr)), axis=-1) - 1)
    kept = jnp.where(is_cand, _mass(top, m, thr), 0.0)
    cand_tokens = _take(top_idx, _pick(cdf, u * kept_mass, kept))

    def full_vocab():
        lost = ~greedy & ~known
        exact = _when(
            jnp.any(lost), lambda: _exact_thresholds(s, m, params, thr_k, thr_min, lost), thr
        )
        final = jnp.where(known, thr, exact)  # from_cand rows are known: thr is theirs
        return jnp.where(from_cand, cand_tokens, _draw_full(s, m, final, u)), final

    sampled, final = lax.cond(jnp.all(from_cand), lambda: (cand_tokens, thr), full_vocab)
    argmax = _when(jnp.any(greedy), lambda: _argmax(logits), sampled)
    tokens = jnp.where(greedy, argmax, sampled)
    return tokens, temp_row, jnp.where(greedy, -jnp.inf, final)


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

    unused = jnp.full_like(m, -jnp.inf)
    thr_p = jnp.where(p_on, _when(jnp.any(lost & p_on), nucleus, unused), -jnp.inf)
    return jnp.maximum(jnp.maximum(thr_k, thr_p), thr_min)
