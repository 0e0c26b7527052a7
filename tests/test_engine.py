"""The paged engine: batch-independent outputs (chunked prompts, prefix hits, preemption), no
compiles after warm-up, no page leaks under cancels, failures that end requests at once."""

import random
import threading
import time

import pytest

import hf_models
import jaxllm
from jaxllm import kv_cache
from jaxllm.engine import CompileCounter, Engine
from jaxllm.engine_config import EngineConfig
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import byte_level_tokenizer

# Small shapes, so that warm-up compiles few programs: decode rows {1, 2, 4} x prefill rows
# {0, 1, 2} of 16-token chunks, 8-token pages.
OPTIONS = dict(max_seq_len=256, max_num_seqs=4, max_step_tokens=32, chunk=16, page_size=8)
POOL_TOKENS = 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_model")
    hf_models.write("llama3_gqa", path)
    byte_level_tokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    # KV heads over tensor, the pool's pages replicated over data: the sharded pool runs.
    llm = jaxllm.LLM.load(model_dir, mesh={"data": 2, "tensor": 4}, warm_up=False, start=False)
    # A pool of 320 tokens: four running requests of ~100 tokens already preempt each other.
    llm.engine = new_engine(
        llm, kv_cache_bytes=POOL_TOKENS * bytes_per_token(llm), warm_up_prompt_logprobs=True
    )
    with llm:
        yield llm


def check_no_leak(engine: Engine) -> None:
    engine.wait_idle()
    engine.pages.check()
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["pages_used"] == 0, stats  # every page is free or an evictable cached page


@pytest.fixture
def engine(llm):
    yield llm.engine
    check_no_leak(llm.engine)


def new_engine(llm, warm_up=True, warm_up_prompt_logprobs=False, **options) -> Engine:
    config = EngineConfig(**{**OPTIONS, **options})
    engine = Engine(
        llm.runner, llm.tokenizer, config, warm_up_prompt_logprobs=warm_up_prompt_logprobs
    )
    return engine.start(warm_up=warm_up)


