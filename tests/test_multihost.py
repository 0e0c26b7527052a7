"""Multi-host serving on one machine: ``scripts/launch_local.sh`` runs 2 processes x 4 CPU
devices over loopback (JAX's gloo CPU collectives), serving an Orbax checkpoint on an
8-device global mesh through process 0's gRPC port; and replicas behind one client."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

import jaxllm
from jaxllm import orbax_checkpoint
from serve.client import Client
from server_process import REPO, ServerProcess, write_model

MESH = "tensor=8"  # every layer's matmuls cross the process boundary
# Step shapes: decode rows 1, 2 or 4 by prefill rows 0, 1 or 2, so 9 programs to compile.
# The pool's size is given (32 pages: 4 sequences of 64 tokens): sized by itself, the engine
# asks the mesh's first device for its memory, which process 1 cannot address.
ENGINE = dict(max_num_seqs=4, max_seq_len=64, max_step_tokens=32, chunk=16, kv_cache_bytes=1 << 20)
# The last prompt takes 3 chunks of prefill, next to other prompts' chunks and decodes.
PROMPTS = ["def f(x):", "hello", "import os", "a = [1, 2", "class A:", "x", "y = 1\n" * 6]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict[str, str]:
    """JAX's persistent compilation cache, fresh for this module: the servers started here
    compile the same programs, and only the first one needs to (it saves ~30 s per start)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = write_model(tmp_path_factory.mktemp("multihost_hf"))
    return orbax_checkpoint.convert_hf_to_orbax(hf, tmp_path_factory.mktemp("mh") / "orbax")


