"""Structured output (jaxllm.structured) on the demo model's tokenizer: compiling constraints,
walking valid outputs through a matcher, random walks that must parse and validate, and the
device-side mask.

The model vocabulary here is the tokenizer's 4,096 ids plus 37 padding ids (V = 4,133, not a
multiple of 32): a padding id must never be allowed. ``tests/data/schemas.json`` holds the
schemas, with one valid instance each (scripts/bench_grammar_engines.py walks the same ones).
"""

import json
import re
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers

from jaxllm import demo
from jaxllm.structured import GrammarCompiler, StructuredOutput, apply_mask, mask_words
from jaxllm.tokenizer import Tokenizer

DATA = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
SCHEMAS = DATA["json_schemas"]
ISO_DATE = DATA["regexes"]["iso_date"]
LARK = """
start: "[" item ("," item)* "]"
item: NUMBER | WORD
NUMBER: /[0-9]{1,3}/
WORD: /[a-z]{1,8}/
"""
V = 4096 + 37
EOS = 1  # <|end_of_text|>


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(demo.DEMO_MODEL_DIR / "tokenizer")


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, vocab_size=V)


def allowed_ids(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))


def valid_outputs() -> dict[str, tuple[StructuredOutput, str]]:
    out = {}
    for name, c in SCHEMAS.items():
        schema = StructuredOutput(json_schema=json.dumps(c["schema"]))
        out[name] = (schema, json.dumps(c["example"]))
    out["json_object"] = (
        StructuredOutput(json_object=True),
        json.dumps(DATA["json_object"]["example"]),
    )
    out["regex"] = StructuredOutput(regex=ISO_DATE["regex"]), ISO_DATE["example"]
    out["lark"] = StructuredOutput(grammar=LARK), "[12,abc,7]"
    return out


@pytest.mark.parametrize("spec, text", valid_outputs().values(), ids=valid_outputs().keys())
def test_a_valid_output_is_allowed_token_by_token_then_only_eos(compiler, tok, spec, text):
    matcher, mask = compiler.compile(spec).matcher(), np.zeros(mask_words(V), np.int32)
    for t in tok.encode(text, add_special_tokens=False):
        matcher.fill_mask(mask)
        assert t in allowed_ids(mask), f"token {t} ({tok.decode([t])!r}) refused"
        assert not matcher.finished
        matcher.advance(t)
    matcher.fill_mask(mask)
    assert matcher.finished and matcher.error is None
    assert allowed_ids(mask).tolist() == [EOS]


def test_a_refused_token_raises_and_leaves_only_eos(compiler, tok):
    matcher = compiler.compile(StructuredOutput(json_object=True)).matcher()
    mask = np.zeros(mask_words(V), np.int32)
    matcher.fill_mask(mask)
    bad = tok.encode("abc", add_special_tokens=False)[0]
    assert bad not in allowed_ids(mask)
    with pytest.raises(ValueError, match=f"token {bad} is not allowed"):
        matcher.advance(bad)
    with pytest.raises(ValueError, match="not an id below"):
        compiler.compile(StructuredOutput(json_object=True)).matcher().advance(V)
    assert matcher.finished and matcher.error
    matcher.fill_mask(mask)
    assert allowed_ids(mask).tolist() == [EOS]


def test_json_is_compact(compiler, tok):
    """No whitespace but json.dumps' separators: a small model given room for newlines
    spends its tokens on them (jaxllm.structured._JSON_OPTIONS)."""
    matcher = compiler.compile(StructuredOutput(json_object=True)).matcher()
    mask = np.zeros(mask_words(V), np.int32)
    matcher.advance(tok.encode("{", add_special_tokens=False)[0])
    matcher.fill_mask(mask)
    for text in ("\n", " ", "\t"):
        (token,) = tok.encode(text, add_special_tokens=False)
        assert token not in allowed_ids(mask), repr(text)


