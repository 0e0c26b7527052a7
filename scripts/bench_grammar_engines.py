"""Benchmark: the grammar engines structured output could sit on (llguidance, xgrammar,
outlines-core), measured on this machine to choose one for ``jaxllm.structured``.

Tokenizers: the demo model's (4,096 tokens), and byte-level BPEs of ``--vocabs`` tokens
(GPT-2's pre-tokenizer; default 32,000 and 128,000) trained here on the local Python sources
(stdlib and site-packages, 120 MB) and cached under ``out/``. Constraints, from
``tests/data/schemas.json`` (which the tests share): three JSON Schemas (nested objects,
arrays, enums), an ISO-date regex, and any JSON object; all three engines support these
(Lark grammars, llguidance's alone, are not measured). For each it reports:

- ``setup_ms``: the engine's once-per-model work on the tokenizer;
- ``compile_ms``: compiling the constraint, caches off (fastest of ``--repeats``; a compile
  slower than 2 s runs once);
- ``new_matcher_us``: a fresh per-request state from the compiled grammar;
- per token, walking the tokens of a valid instance: compute the next-token bitmask into a
  preallocated int32 row, check the token is allowed, consume it. ``cold``: the first walk
  after compiling; ``warm``: ``--walks`` later ones (llguidance builds lexer states lazily and
  shares them between copies of a matcher). Each walk also checks that EOS is allowed at the end.

    python scripts/bench_grammar_engines.py [--vocabs 32000 128000] [--repeats 3] [--walks 5]

Writes ``out/bench_grammar_engines.json`` (``--out``) and prints a table.

What it found on a 2-core CPU (llguidance 1.9.1, xgrammar 0.2.9, outlines-core 0.2.14):
compiles take llguidance 0.3-0.7 ms at every vocabulary, xgrammar 1-26 ms, outlines-core up
to 2.4 s for a schema and 5-12 s for any JSON object (its JSON is one regex's DFA). Warm
per-token means at 4k / 32k / 128k tokens: xgrammar 3-4 / 3-18 / 5-97 us; llguidance
7-11 / 9-66 / 11-408 us, worst on strings with a maxLength under ~30 (each such mask walks
the whole token trie, ~1 ms at 128k); outlines-core 1-3 / 1-23 / 2-100 us, but it drops
integer bounds. xgrammar requires torch, transformers and triton (~2 GB; importing it takes
3 s and 280 MB) and has no Lark. jaxllm uses llguidance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from importlib.metadata import version
from pathlib import Path

import llguidance as llg
import numpy as np
import outlines_core as oc
import tokenizers
import torch
import xgrammar as xgr
from tokenizers import decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import noise_meter, percentiles  # noqa: E402

from jaxllm import demo  # noqa: E402
from jaxllm.tokenizer import _byte_symbols  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]  # ids 0 (BOS) and 1 (EOS), as the demo's
ANY_OBJECT = '{"type": "object"}'


def constraints() -> dict[str, tuple[str, str, str]]:
    """name -> (kind, constraint text, a valid output)."""
    data = json.loads((REPO / "tests" / "data" / "schemas.json").read_text())
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    out = {
        name: ("json_schema", json.dumps(c["schema"]), json.dumps(c["example"], **compact))
        for name, c in data["json_schemas"].items()
    }
    for name, c in data["regexes"].items():
        out[name] = ("regex", c["regex"], c["example"])
    out["json_object"] = ("json_object", "", json.dumps(data["json_object"]["example"], **compact))
    return out


def trained_bpe(vocab: int, cache: Path) -> tokenizers.Tokenizer:
    path = cache / f"bpe{vocab}.json"
    if path.is_file():
        return tokenizers.Tokenizer.from_file(str(path))
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files, total = [], 0
    for p in (p for root in roots for p in sorted(root.rglob("*"))):
        if p.suffix in (".py", ".md", ".txt", ".rst") and p.is_file() and total < 120e6:
            files.append(p)
            total += p.stat().st_size
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((p.read_text(errors="replace") for p in files), trainer)
    cache.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return tk


class Vocab:
    """A byte-level tokenizer as each engine wants it: JSON (llguidance) or raw token bytes."""

    def __init__(self, tk: tokenizers.Tokenizer, eos: int):
        self.tk, self.eos, self.size = tk, eos, tk.get_vocab_size(with_added_tokens=True)
        byte_of = {s: b for b, s in enumerate(_byte_symbols())}
        special = {t.content for t in tk.get_added_tokens_decoder().values()}
        tokens = [tk.id_to_token(i) for i in range(self.size)]
        # Special tokens spell no text; both byte-vocabulary engines take b"" as "never text".
        self.raw = [b"" if t in special else bytes(byte_of[c] for c in t) for t in tokens]


class Llguidance:
    def setup(self, v: Vocab):
        self.tok = llg.LLTokenizer(v.tk.to_str(), n_vocab=v.size, eos_token=v.eos)

    def compile(self, kind: str, text: str):
        if kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(text)
        else:
            grammar = llg.LLMatcher.grammar_from_json_schema(text or ANY_OBJECT)
        matcher = llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def new(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, mask: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token)


class Xgrammar:
    def setup(self, v: Vocab):
        info = xgr.TokenizerInfo(v.raw, xgr.VocabType.RAW, vocab_size=v.size, stop_token_ids=v.eos)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, kind: str, text: str):
        if kind == "regex":
            return self.compiler.compile_regex(text)
        return self.compiler.compile_json_schema(text or ANY_OBJECT)

    def new(self, compiled):
        return xgr.GrammarMatcher(compiled)

    def fill(self, m, mask: np.ndarray) -> None:
        m.fill_next_token_bitmask(torch.from_numpy(mask)[None])

    def consume(self, m, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore:
    def setup(self, v: Vocab):
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(v.raw):
            if b:  # not a special token
                by_bytes.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(v.eos, by_bytes)

    def compile(self, kind: str, text: str):
        regex = (
            text if kind == "regex" else oc.json_schema.build_regex_from_schema(text or ANY_OBJECT)
        )
        return oc.Index(regex, self.vocab)

    def new(self, compiled):
        return oc.Guide(compiled)

    def fill(self, g, mask: np.ndarray) -> None:
        g.write_mask_into(mask.ctypes.data, mask.size, 4)

    def consume(self, g, token: int) -> bool:
        g.advance(token, return_tokens=False)  # raises on a refused token
        return True


ENGINES = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines_core": OutlinesCore}


def walk(engine, compiled, tokens: list[int], eos: int, mask: np.ndarray) -> list[float]:
    """Seconds per token (mask + check + consume) along ``tokens``; then EOS must be allowed."""
    state, times = engine.new(compiled), []
    for t in tokens:
        start = time.perf_counter()
        engine.fill(state, mask)
        ok = mask[t >> 5] >> (t & 31) & 1 and engine.consume(state, t)
        times.append(time.perf_counter() - start)
        assert ok, f"token {t} of a valid output was refused"
    engine.fill(state, mask)
    assert mask[eos >> 5] >> (eos & 31) & 1, "EOS is not allowed after a complete output"
    return times


def measure(engine, kind: str, text: str, tokens: list[int], vocab: Vocab, args) -> dict:
    mask, eos = np.zeros(-(-vocab.size // 32), np.int32), vocab.eos
    compile_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        compiled = engine.compile(kind, text)
        compile_s.append(time.perf_counter() - start)
        if compile_s[-1] > 2:
            break
    start = time.perf_counter()
    engine.new(compiled)
    new_s = time.perf_counter() - start
    cold = walk(engine, compiled, tokens, eos, mask)
    warm = [t for _ in range(args.walks) for t in walk(engine, compiled, tokens, eos, mask)]
    us = {k: v * 1e6 for k, v in percentiles(warm).items() if k != "n"}
    return {
        "compile_ms": min(compile_s) * 1e3,
        "new_matcher_us": new_s * 1e6,
        "tokens": len(tokens),
        "cold_mean_us": float(np.mean(cold)) * 1e6,
        **{f"warm_{k}_us": v for k, v in us.items()},
    }


def bench_engine(name: str, tk_name: str, vocab: Vocab, cases: dict, args) -> dict:
    engine = ENGINES[name]()
    with noise_meter() as noise:
        start = time.perf_counter()
        engine.setup(vocab)
        row = {"setup_ms": (time.perf_counter() - start) * 1e3, "constraints": {}}
        for case, (kind, text, output) in cases.items():
            print(f"{tk_name:10} {name:14} {case:12}", end=" ", flush=True)
            tokens = vocab.tk.encode(output, add_special_tokens=False).ids
            try:
                r = row["constraints"][case] = measure(engine, kind, text, tokens, vocab, args)
            except Exception as e:  # an engine that cannot do this constraint
                row["constraints"][case] = {"error": f"{type(e).__name__}: {e}"}
                print("failed:", row["constraints"][case]["error"])
                continue
            print(
                f"compile {r['compile_ms']:9.1f} ms   per token {r['cold_mean_us']:7.1f} us "
                f"cold, {r['warm_mean_us']:7.1f} us warm (p99 {r['warm_p99_us']:.1f})"
            )
    return {**row, "noise": vars(noise)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="*", default=[32000, 128000])
    parser.add_argument("--engines", nargs="*", default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--walks", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_grammar_engines.json")
    args = parser.parse_args()

    demo_json = demo.DEMO_MODEL_DIR / "tokenizer" / "tokenizer.json"
    tokenizer_set = {"demo_4096": tokenizers.Tokenizer.from_file(str(demo_json))}
    for v in args.vocabs:
        tokenizer_set[f"bpe_{v}"] = trained_bpe(v, REPO / "out" / "bench_grammar_tokenizers")
    results: dict = {
        "machine": {"cpu": platform.processor(), "cores": len(os.sched_getaffinity(0))},
        "versions": {name: version(name) for name in ("llguidance", "xgrammar", "outlines_core")},
        "tokenizers": {},
    }
    cases = constraints()
    for tk_name, tk in tokenizer_set.items():
        vocab = Vocab(tk, eos=tk.token_to_id(SPECIALS[1]))
        engines = {name: bench_engine(name, tk_name, vocab, cases, args) for name in args.engines}
        results["tokenizers"][tk_name] = {"vocab_size": vocab.size, "engines": engines}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
