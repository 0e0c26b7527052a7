"""Speculative decoding: drafts change how many steps a request takes, never its tokens.

Greedy and seeded sampled output with n-gram and draft-model speculation equals output
without, over a concurrent random workload (preemption and prefix hits included); sampled
output keeps its distribution (a chi-square test against independent draws without
speculation); nothing compiles after warm-up; no page leaks."""

import random

import numpy as np
import pytest
from scipy import stats as scipy_stats

import hf_models
import jaxllm
from jaxllm import kv_cache, startup
from jaxllm.engine import CompileCounter, Engine
from jaxllm.engine_config import EngineConfig
from jaxllm.llm import _Checkpoint
from jaxllm.params import ModelSpec
from jaxllm.sampling import SamplingParams
from jaxllm.speculative import ngram_draft
from jaxllm.tokenizer import byte_level_tokenizer

# decode rows {1, 2, 4} x prefill rows {0, 1, 2} of 16-token chunks; a pool that preempts.
OPTIONS = dict(max_seq_len=192, max_num_seqs=4, max_step_tokens=32, chunk=16, page_size=8)


def test_ngram_draft_proposes_what_followed_the_latest_longest_match():
    tokens = np.array([5, 1, 2, 3, 9, 1, 2, 4, 7, 7, 1, 2])
    # Suffix [1, 2] occurred at 1 and 5: the latest (5) proposes what followed it.
    assert ngram_draft(tokens, 3, 1, 3) == [4, 7, 7]
    assert ngram_draft(tokens, 1, 1, 3) == [4]
    # A longer suffix wins over a later shorter one: [9, 1, 2] at 4 beats [1, 2] at 5.
    tokens = np.array([9, 1, 2, 8, 8, 1, 2, 6, 9, 1, 2])
    assert ngram_draft(tokens, 2, 2, 3) == [8, 8]
    assert ngram_draft(tokens, 2, 2, 2) == [6, 9]
    # Too short a match, or none: no draft; a draft stops at the sequence's end.
    assert ngram_draft(np.array([1, 2, 3, 4, 2]), 4, 2, 3) == []
    assert ngram_draft(np.array([1, 2, 3, 4, 2]), 4, 1, 3) == [3, 4, 2]
    assert ngram_draft(np.array([3]), 4, 1, 3) == []


def _draft_by_definition(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tokens[-n:]]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_draft_equals_its_definition_on_random_histories():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40)))
        k, min_n = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 3))
        expected = _draft_by_definition(tokens.tolist(), k, min_n, max_n)
        assert ngram_draft(tokens, k, min_n, max_n) == expected, (tokens, k, min_n, max_n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The model, and a draft model of the same tokenizer with other weights."""
    dirs = []
    for seed in (0, 7):
        path = tmp_path_factory.mktemp(f"spec_model_{seed}")
        hf_models.write("llama3_gqa", path, seed=seed)
        byte_level_tokenizer().save(path)
        dirs.append(path)
    return dirs


@pytest.fixture(scope="module")
def llm(model_dirs):
    with jaxllm.LLM.load(model_dirs[0], warm_up=False, start=False) as llm:
        yield llm


def draft_runner(llm, path):
    checkpoint = _Checkpoint.open(path)
    spec = llm.runner.spec
    spec = ModelSpec(checkpoint.config, spec.dtype, spec.mesh, spec.rules)
    return checkpoint.load(spec, "draft", startup.StartupReport())


def start_engine(llm, warm_up=False, draft=None, **options) -> Engine:
    config = EngineConfig(**{**OPTIONS, **options})
    return Engine(llm.runner, llm.tokenizer, config, draft=draft).start(warm_up=warm_up)


def workload(seed: int, n: int = 12):
    """Concurrent requests whose prompts repeat themselves (so drafts are made and some
    kept), greedy and seeded sampled, some with a stop token or logprobs."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        motif = [rng.randrange(256) for _ in range(rng.randrange(2, 9))]
        prompt = (motif * 40)[: rng.randrange(4, 110)]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 60),
            temperature=rng.choice([0.0, 0.0, 0.8]),
            top_k=rng.choice([0, 8]),
            seed=i,
            stop_token_ids=rng.choice([(), (motif[0],)]),
            logprobs=rng.choice([None, None, 2]),
            ignore_eos=True,
        )
        jobs.append((prompt, params))
    return jobs


def run(engine: Engine, jobs):
    requests = [engine.submit(ids, params) for ids, params in jobs]
    outputs = [r.wait(120) for r in requests]
    engine.wait_idle()
    engine.pages.check()
    assert engine.stats()["pages_used"] == 0  # every page free or an evictable cached one
    return outputs


