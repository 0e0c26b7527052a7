"""Start-up: a second start of the same model and options compiles nothing (the persistent
compilation cache), the cache can be moved or turned off, and the start-up report is logged
and exposed. Each start is a fresh process, as a user's would be."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from server_process import REPO, write_model

CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import jaxllm
cache = {"off": False}.get(sys.argv[2], sys.argv[2])
llm = jaxllm.LLM.load(sys.argv[1], compilation_cache=cache, max_num_seqs=2, max_seq_len=64)
out = llm.generate([5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
print("REPORT " + json.dumps({**llm.engine.stats()["startup"], "tokens": out.token_ids}))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("startup_model"))


def start(model, cache) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(re.search(r"^REPORT (.*)$", proc.stdout, re.M).group(1))
    return report, proc.stderr


def test_a_second_start_compiles_nothing_and_answers_the_same(model, tmp_path):
    cache = tmp_path / "xla-cache"
    first, log = start(model, cache)
    assert first["cache_dir"] == str(cache) and any(cache.iterdir())
    assert first["programs_compiled"] > 0
    # One line per phase, with the figures the report holds.
    lines = ("start-up: read 0.00 GB of weights", "start-up: placed them", "start-up: ready in")
    for line in lines:
        assert line in log, log[-2000:]
    assert f"compiled {first['programs_compiled']} programs" in log
    assert first["total_s"] >= first["compile_s"] > 0 and first["read_s"] > 0

    second, log = start(model, cache)
    assert second["programs_compiled"] == 0, log[-2000:]
    assert second["programs_cached"] >= first["programs_compiled"]
    assert second["tokens"] == first["tokens"]
    assert second["compile_s"] < first["compile_s"]


def test_the_cache_can_be_turned_off(model, tmp_path):
    report, log = start(model, "off")
    assert report["cache_dir"] is None and report["programs_cached"] == 0
    assert report["programs_compiled"] > 0 and "compilation cache off" in log
