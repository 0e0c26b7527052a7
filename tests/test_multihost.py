"""Multi-host serving on one machine: ``scripts/launch_local.sh`` runs 2 processes x 4 CPU
devices over loopback (JAX's gloo CPU collectives), serving an Orbax checkpoint on an
8-device global mesh through process 0's gRPC port; and replicas behind one client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import jaxllm
from jaxllm import orbax_checkpoint
from serve.client import Client
from server_process import REPO, ServerProcess, write_model

MESH = "tensor=8"  # every layer's matmuls cross the process boundary
ENGINE = dict(max_slots=4, max_seq_len=64, max_prompt_len=16)  # 2 prefill shapes, 1 decode
PROMPTS = ["def f(x):", "hello", "import os", "a = [1, 2", "class A:", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = write_model(tmp_path_factory.mktemp("multihost_hf"))
    return orbax_checkpoint.convert_hf_to_orbax(hf, tmp_path_factory.mktemp("mh") / "orbax")


class LocalCluster:
    """``scripts/launch_local.sh N`` with each process's output in its own log file."""

    def __init__(self, n: int, args: list[str], log_dir: Path):
        self.log_dir = log_dir
        env = {**os.environ, "JAXLLM_LOG_DIR": str(log_dir), "PYTHON": sys.executable}
        self._out = open(log_dir / "launch.log", "w")
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "launch_local.sh"), str(n), *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        pids = self._wait_for(lambda: re.findall(r"process (\d+) pid (\d+)", self.launch_log()))
        while len(pids) < n:
            time.sleep(0.05)
            pids = re.findall(r"process (\d+) pid (\d+)", self.launch_log())
        self.pids = {int(i): int(pid) for i, pid in pids}
        found = self._wait_for(lambda: re.search(r"serving \S+ on [\d.]+:(\d+)", self.log(0)))
        self.target = f"127.0.0.1:{found.group(1)}"

    def launch_log(self) -> str:
        return (self.log_dir / "launch.log").read_text(errors="replace")

    def log(self, process: int) -> str:
        path = self.log_dir / f"process-{process}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_for(self, probe, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := probe():
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"cluster did not start:\n{self.launch_log()}\n{self.log(0)[-3000:]}")

    def alive(self, process: int) -> bool:
        try:
            os.kill(self.pids[process], 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, not yet reaped by the launcher) counts as gone.
        stat = Path(f"/proc/{self.pids[process]}/stat")
        return stat.exists() and stat.read_text().split()[2] != "Z"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self._out.close()


@pytest.fixture(scope="module")
def cluster(checkpoint, tmp_path_factory):
    args = ["--model", str(checkpoint), "--mesh", MESH, "--port", "0", "--no-metrics"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    args += ["--peer-timeout-s", "10"]
    cluster = LocalCluster(2, args, tmp_path_factory.mktemp("multihost_logs"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """One process, the same checkpoint, mesh shape and engine shapes as the cluster."""
    with jaxllm.LLM.load(checkpoint, mesh=MESH, warm_up=False, **ENGINE) as llm:
        yield llm


def test_two_processes_serve_the_same_text_as_one_process(cluster, reference):
    with Client(cluster.target) as client:
        with_seed = dict(max_tokens=20, temperature=0.9, top_k=40, seed=7)
        # More requests than slots, sent together: admissions, slot reuse and frees all go
        # through the lockstep channel, and one request samples with a seed.
        with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            greedy = list(
                pool.map(lambda p: client.generate(p, max_tokens=24, temperature=0), PROMPTS)
            )
            sampled = pool.submit(client.generate, PROMPTS[0], **with_seed).result()
    expected = reference.generate(PROMPTS, max_tokens=24, temperature=0)
    for got, want in zip(greedy, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
    assert sampled.token_ids == reference.generate(PROMPTS[0], **with_seed).token_ids
    assert len({tuple(r.token_ids) for r in greedy}) > 1  # the prompts matter
    # Process 1 replayed the calls and, restoring the checkpoint, held only its shards.
    assert "process 1 following 127.0.0.1:" in cluster.log(1)
    held, total = map(int, re.search(r"process 1 holds (\d+) of (\d+)", cluster.log(1)).groups())
    assert 0 < held < total


def test_killing_the_follower_ends_the_leader_with_an_error(cluster):
    """A stream is running when process 1 is killed: it fails, and process 0 exits non-zero
    on its own (well within --peer-timeout-s), saying which process it lost."""
    with Client(cluster.target) as client:
        stream = client.generate_stream("def f(x):", max_tokens=40, temperature=0, ignore_eos=True)
        next(stream)  # running
        killed = time.monotonic()
        os.kill(cluster.pids[1], signal.SIGKILL)
        with pytest.raises(grpc.RpcError):  # UNAVAILABLE from the engine, or the exit
            for _ in stream:
                pass
    while cluster.alive(0) and time.monotonic() - killed < 60:
        time.sleep(0.05)
    detected = time.monotonic() - killed
    print(f"leader exited {detected:.2f} s after its follower was killed")
    assert not cluster.alive(0), "the leader hangs after losing its follower"
    assert detected < 10
    assert cluster.stop() != 0  # launch_local.sh reports the failure
    launch = cluster.launch_log()
    # The leader's own exit status and message, not the launcher's clean-up signal.
    assert re.search(r"process 0 \(pid \d+\) exited with status 3", launch), launch
    assert "lost a process: process 1" in cluster.log(0)


def _requests_ok(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return float(re.search(r'jaxllm_requests_total\{outcome="ok"\} (\S+)', text).group(1))


def test_a_client_spreads_requests_over_two_replicas(checkpoint, tmp_path):
    args = ["--model", str(checkpoint), "--metrics-port", "0", "--max-seq-len", "64"]
    args += ["--max-prompt-len", "16", "--max-slots", "2"]
    replicas = [ServerProcess(args, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for replica in replicas:
            with grpc.insecure_channel(replica.target) as channel:
                replica.wait_ready(channel)
        # A list of targets: the client takes them in turn.
        with Client(",".join(r.target for r in replicas)) as client:
            results = [client.generate("hello", max_tokens=8, temperature=0) for _ in range(6)]
        assert [_requests_ok(r) for r in replicas] == [3, 3]
        assert len({tuple(r.token_ids) for r in results}) == 1  # same model, same answer
        # One name resolving to both (as a Kubernetes headless service does): gRPC's
        # round_robin policy spreads the calls of a single channel.
        name = "ipv4:" + ",".join(r.target for r in replicas)
        with Client(name) as client:
            for _ in range(8):
                client.generate("hello", max_tokens=2, temperature=0, timeout=30)
        counts = [_requests_ok(r) - 3 for r in replicas]
        assert sum(counts) == 8 and min(counts) >= 2, counts
    finally:
        for replica in replicas:
            assert replica.terminate() == 0, replica.log()[-2000:]
