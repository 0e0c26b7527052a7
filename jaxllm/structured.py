"""Structured output: what a request's text must match, and the grammar engine that says
which tokens may come next.

The grammar engine is llguidance, chosen by measurement (``scripts/bench_grammar_engines.py``):
it compiles JSON Schema, regex and Lark in about a millisecond, needs no torch, and bounds
its own work. Host side, per engine: one `GrammarCompiler` (from the model's tokenizer) turns
a `StructuredOutput` into a `Grammar`, cached; each request gets its own `Matcher`, which
writes the next-token bitmask into its row of a preallocated [B, W] int32 array,
W = `mask_words(V)` (`GrammarCompiler.fill_masks` fills many rows on a thread pool). Device
side, `apply_mask` sets the logits of disallowed tokens to -inf inside the sampler.

Bit ``t % 32`` of word ``t // 32`` is set when token ``t`` may come next (llguidance's and
xgrammar's layout). Ids past the tokenizer's vocabulary (padding rows of the embedding) are
never allowed. A matcher whose grammar is complete, or that hit an error, allows only EOS.

Threads: `GrammarCompiler.compile` and `Grammar.matcher` may be called from any number of
threads at once (request handlers; llguidance drops the GIL while it compiles and computes
masks). A `Matcher` belongs to one thread at a time (the engine's).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import llguidance as llg
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.tokenizer import Tokenizer, _HFBackend, _SentencePiece

if TYPE_CHECKING:
    from jaxllm.request import Request

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 64 * 1024  # a larger schema, regex or grammar is refused before compiling
# llguidance's resource limits: compiling a grammar and computing one mask stay within tens
# of ms (its fuel burns at ~50k/ms compiling, ~14k/ms per mask), a grammar's lazily built
# lexer within ~40 MB. A mask that runs out leaves its matcher in error: only EOS is allowed.
# Terse errors: a matcher's error is logged, and need not carry the schema and parser state.
_LIMITS = dict(
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    max_lexer_states=20_000,
    verbose_errors=False,
)
# JSON may put whitespace between tokens, as json.dumps(indent=...) does, but at most 32
# characters in a row: a model stuck on newlines must still make progress.
# JSON is written compactly, as ``json.dumps`` does (", " and ": ", no other whitespace):
# measured on the demo model at temperature 1.0 with 200 tokens, 40 samples per schema of
# tests/data/schemas.json, whitespace allowed between tokens (even capped at 32 characters)
# let the model spend its tokens on newlines: 10, 1 and 27 of 40 parsed; compact: 40 of 40
# for each, in at most 149 tokens. A schema's own "x-guidance" options override this.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint on a request's output (OpenAI ``response_format`` and vLLM's
    guided decoding options map onto these). The text must match it in full; EOS is allowed
    once it does, and is the only token allowed once nothing more may follow.

    ``json_schema`` follows llguidance's JSON Schema support (draft 2020-12; a schema's
    ``"x-guidance"`` object overrides the JSON layout, e.g. ``{"whitespace_flexible": false}``);
    ``regex`` is Rust regex syntax, matched in full (no look-around or back-references);
    ``grammar`` is Lark as llguidance reads it.
    """

    json_schema: str | None = None  # JSON text of a JSON Schema
    json_object: bool = False  # any JSON object (``response_format: json_object``)
    regex: str | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    def __post_init__(self):
        given = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.grammar is not None]  # fmt: skip
        if sum(given) != 1:
            raise ValueError(
                "structured output takes exactly one of json_schema, json_object, regex, grammar"
            )


def from_request(kind: str, text: str, max_chars: int) -> StructuredOutput:
    """The constraint a front end was given as ``kind`` (a `StructuredOutput` field name
    other than json_object) and ``text``; ValueError when the text is longer than
    ``max_chars`` or a json_schema is not a JSON object (the front end names the field)."""
    if len(text) > max_chars:
        raise ValueError(
            f"{len(text)} characters, more than the server's max_structured_chars ({max_chars})"
        )
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON Schema must be a JSON object")
    return StructuredOutput(**{kind: text})