class LocalCluster:
    """``scripts/launch_local.sh N`` with each process's output in its own log file."""

    def __init__(self, n: int, args: list[str], log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        env = {**os.environ, **env, "JAXLLM_LOG_DIR": str(log_dir), "PYTHON": sys.executable}
        self._out = open(log_dir / "launch.log", "w")
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "launch_local.sh"), str(n), *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal would give it
        )
        pids = self._wait_for(lambda: re.findall(r"process (\d+) pid (\d+)", self.launch_log()))
        while len(pids) < n:
            time.sleep(0.05)
            pids = re.findall(r"process (\d+) pid (\d+)", self.launch_log())
        self.pids = {int(i): int(pid) for i, pid in pids}
        self.target: str | None = None

    def wait_serving(self) -> str:
        if self.target is None:
            pattern = r"serving \S+ on [\d.]+:(\d+)"
            found = self._wait_for(lambda: re.search(pattern, self.log(0)))
            self.target = f"127.0.0.1:{found.group(1)}"
        return self.target

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

    def stop(self) -> int:
        """SIGTERM to the launcher and every process at once, as Ctrl-C or Kubernetes does."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self._out.close()


def engine_yaml(folder: Path, engine: dict) -> Path:
    """A ServeConfig YAML holding only engine options (some, like ``chunk``, have no flag)."""
    path = folder / "engine.yaml"
    path.write_text(yaml.safe_dump({"engine": engine}))
    return path


@pytest.fixture(scope="module")
def serve_args(tmp_path_factory) -> list[str]:
    config = engine_yaml(tmp_path_factory.mktemp("multihost_config"), ENGINE)
    args = ["--config", str(config), "--mesh", MESH, "--port", "0", "--no-metrics"]
    return [*args, "--peer-timeout-s", "10"]


@pytest.fixture(scope="module")
def cluster(checkpoint, serve_args, tmp_path_factory, compile_cache):
    """Launched, not yet waited for: it compiles while the reference does."""
    args = ["--model", str(checkpoint), *serve_args]
    logs = tmp_path_factory.mktemp("multihost_logs")
    cluster = LocalCluster(2, args, logs, compile_cache)
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
    with_seed = dict(max_tokens=20, temperature=0.9, top_k=40, seed=7)
    # The reference first: it compiles while the cluster is still starting.
    expected = reference.generate(PROMPTS, max_tokens=24, temperature=0)
    expected_sampled = reference.generate(PROMPTS[0], **with_seed)
    with Client(cluster.wait_serving()) as client:
        # More requests than max_num_seqs, sent together: admissions, prompt chunks next to
        # decodes, page reuse and frees all go through the lockstep channel, and one request
        # samples with a seed.
        with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            sampled = pool.submit(client.generate, PROMPTS[0], **with_seed)
            greedy = list(
                pool.map(lambda p: client.generate(p, max_tokens=24, temperature=0), PROMPTS)
            )
            sampled = sampled.result()
    for got, want in zip(greedy, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
    assert sampled.token_ids == expected_sampled.token_ids
    assert len({tuple(r.token_ids) for r in greedy}) > 1  # the prompts matter
    # Process 1 replayed the calls and, restoring the checkpoint, held only its shards.
    assert "process 1 following 127.0.0.1:" in cluster.log(1)
    held, total = map(int, re.search(r"process 1 holds (\d+) of (\d+)", cluster.log(1)).groups())
    assert 0 < held < total


def test_stopping_the_launcher_drains_the_leader_and_stops_the_followers(cluster):
    """SIGTERM reaches the launcher and every process at once; the followers keep stepping
    until the leader has drained and tells them to stop; everyone, launcher too, exits 0."""
    cluster.wait_serving()
    assert cluster.stop() == 0, cluster.launch_log() + cluster.log(0)[-2000:]
    for process in (0, 1):
        assert re.search(
            rf"process {process} \(pid \d+\) exited with status 0", cluster.launch_log()
        )
    assert "the leader stopped" in cluster.log(1)


@pytest.fixture
def slurm_cluster(checkpoint, serve_args, tmp_path, compile_cache):
    """The SLURM task script run as srun would (fake SLURM variables, JAX's detection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tasks, logs = [], [tmp_path / f"task-{i}.log" for i in range(2)]
    for i, log in enumerate(logs):
        env = {
            **os.environ,
            **compile_cache,
            **dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2"),
            **dict(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port)),
            **dict(JAXLLM_DIR=str(REPO), JAXLLM_PYTHON=sys.executable, JAXLLM_PORT="0"),
            "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        }
        args = ["--model", str(checkpoint), *serve_args, "--host", "127.0.0.1"]
        with open(log, "w") as out:
            command = ["bash", str(REPO / "scripts" / "slurm_task.sh"), *args]
            tasks.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 300
        while not (found := re.search(r"serving \S+ on [\d.]+:(\d+)", logs[0].read_text())):
            assert time.monotonic() < deadline and all(t.poll() is None for t in tasks), (
                logs[0].read_text()[-3000:] + logs[1].read_text()[-2000:]
            )
            time.sleep(0.1)
        yield tasks, logs, f"127.0.0.1:{found.group(1)}"
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
                task.wait()


def test_killing_the_follower_ends_the_leader_with_an_error(slurm_cluster):
    """A stream is running when process 1 is killed: it fails, and process 0 exits non-zero
    on its own (well within --peer-timeout-s), saying which process it lost."""
    (leader, follower), (leader_log, follower_log), target = slurm_cluster
    # The follower dialled the side channel at the coordinator host JAX detected.
    assert "process 1 following localhost:" in follower_log.read_text()
    with Client(target) as client:
        stream = client.generate_stream("def f(x):", max_tokens=40, temperature=0, ignore_eos=True)
        next(stream)  # running
        killed = time.monotonic()
        follower.kill()
        with pytest.raises(grpc.RpcError):  # UNAVAILABLE from the engine, or the exit
            for _ in stream:
                pass
        code = leader.wait(60)
    detected = time.monotonic() - killed
    print(f"leader exited {detected:.2f} s after its follower was killed")
    assert code == 3 and detected < 10
    assert "lost a process: process 1" in leader_log.read_text()


def _requests_ok(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return float(re.search(r'jaxllm_requests_total\{outcome="ok"\} (\S+)', text).group(1))


def test_a_client_spreads_requests_over_two_replicas(checkpoint, tmp_path, compile_cache):
    engine = dict(max_num_seqs=1, max_seq_len=32, max_step_tokens=16, chunk=16)  # 2 shapes
    args = ["--model", str(checkpoint), "--metrics-port", "0"]
    args += ["--config", str(engine_yaml(tmp_path, engine))]
    replicas = []
    try:
        for i in range(2):  # one after the other: the second finds every program compiled
            replicas.append(ServerProcess(args, tmp_path / f"replica{i}.log", compile_cache))
            with grpc.insecure_channel(replicas[-1].target) as channel:
                replicas[-1].wait_ready(channel)
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