def test_padding_ids_past_the_tokenizer_are_never_allowed(compiler, tok):
    mask = np.zeros(mask_words(V), np.int32)
    compiler.compile(StructuredOutput(regex=r"(.|\n)*")).matcher().fill_mask(mask)
    allowed = allowed_ids(mask)
    assert len(allowed) > 3000 and EOS in allowed and allowed.max() < tok.vocab_size


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(json_schema='{"type": "object",'), "json_schema is not valid JSON"),
        (dict(json_schema='{"type": "strin"}'), "invalid json_schema: .*strin"),
        (dict(json_schema="[1, 2]"), "json_schema must be a JSON object, not list"),
        (dict(json_schema='{"$ref": "#/$defs/gone"}'), "invalid json_schema: .*gone"),
        (dict(json_schema='{"propertyNames": {}}'), "invalid json_schema: .*propertyNames"),
        (dict(json_schema='{"items": ' * 300 + "{}" + "}" * 300), "invalid json_schema"),
        (dict(json_schema=json.dumps({"enum": ["x" * 99] * 700})), "72,110 bytes; the limit"),
        (dict(regex="(ab"), "invalid regex: .*unclosed group"),
        (dict(regex="(?=a)b"), "invalid regex: .*look-around"),
        (dict(grammar="start: foo"), 'invalid Lark grammar: .*unknown name: "foo"'),
        (dict(grammar='start: "a'), "invalid Lark grammar"),
    ],
)
def test_invalid_specs_raise_value_error_naming_the_problem(compiler, spec, message):
    with pytest.raises(ValueError, match=f"(?s){message}"):
        compiler.compile(StructuredOutput(**spec))


def _check(value, schema: dict, path: str = "$") -> None:
    """The JSON Schema keywords of tests/data/schemas.json (jsonschema is not installed)."""
    if "enum" in schema:
        assert any(value == e and type(value) is type(e) for e in schema["enum"]), path
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if kind is not None:
        assert type(value) is types[kind], f"{path}: {value!r} is not {kind}"
    if kind == "integer":
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    if kind == "string":
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e9), path
        assert re.search(schema.get("pattern", ""), value), path
    if kind == "array":
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9), path
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        assert set(schema["required"]) <= set(value) <= set(schema["properties"]), path
        for key, item in value.items():
            _check(item, schema["properties"][key], f"{path}.{key}")


def random_walks(compiler, spec, n: int, seed: int, max_steps: int = 300) -> list[list[int]]:
    """``n`` outputs drawn at temperature 1 from uniform random logits under the mask."""
    draw = jax.jit(
        lambda key, mask: jax.random.categorical(
            key, apply_mask(jax.random.uniform(jax.random.fold_in(key, 1), (n, V)), mask)
        )
    )
    grammar, key = compiler.compile(spec), jax.random.key(seed)
    matchers, outputs = [grammar.matcher() for _ in range(n)], [[] for _ in range(n)]
    masks, live = np.full((n, mask_words(V)), -1, np.int32), set(range(n))
    for _ in range(max_steps):
        compiler.fill_masks([(matchers[i], i) for i in live], masks)
        key, step = jax.random.split(key)
        tokens = np.asarray(draw(step, jnp.asarray(masks))).tolist()
        for i in sorted(live):
            if tokens[i] == EOS:
                live.remove(i)
            else:
                matchers[i].advance(tokens[i])
                outputs[i].append(tokens[i])
        if not live:
            return outputs
    raise AssertionError(f"{len(live)} of {n} walks did not end in {max_steps} steps")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_parse_and_follow_the_schema(compiler, tok, name):
    schema = SCHEMAS[name]["schema"]
    spec = StructuredOutput(json_schema=json.dumps(schema))
    for ids in random_walks(compiler, spec, n=20, seed=len(name)):
        _check(json.loads(tok.decode(ids)), schema)


def test_random_walks_match_the_regex(compiler, tok):
    for ids in random_walks(compiler, StructuredOutput(regex=ISO_DATE["regex"]), n=20, seed=0):
        assert re.fullmatch(ISO_DATE["regex"], tok.decode(ids))


def test_fill_masks_equals_fill_mask_row_by_row(compiler, tok):
    matchers = [compiler.compile(spec).matcher() for spec, _ in valid_outputs().values()]
    for m, (_, text) in zip(matchers, valid_outputs().values(), strict=True):
        for t in tok.encode(text, add_special_tokens=False)[:3]:
            m.advance(t)
    batch = np.zeros((len(matchers) + 1, mask_words(V)), np.int32)
    one = np.zeros(mask_words(V), np.int32)
    compiler.fill_masks([(m, i + 1) for i, m in enumerate(matchers)], batch)
    assert not batch[0].any()
    for i, m in enumerate(matchers):
        m.fill_mask(one)
        np.testing.assert_array_equal(batch[i + 1], one)


