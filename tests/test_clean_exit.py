"""A script that loads an ``LLM``, generates and exits without closing it must exit 0.

The engine's daemon threads used to be still inside XLA when the interpreter finalized: it
killed them by unwinding through C++ frames and the process aborted ("terminate called after
throwing an instance of ''", "FATAL: exception not rethrown", status -6). Exiting while the
engine thread compiles a step did so every time; while it runs a decode step, about one
exit in five.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Small engine options: two step shapes to compile, so a run takes seconds.
SCRIPT = textwrap.dedent(
    """
    import sys
    import threading

    import jax

    import jaxllm

    mode = sys.argv[1]
    options = dict(max_seq_len=128, max_num_seqs=1, max_step_tokens=32, chunk=32)
    if mode == "compiling":  # no warm-up: the engine thread compiles its first step at exit
        lowered = threading.Event()

        def on_event(event, duration, **_):
            # Lowering to MLIR is done; XLA's compile (seconds, in C++) comes next.
            if event.endswith("jaxpr_to_mlir_module_duration"):
                if threading.current_thread().name == "jaxllm-engine":
                    lowered.set()

        jax.monitoring.register_event_duration_secs_listener(on_event)
        llm = jaxllm.LLM.load(warm_up=False, **options)
        llm.engine.submit([1, 2, 3], jaxllm.SamplingParams(max_tokens=8))
        assert lowered.wait(60)
    elif mode == "decoding":  # the engine thread is in the middle of a long generation
        llm = jaxllm.LLM.load(**options)
        pieces = llm.stream("def f(x):", max_tokens=100, ignore_eos=True)
        next(pieces)  # kept open: closing it would cancel the request
    print("exiting", flush=True)
    """
)


def _run(mode: str, cache: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        # An empty compilation cache of its own: every run compiles, as the bug needs.
        "JAX_COMPILATION_CACHE_DIR": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# Exiting mid-decode aborted less often than mid-compile, so it runs more times.
@pytest.mark.parametrize("mode, runs", [("compiling", 2), ("decoding", 4)])
def test_a_script_that_never_closes_its_llm_exits_cleanly(mode, runs, tmp_path):
    caches = [tmp_path / f"cache-{i}" for i in range(runs)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, [mode] * runs, caches))
    for done in results:
        message = f"exit status {done.returncode}:\n{done.stderr[-2000:]}"
        assert "exiting" in done.stdout, message
        assert "terminate called" not in done.stderr, message
        assert "FATAL" not in done.stderr, message
        assert done.returncode == 0, message