def mask_words(vocab_size: int) -> int:
    """int32 words of one row of the bitmask: one bit per token id."""
    return -(-vocab_size // 32)


def apply_mask(logits: Float[Array, "B V"], mask: Int[Array, "B W"]) -> Float[Array, "B V"]:
    """Disallowed tokens' logits -> -inf, the others unchanged (bit for bit). A row of all
    ones (-1) is unconstrained. Jittable; the bits are unpacked as [B, W, 32] -> [B, V]."""
    batch, vocab = logits.shape
    if mask.shape[1] != mask_words(vocab):
        raise ValueError(f"{vocab} tokens need {mask_words(vocab)} mask words, not {mask.shape[1]}")
    shifts = jnp.arange(32, dtype=mask.dtype)[None, None, :]
    # [B, W, 32]: bit j of word w says whether token 32 w + j is allowed
    bits = (mask[:, :, None] >> shifts) & 1
    allowed = bits.reshape(batch, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))


class Matcher:
    """One request's place in its grammar. Not thread-safe: one thread at a time."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int):
        self._m = matcher
        self._vocab_size = vocab_size
        self._words = mask_words(vocab_size)

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the tokens allowed next into ``out``, an int32 (or uint32) row of
        `mask_words(V)` words, which must be C-contiguous (a row of a [B, W] array is)."""
        if out.shape != (self._words,) or out.dtype.itemsize != 4 or not out.flags.c_contiguous:
            raise ValueError(f"mask row must be {self._words} contiguous 32-bit words")
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def advance(self, token: int) -> None:
        """Consume a sampled token, which the last mask must have allowed."""
        if not 0 <= token < self._vocab_size or not self._m.consume_token(token):
            why = self._m.get_error() or f"not an id below {self._vocab_size}"
            raise ValueError(f"token {token} is not allowed by the grammar: {why}")

    @property
    def finished(self) -> bool:
        """The text is complete and nothing may follow: only EOS is allowed (also after an
        error, see `error`)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher stopped, if it failed (a refused token, a mask over its limits)."""
        return self._m.get_error() or None