def test_apply_mask_keeps_allowed_logits_bit_for_bit():
    vocab, rng = 70, np.random.default_rng(0)
    logits = rng.standard_normal((4, vocab)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, (4, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    mask[1] = -1  # unconstrained
    mask[2] = 0  # nothing allowed
    out = np.asarray(jax.jit(apply_mask)(jnp.asarray(logits), jnp.asarray(mask)))
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    assert bits[0].any() and not bits[0].all()
    np.testing.assert_array_equal(out[bits].view(np.int32), logits[bits].view(np.int32))
    assert np.all(out[~bits] == -np.inf)
    np.testing.assert_array_equal(out[1].view(np.int32), logits[1].view(np.int32))
    with pytest.raises(ValueError, match="70 tokens need 3 mask words, not 2"):
        apply_mask(jnp.asarray(logits), jnp.asarray(mask[:, :2]))


def test_apply_mask_with_a_matcher_never_allows_padding(compiler):
    mask = np.zeros((1, mask_words(V)), np.int32)
    compiler.compile(StructuredOutput(regex=r"(.|\n)*")).matcher().fill_mask(mask[0])
    out = np.asarray(apply_mask(jnp.zeros((1, V), jnp.bfloat16), jnp.asarray(mask)))
    assert out.dtype == jnp.bfloat16 and np.all(out[0, 4096:] == -np.inf)
    assert np.all(out[0, allowed_ids(mask[0])] == 0)


def test_compile_caches_by_spec_and_is_thread_safe(tok):
    compiler = GrammarCompiler(tok, vocab_size=V, cache_size=4)
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS["order"]["schema"]))
    grammars = []

    def request_handler():
        grammars.append(compiler.compile(spec))

    threads = [threading.Thread(target=request_handler) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cached = compiler.compile(spec)
    assert len(grammars) == 8 and cached in grammars
    assert compiler.compile(StructuredOutput(json_schema=spec.json_schema)) is cached  # equal spec
    matcher, mask = grammars[0].matcher(), np.zeros(mask_words(V), np.int32)  # on this thread
    matcher.fill_mask(mask)
    assert allowed_ids(mask).tolist() == tok.encode("{", add_special_tokens=False)
    for i in range(4):  # four other specs push it out of the cache
        compiler.compile(StructuredOutput(regex=f"a{{{i}}}"))
    assert compiler.compile(spec) is not cached


def test_a_sentencepiece_tokenizer_works(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ['{"name":', '"Ada"', "36", "London", "true", "null", "[1, 2]", "}", "é", "日本"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(500)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    )  # fmt: skip
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    sp = Tokenizer.from_sentencepiece((tmp_path / "sp.model").read_bytes(), config)
    compiler = GrammarCompiler(sp, vocab_size=320)
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS["person"]["schema"]))
    text = json.dumps(SCHEMAS["person"]["example"] | {"name": "Ada 日本é"}, ensure_ascii=False)
    matcher, mask = compiler.compile(spec).matcher(), np.zeros(mask_words(320), np.int32)
    for t in sp.encode(text, add_special_tokens=False):
        matcher.fill_mask(mask)
        assert t in allowed_ids(mask)
        matcher.advance(t)
    matcher.fill_mask(mask)
    assert matcher.finished and allowed_ids(mask).tolist() == [2]


def test_tokenizers_it_cannot_use_are_refused(tok):
    tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = Tokenizer.from_tokenizers(tk, {"eos_token": "</s>"})
    with pytest.raises(ValueError, match="cannot use this tokenizer"):
        GrammarCompiler(word_level, vocab_size=2)
    with pytest.raises(ValueError, match="smaller than its tokenizer's"):
        GrammarCompiler(tok, vocab_size=4000)
    with pytest.raises(ValueError, match="needs an EOS token"):
        GrammarCompiler(Tokenizer.from_tokenizers(tk, {}), vocab_size=2)