def test_speculation_leaves_every_token_unchanged(llm, model_dirs):
    jobs = workload(seed=0)
    plain = start_engine(llm)
    try:
        expected = run(plain, jobs)
    finally:
        plain.stop()
    # A pool of 34 pages (the least is 32): speculating requests also get preempted.
    cfg = llm.config
    per_token = kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "float32")
    small = dict(kv_cache_bytes=34 * OPTIONS["page_size"] * per_token)
    engines = {
        "ngram": lambda: start_engine(llm, warm_up=True, speculative="ngram", **small),
        "draft": lambda: start_engine(
            llm,
            draft=draft_runner(llm, model_dirs[1]),
            speculative="draft",
            draft_model=str(model_dirs[1]),
        ),
    }
    for name, make in engines.items():
        engine = make()
        try:
            compiles = CompileCounter.count
            got = run(engine, jobs)
            if name == "ngram":  # warmed up: verifying steps compiled nothing new
                assert CompileCounter.count == compiles
                assert engine.scheduler.preemptions > 0
            for want, have in zip(expected, got, strict=True):
                assert have.token_ids == want.token_ids, name
                assert have.finish_reason == want.finish_reason
                if want.logprobs is not None:
                    np.testing.assert_allclose(
                        [t.logprob for t in have.logprobs],
                        [t.logprob for t in want.logprobs],
                        rtol=1e-4,
                        atol=1e-4,
                    )
            stats = engine.stats()
            assert stats["spec_draft_tokens"] > 0, name
            if name == "ngram":  # a random draft model's guesses are (rightly) rejected
                assert stats["spec_accepted_tokens"] > 0, name
                assert stats["spec_tokens_per_step"] > 1.2, (name, stats)
        finally:
            engine.stop()


def test_sampled_output_keeps_its_distribution(llm, model_dirs):
    """Tokens 1..3 of 300 sampled continuations with speculation (the model drafting for
    itself: drafts are its greedy choice, kept about as often as they are sampled) against
    300 independent ones without: a two-sample chi-square test per position."""
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    n = 300

    def params(seed):
        return SamplingParams(max_tokens=4, temperature=1.0, top_k=4, seed=seed, ignore_eos=True)

    plain = start_engine(llm, max_num_seqs=8)
    try:
        without = [
            r.token_ids for r in run(plain, [(prompt, params(10_000 + s)) for s in range(n)])
        ]
    finally:
        plain.stop()
    draft = draft_runner(llm, model_dirs[0])
    spec = start_engine(
        llm, max_num_seqs=8, draft=draft, speculative="draft", draft_model=str(model_dirs[0])
    )
    try:
        with_spec = [r.token_ids for r in run(spec, [(prompt, params(s)) for s in range(n)])]
        rate = spec.stats()["spec_acceptance_rate"]
    finally:
        spec.stop()
    assert 0.1 < rate < 0.9  # both kept and rejected drafts were exercised
    for position in (1, 2, 3):
        a = [t[position] for t in with_spec]
        b = [t[position] for t in without]
        values = sorted(set(a) | set(b))
        table = np.array([[a.count(v) for v in values], [b.count(v) for v in values]])
        table = table[:, table.sum(axis=0) >= 5]  # the test's expected counts need >= 5
        p = scipy_stats.chi2_contingency(table).pvalue
        assert p > 1e-3, (position, table, p)


def test_per_request_switch(llm):
    engine = start_engine(llm, speculative="ngram")
    try:
        prompt = [1, 2, 3] * 10
        off = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative=False)
        run(engine, [(prompt, off)])
        assert engine.stats()["spec_draft_tokens"] == 0
        on = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        run(engine, [(prompt, on)])
        assert engine.stats()["spec_draft_tokens"] > 0
    finally:
        engine.stop()
    plain = start_engine(llm)
    try:
        with pytest.raises(ValueError, match="no speculative method"):
            plain.submit([1, 2], SamplingParams(speculative=True))
    finally:
        plain.stop()


def test_a_draft_model_of_another_tokenizer_is_refused(llm, tmp_path):
    hf_models.write("llama3_gqa", tmp_path, vocab_size=1024)
    byte_level_tokenizer().save(tmp_path)
    checkpoint = _Checkpoint.open(tmp_path)
    bigger = llm.config.vocab_size < checkpoint.config.vocab_size
    assert bigger
    with pytest.raises(ValueError, match="share the model's tokenizer"):
        checkpoint.check_drafts_for(llm.tokenizer, llm.config)