class Grammar:
    """A compiled constraint; `matcher` starts a request on it (from any thread)."""

    def __init__(self, template: llg.LLMatcher, vocab_size: int):
        self._template = template  # never advanced: copies share its lexer cache
        self._vocab_size = vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self._vocab_size)


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one model, keeping the last ``cache_size`` grammars.

    ``vocab_size`` is the model's (its logits' V), at least the tokenizer's; EOS is any of
    the tokenizer's ``eos_ids``. Raises ValueError for a tokenizer llguidance cannot read.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 64):
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"the model's vocab_size {vocab_size} is smaller than its tokenizer's "
                f"({tokenizer.vocab_size})"
            )
        if not tokenizer.eos_ids:
            raise ValueError("structured output needs an EOS token, and this tokenizer has none")
        self.vocab_size = vocab_size
        self._words = mask_words(vocab_size)
        self._tokenizer = _ll_tokenizer(tokenizer, vocab_size)
        self._limits = llg.LLParserLimits(**_LIMITS)
        self._cache: collections.OrderedDict[StructuredOutput, Grammar] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor = llg.LLExecutor()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar of ``spec``; ValueError naming the problem when it is invalid, too
        large or unsupported."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        grammar = Grammar(self._compile(spec), self.vocab_size)  # outside the lock: takes ms
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def fill_masks(self, rows: Sequence[tuple[Matcher, int]], out: np.ndarray) -> None:
        """`Matcher.fill_mask` for many requests at once, in parallel: each (matcher, row)
        writes row ``row`` of ``out``, a C-contiguous [B, W] array of 32-bit words."""
        if out.ndim != 2 or out.shape[1] != self._words or out.dtype.itemsize != 4:
            raise ValueError(f"masks must be [B, {self._words}] 32-bit words, not {out.shape}")
        if not out.flags.c_contiguous or any(not 0 <= r < out.shape[0] for _, r in rows):
            raise ValueError("masks must be C-contiguous, and every row inside them")
        pairs = [(m._m, r) for m, r in rows]
        self._executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, out.strides[0], len(out))

    def _compile(self, spec: StructuredOutput) -> llg.LLMatcher:
        what, text = _source(spec)
        size = len(text.encode())
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"{what} is {size:,} bytes; the limit is {MAX_SPEC_BYTES:,}")
        if spec.regex is not None:
            source = llg.LLMatcher.grammar_from_regex(text)
        elif spec.grammar is not None:
            source = llg.LLMatcher.grammar_from_lark(text)
        else:
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError(f"{what} must be a JSON object, not {type(schema).__name__}")
            source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        matcher = llg.LLMatcher(self._tokenizer, source, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ValueError(f"invalid {what}: {matcher.get_error()}")
        return matcher


class Constraints:
    """An engine's structured output: its grammars (the compiler is built on first use, as
    reading the vocabulary takes a moment), and the tokens constrained requests sampled that
    their matchers have yet to consume. The engine thread consumes them, and computes the
    next masks, while the device runs the following step's model call (``masks``)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._unconsumed: list[tuple[Request, int]] = []

    def grammar(self, spec: StructuredOutput) -> Grammar:
        """``spec`` compiled (cached); ValueError if it cannot be. Any thread."""
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._compiler.compile(spec)

    def sampled(self, request: Request, token: int) -> None:
        """``request`` (which has a matcher) sampled ``token``. Engine thread."""
        self._unconsumed.append((request, token))

    def masks(self, rows: Sequence[tuple[Request, int]], num_rows: int) -> np.ndarray | None:
        """The allowed-token bits of ``num_rows`` sampler rows (all set where no constrained
        request samples), ``rows`` giving each request's row; None if none is constrained.
        First the matchers consume what was sampled since the last call. Engine thread."""
        for request, token in self._unconsumed:
            if not request.done:
                try:
                    request.matcher.advance(token)
                except ValueError as e:  # a token its mask forbade: a bug of ours
                    log.exception("structured output of request %s failed", request.id)
                    request._finish("error", e)
        self._unconsumed.clear()
        rows = [(r.matcher, row) for r, row in rows if r.matcher is not None and not r.done]
        if not rows:
            return None
        out = np.full((num_rows, mask_words(self.vocab_size)), -1, np.int32)
        self._compiler.fill_masks(rows, out)
        return out


def _source(spec: StructuredOutput) -> tuple[str, str]:
    """(what the constraint is called in errors, its text)."""
    if spec.json_schema is not None:
        return "json_schema", spec.json_schema
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.grammar is not None:
        return "Lark grammar", spec.grammar
    return "json_object", '{"type": "object"}'


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llg.LLTokenizer:
    backend, eos = tokenizer._backend, sorted(tokenizer.eos_ids)
    if isinstance(backend, _HFBackend):
        source = backend.tk.to_str()
    elif isinstance(backend, _SentencePiece):
        vocab = _SentencePieceVocab(backend, vocab_size, eos[0], tokenizer.bos_id)
        source = llg.TokenizerWrapper(vocab)
    else:
        raise ValueError(f"structured output cannot read a {type(backend).__name__} tokenizer")
    try:
        return llg.LLTokenizer(source, n_vocab=vocab_size, eos_token=eos)
    except ValueError as e:
        raise ValueError(f"structured output cannot use this tokenizer: {e}") from None


class _SentencePieceVocab:
    """A bare tokenizer.model as llguidance's TokenizerWrapper reads one: each id's bytes
    (b"\\xff" + name marks a special token; ids past the vocab spell nothing)."""

    def __init__(self, sp: _SentencePiece, vocab_size: int, eos: int, bos: int | None):
        self._sp = sp
        self.eos_token_id, self.bos_token_id = eos, bos
        self.special_token_ids = sorted(sp.special)
        self.tokens = [self._bytes(i) for i in range(sp.vocab_size())]
        self.tokens += [b""] * (vocab_size - len(self.tokens))

    def _bytes(self, i: int) -> bytes:
        proc = self._sp.sp
        if i in self._sp.by_id:
            return (b"\xff" if i in self._sp.special else b"") + self._sp.by_id[i].encode()
        if i >= proc.get_piece_size():
            return b""
        if proc.is_byte(i):
            return bytes([int(proc.id_to_piece(i)[3:5], 16)])  # "<0xE4>"
        return proc.id_to_piece(i).replace("\u2581", " ").encode()

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self._sp._encode_plain(text, at_start=False)