def prompts(n, seed, shared_prefix=0, longest=120):
    """Random prompts of 1..longest tokens (most longer than one chunk); with
    ``shared_prefix``, every other prompt starts with the same tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(256) for _ in range(shared_prefix)]
    out = []
    for i in range(n):
        body = [rng.randrange(256) for _ in range(rng.randrange(1, longest))]
        out.append(prefix + body if i % 2 else body)
    return out


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def submit_staggered(engine, jobs, seed):
    """Submits (prompt, params) jobs with random gaps, so arrivals interleave with decoding."""
    rng = random.Random(seed)
    requests = []
    for ids, params in jobs:
        requests.append(engine.submit(ids, params))
        time.sleep(rng.choice([0, 0, 0.001, 0.01]))
    return [r.wait(120).token_ids for r in requests]


def jobs_of(prompt_list, seed, longest_output=24):
    rng = random.Random(seed)
    return [(ids, greedy(rng.randrange(2, longest_output))) for ids in prompt_list]


def test_greedy_output_does_not_depend_on_the_batch(engine):
    jobs = jobs_of(prompts(12, 0, shared_prefix=40), seed=1)
    assert any(len(ids) > 2 * OPTIONS["chunk"] for ids, _ in jobs)  # chunked prompts
    alone = [engine.submit(ids, params).wait(60).token_ids for ids, params in jobs]
    hits = engine.stats()["prefix_hit_tokens"]
    together = submit_staggered(engine, jobs, seed=2)
    assert together == alone
    assert [len(t) for t in alone] == [p.max_tokens for _, p in jobs]
    # Prompts found cached pages (the shared 40-token prefix at least): hits were tested.
    assert engine.stats()["prefix_hit_tokens"] - hits >= 40


def test_prefix_hits_and_preemption_give_the_same_tokens(llm, engine):
    jobs = jobs_of(prompts(10, 3, shared_prefix=48), seed=4, longest_output=60)
    # The module's engine: prefix hits, and a small pool that preempts running requests.
    before = engine.stats()
    cached = submit_staggered(engine, jobs, seed=5)
    after = engine.stats()
    assert after["preemptions"] > before["preemptions"]
    assert after["prefix_hit_tokens"] > before["prefix_hit_tokens"]
    # No prefix cache, a pool that holds everything: nothing is preempted or reused.
    plain = new_engine(llm, warm_up=False, prefix_caching=False, kv_cache_bytes=4 << 20)
    try:
        assert submit_staggered(plain, jobs, seed=6) == cached
        assert plain.stats()["preemptions"] == 0
        assert plain.stats()["prefix_hit_tokens"] == 0
        check_no_leak(plain)
    finally:
        plain.stop()


def bytes_per_token(llm) -> int:
    cfg = llm.config
    return kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "float32")


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    params = [
        SamplingParams(
            max_tokens=12, temperature=t, top_k=k, top_p=p, min_p=m, seed=s, ignore_eos=True
        )
        for t, k, p, m, s in [
            (1.0, 0, 1.0, 0.0, 1),
            (0.7, 20, 0.9, 0.0, 2),
            (1.3, 0, 0.8, 0.05, 3),
            (0.9, 5, 1.0, 0.0, 4),
            (0.0, 0, 1.0, 0.0, 5),
            (1.0, 0, 1.0, 0.1, 6),
        ]
    ]
    jobs = list(zip(prompts(6, 6), params, strict=True))
    alone = [engine.submit(ids, p).wait(60).token_ids for ids, p in jobs]
    noise = [(ids, SamplingParams(max_tokens=8, temperature=1.0)) for ids in prompts(6, 7)]
    mixed = [job for pair in zip(jobs, noise, strict=True) for job in pair]
    together = submit_staggered(engine, mixed, seed=8)[::2]
    assert together == alone
    # Different seeds really give different samples (the comparison above is not vacuous).
    assert len({tuple(t) for t in alone}) == len(alone)


def random_params(rng: random.Random, prompt_len: int) -> SamplingParams:
    room = OPTIONS["max_seq_len"] - prompt_len
    return SamplingParams(
        max_tokens=rng.randrange(1, room + 1) if rng.random() < 0.03 else rng.randrange(1, 12),
        temperature=rng.choice([0, 0.5, 1.0, 1.5]),
        top_k=rng.choice([0, 1, 5, 50]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.1]),
        seed=rng.choice([None, rng.randrange(2**40)]),
        stop=rng.choice([(), ("a",), ("\n", "xyz")]),
        logprobs=rng.choice([None, None, 0, 3, 20]),
        prompt_logprobs=None if rng.random() < 0.9 else rng.choice([0, 5]),
    )


def run_mixed(engine, count, seed, cancel_fraction):
    """``count`` requests (shared prefixes, chunked prompts, random sampling, logprobs, some
    with n > 1), submitted in bursts; ``cancel_fraction`` of them cancelled at random moments
    from other threads."""
    rng = random.Random(seed)
    requests, cancellers = [], []
    for ids in prompts(count, seed, shared_prefix=rng.choice([0, 24]), longest=48):
        params = random_params(rng, len(ids))
        if rng.random() < 0.05:
            requests += engine.submit_many(ids, params, rng.choice([2, 3]))
        else:
            requests.append(engine.submit(ids, params))
        request = requests[-1]
        if rng.random() < cancel_fraction:
            delay = rng.choice([0, 0.001, 0.005, 0.02, 0.1])
            timer = threading.Timer(delay, request.cancel)
            timer.start()
            cancellers.append(timer)
        if rng.random() < 0.1:
            time.sleep(rng.choice([0.001, 0.01]))
    for timer in cancellers:
        timer.join()
    return [r.wait(300) for r in requests]


def test_no_compilation_after_warm_up(engine):
    # The module's engine was warmed up at start; its small pool makes the workload
    # preempted as well as chunked, prefix-hit and cancelled.
    before, stats_before = CompileCounter.count, engine.stats()
    # Four long requests at once need more than the 320-token pool: preemption is certain.
    long = [engine.submit(ids, greedy(120)) for ids in prompts(4, 13, longest=2)]
    outputs = run_mixed(engine, 500, seed=9, cancel_fraction=0.1)
    assert all(len(r.wait(300).token_ids) == 120 for r in long)
    assert CompileCounter.count == before, f"{CompileCounter.count - before} compiles"
    stats = engine.stats()
    assert stats["preemptions"] > stats_before["preemptions"], stats
    assert stats["prefix_hit_tokens"] > stats_before["prefix_hit_tokens"], stats
    assert sum(o.finish_reason != "cancelled" for o in outputs) > 400
    finished = [o for o in outputs if o.finish_reason != "cancelled"]
    for o in finished:
        assert len(o.logprobs) == (len(o.token_ids) if o.params.logprobs is not None else 0)
        if o.params.prompt_logprobs is not None:
            assert o.prompt_logprobs[0] is None and all(o.prompt_logprobs[1:])
    assert any(o.logprobs for o in finished) and any(o.prompt_logprobs for o in finished)


def test_cancels_never_leak_pages(engine):
    outputs = run_mixed(engine, 500, seed=10, cancel_fraction=0.3)
    reasons = {o.finish_reason for o in outputs}
    assert reasons <= {"stop", "length", "cancelled"} and "cancelled" in reasons
    check_no_leak(engine)
    assert engine.submit([1, 2, 3], greedy(5)).wait(60).token_ids


def test_a_cancel_storm_never_stops_the_engine(engine):
    stop = threading.Event()
    live = []

    def storm():
        rng = random.Random(threading.get_ident())
        while not stop.is_set():
            request = engine.submit(prompts(1, rng.randrange(1000))[0], greedy(40))
            live.append(request)
            if rng.random() < 0.5:
                request.cancel()
            elif live:
                live[rng.randrange(len(live))].cancel()

    threads = [threading.Thread(target=storm) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    for request in live:
        request.cancel()
    assert engine.failure is None
    check_no_leak(engine)
    assert len(engine.submit([5, 6], greedy(4)).wait(60).token_ids) == 4


def test_a_pool_of_8k_tokens_runs_32_requests_of_200_tokens_at_once(llm):
    engine = new_engine(
        llm,
        warm_up=False,
        max_num_seqs=64,
        max_step_tokens=64,
        chunk=64,
        page_size=16,
        kv_cache_bytes=8 * 1024 * bytes_per_token(llm),
    )
    try:
        assert engine.num_pages * engine.config.page_size == 8 * 1024
        peak = 0
        distinct = [[(i * 7 + j) % 256 for j in range(100)] for i in range(32)]
        requests = [engine.submit(ids, greedy(100)) for ids in distinct]
        while not all(r.done for r in requests):
            peak = max(peak, engine.stats()["running"])
            time.sleep(0.002)
        assert all(len(r.wait().token_ids) == 100 for r in requests)
        assert peak == 32
        assert engine.stats()["preemptions"] == 0
    finally:
        engine.stop()


def test_a_failing_step_fails_every_request_at_once(llm):
    engine = new_engine(llm, warm_up=False)
    real_step = engine._step
    calls = 0

    def failing(*args):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("injected device failure")
        return real_step(*args)

    engine._step = failing
    requests = [engine.submit(ids, greedy(50)) for ids in prompts(6, 12)]
    start = time.perf_counter()
    for request in requests:
        with pytest.raises(RuntimeError, match="injected device failure"):
            request.wait(30)
    assert time.perf_counter() - start < 10
    assert isinstance(engine.failure, RuntimeError)
    with pytest.raises(RuntimeError, match="engine failed"):
        engine.submit([1], greedy(1))
    engine.stop()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_num_seqs=0), "max_num_seqs must be an integer"),
        (dict(max_step_tokens=-5), "max_step_tokens must be an integer"),
        (dict(page_size=16, attention_block=40), "multiple of page_size"),
        (dict(chunk=True), "chunk must be an integer"),
        (dict(kv_cache_bytes=0), "kv_cache_bytes must be a positive integer"),
        (dict(kv_cache_dtype="fp4"), "unknown kv_cache_dtype"),
    ],
)
def test_bad_engine_options_fail_when_the_engine_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_a_pool_too_small_for_one_sequence_is_refused(llm):
    with pytest.raises(ValueError, match="fewer than one 256-token sequence needs"):
        new_engine(llm, warm_up=False, kv_cache_bytes=100 * bytes_per_token(llm))
    with pytest.raises(ValueError, match=r"unknown engine options \['max_slots'\]"):
        jaxllm.LLM.load(warm_up=False, start=False, max_slots=4)


def test_prompts_over_the_limit_are_rejected_not_truncated(engine):
    with pytest.raises(ValueError, match="256 tokens, more than the maximum of 255"):
        engine.submit(list(range(256)), greedy(1))
    with pytest.raises(ValueError, match="lower max_tokens to at most 56"):
        engine.submit(list(range(200)), greedy(57))
    out = engine.submit(list(range(200)), greedy(56)).wait(60)
    assert len(out.token_ids) == 56 and out.finish_reason == "length"
