"""Background compile (``jaxllm.staged_warm_up``): an engine serves once its one-row
programs are compiled, every step meanwhile stays within the compiled shapes (nothing
compiles on the engine thread), and once the background thread is done the engine is as
warm as one that compiled everything first."""

import threading
import time

import jax
import pytest

import jaxllm
from jaxllm import staged_warm_up
from jaxllm.engine_config import EngineConfig
from jaxllm.sampling import SamplingParams


@pytest.mark.parametrize(
    "options",
    [
        dict(max_num_seqs=8),
        dict(max_num_seqs=16, speculative="ngram"),
        dict(max_num_seqs=4, max_step_tokens=16, chunk=16),  # one prefill row at most
    ],
)
def test_stages_grow_and_end_with_every_step_shape(options):
    config = EngineConfig(**options)
    stages = staged_warm_up.stages(config)
    (first, first_shapes), *later = staged_warm_up.plan(config)
    assert (
        first == stages[0] == (1, 1, 0)
        and first_shapes == [(1, 0, 1), (1, 1, 1)][: len(first_shapes)]
    )
    for before, after in zip(stages, stages[1:], strict=False):
        assert all(a >= b for a, b in zip(after, before, strict=True)) and after != before
    last = stages[-1]
    assert last.decode_rows == config.max_num_seqs
    assert last.prefill_rows == config.max_prefill_rows
    assert last.draft_rows == max(config.verify_buckets, default=0)
    added = [shape for _, shapes in later for shape in shapes]
    assert sorted(first_shapes + added) == sorted(config.step_shapes)  # each shape once
    assert len(set(added)) == len(added)


def _compile_threads():
    """Names of the threads that compile XLA programs from now on."""
    names: list[str] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return names


def test_serves_during_background_compile_and_ends_fully_warm():
    compile_threads = _compile_threads()
    llm = jaxllm.LLM.load(None, max_num_seqs=4, background_compile=True)
    engine = llm.engine
    assert not engine._warming.finished  # serving already, later stages still compiling
    try:
        greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        prompts = [llm.tokenizer.encode(f"def f{i}(x):\n    return x * {i}") for i in range(6)]
        # At once: the first requests run while later stages compile (within their caps).
        early = [engine.submit(p, greedy) for p in prompts]
        early = [list(r.wait(300).token_ids) for r in early]
        engine.wait_compiled()
        startup = engine.stats()["startup"]
        assert startup["background_compile_s"] > 0
        assert startup["programs_compiled"] + startup["programs_cached"] >= len(
            engine.config.step_shapes
        )
        assert engine.scheduler.max_num_seqs == 4
        assert engine.scheduler.max_prefill_rows == engine.config.max_prefill_rows
        # Fully warm: the same requests, batched as they come, compile nothing and give the
        # same tokens (a row's result does not depend on its batch).
        compiles = len(compile_threads)
        late = [engine.submit(p, greedy) for p in prompts]
        assert [list(r.wait(300).token_ids) for r in late] == early
        assert len(compile_threads) == compiles
        assert "jaxllm-engine" not in compile_threads, compile_threads
    finally:
        llm.close()


def test_stop_during_background_compile_returns():
    llm = jaxllm.LLM.load(None, max_num_seqs=16, background_compile=True)
    start = time.perf_counter()
    llm.close()  # waits for the stage being compiled, not for the ones after it
    assert time.perf_counter() - start < 60
    assert llm.engine._warming.finished  # no thread left inside XLA at exit
    assert llm.engine.stats()["startup"]["background_compile_s"] == 0  # stopped early


def test_server_is_ready_before_every_shape_compiles_and_answers_concurrent_requests(tmp_path):
    """`jaxllm serve` with background compile (the default outside this suite): health says
    SERVING after the first stage; concurrent requests all complete, greedy output equals the
    in-process engine's, and the log reports the background compile's end."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from serve.client import Client
    from server_process import ServerProcess

    env = {"JAXLLM_BACKGROUND_COMPILE": "1"}
    args = ["--compilation-cache", "off", "--max-num-seqs", "8"]  # 12 step shapes, not 21
    server = ServerProcess(args, tmp_path / "server.log", env)
    try:
        server.wait_ready(grpc.insecure_channel(server.target))
        log = server.log()
        assert "step shapes compile while serving" in log and "every step shape compiled" not in log
        client = Client(server.target)
        prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            texts = list(
                pool.map(lambda p: client.generate(p, max_tokens=16, temperature=0).text, prompts)
            )
        deadline = time.monotonic() + 300
        while "every step shape compiled" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "every step shape compiled" in server.log()
        assert client.stats().startup.total_seconds > 0
    finally:
        assert server.terminate() == 0
    llm = jaxllm.LLM.load(None, background_compile=False, max_num_seqs=1)
    try:
        assert texts == [llm.generate(p, max_tokens=16, temperature=0).text for p in prompts]
    finally:
        llm.close()
