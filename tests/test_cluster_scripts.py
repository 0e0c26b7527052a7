"""The cluster launchers as far as one machine allows: shellcheck on every script, the SLURM
task run for real as 2 processes under fake SLURM variables (JAX's own SLURM detection), the
TPU and SLURM launch commands in dry runs, and the Kubernetes manifests parsed and checked
against the CLI. Also the multi-host start-up's input checks and the lockstep channel's
timeouts, on real sockets."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxllm import lockstep, step
from jaxllm.engine_config import EngineConfig
from jaxllm.request import Request
from jaxllm.request_output import RequestOutput
from jaxllm.sampling import SamplingParams
from jaxllm.scheduler import Chunk, Sequence, StepPlan
from jaxllm.tokenizer import byte_level_tokenizer
from serve import cli
from serve.config import ServeConfig
from server_process import REPO

SCRIPTS = REPO / "scripts"
SHELL_SCRIPTS = sorted([*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("*.sbatch")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, env=None, timeout=60) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        args, env=environment, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_every_script_passes_shellcheck():
    assert {p.name for p in SHELL_SCRIPTS} >= {
        "launch_local.sh",
        "launch_tpu_pod.sh",
        "slurm_serve.sbatch",
        "slurm_task.sh",
    }
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = _run([shellcheck, "--shell=bash", *map(str, SHELL_SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    for path in SHELL_SCRIPTS:
        assert os.access(path, os.X_OK), f"{path.name} is not executable"


def test_launch_local_rejects_bad_process_counts():
    usage = _run(["bash", str(SCRIPTS / "launch_local.sh"), "two"])
    assert usage.returncode == 2 and "usage:" in usage.stderr
    uneven = _run(["bash", str(SCRIPTS / "launch_local.sh"), "3"], {"JAXLLM_CPU_DEVICES": "8"})
    assert uneven.returncode == 2
    assert "8 CPU devices do not split evenly over 3 processes" in uneven.stderr


def _slurm_env(process: int, port: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(process),
        "SLURM_LOCALID": str(process),
        "SLURM_SUBMIT_DIR": str(REPO),
        "JAX_COORDINATOR_PORT": str(port),  # JAX's override of the job-id-derived port
        "JAXLLM_PYTHON": sys.executable,
        "JAXLLM_COMMAND": "cluster-info",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }


def test_slurm_tasks_join_through_jax_slurm_detection():
    """Two tasks with the variables srun would give them: JAX finds the coordinator (the
    step's first node), the process ids and count, and a collective spans both processes."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tasks = [
        subprocess.Popen(
            ["bash", str(SCRIPTS / "slurm_task.sh")],
            env={**env, **_slurm_env(i, port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    outputs, hung = [], False
    for task in tasks:
        try:
            outputs.append(task.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            hung = True
            task.kill()  # a hung task must not outlive the test; its output is the clue
            outputs.append(task.communicate()[0])
    assert not hung, "\n---\n".join(output[-2000:] for output in outputs)
    for i, (task, output) in enumerate(zip(tasks, outputs, strict=True)):
        assert task.returncode == 0, output[-3000:]
        assert f"process {i} of 2: 4 local of 8 cpu devices" in output, output[-3000:]
        assert "all-gather saw processes [0, 1]" in output


def test_slurm_task_outside_slurm_names_the_missing_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_task.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "$SLURM_JOB_ID is not set" in result.stderr


def test_slurm_batch_script_runs_one_task_per_gpu_through_srun():
    text = (SCRIPTS / "slurm_serve.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    # JAX's SLURM detection gives each task the GPU SLURM_LOCALID: one task per GPU.
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    env = {"JAXLLM_DRY_RUN": "1", "SLURM_SUBMIT_DIR": "/shared/jaxllm"}
    result = _run(["bash", str(SCRIPTS / "slurm_serve.sbatch"), "--model", "/ckpt/my model"], env)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    task = "/shared/jaxllm/scripts/slurm_task.sh"
    assert command[-4:] == ["bash", task, "--model", "/ckpt/my model"]


def test_tpu_pod_launcher_runs_every_worker_with_jax_detection():
    env = {"JAXLLM_DRY_RUN": "1", "TPU_NAME": "slice-1", "ZONE": "us-west4-a", "PROJECT": "p"}
    args = ["--model", "/mnt/ckpt", "--sample", "def f(x):"]
    result = _run(["bash", str(SCRIPTS / "launch_tpu_pod.sh"), *args], env)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert {"slice-1", "--worker=all", "us-west4-a", "p"} <= set(command)
    remote = shlex.split(command[command.index("--command") + 1])
    serve = remote[remote.index("python3") :]
    parsed = cli.build_parser().parse_args(serve[3:])  # after "python3 -m serve.cli"
    assert parsed.distributed and parsed.host == "0.0.0.0"
    assert parsed.model == "/mnt/ckpt" and parsed.sample_prompt == "def f(x):"
    missing = _run(["bash", str(SCRIPTS / "launch_tpu_pod.sh")], {"TPU_NAME": "", "ZONE": "z"})
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr


def _manifests(name: str) -> dict[str, dict]:
    docs = list(yaml.safe_load_all((SCRIPTS / "k8s" / name).read_text()))
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _serve_args(container: dict, env: dict[str, str]):
    """The container's command line as the CLI parses it, with $(VAR) expanded as the
    kubelet does."""
    words = container["command"] + container.get("args", [])
    words = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], w) for w in words]
    assert words[:3] == ["python3", "-m", "serve.cli"]
    return cli.build_parser().parse_args(words[3:])


def test_indexed_job_manifest_wires_processes_to_process_0():
    found = _manifests("jaxllm-indexed-job.yaml")
    job, hosts, front = found["Job/jaxllm"], found["Service/jaxllm-hosts"], found["Service/jaxllm"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    assert hosts["spec"]["clusterIP"] == "None" and front["spec"]["clusterIP"] == "None"
    assert hosts["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == "jaxllm-hosts"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert hosts["spec"]["selector"].items() <= labels.items()
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["JAXLLM_NUM_PROCESSES"]["value"]) == spec["completions"]
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["JAXLLM_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    host, port = env["JAXLLM_COORDINATOR"]["value"].split(":")
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"  # pod 0's DNS name
    assert int(port) in {p["port"] for p in hosts["spec"]["ports"]}
    # Clients reach process 0 only, on the port it serves.
    assert front["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    args = _serve_args(container, {})
    ports = {p["name"]: p["port"] for p in front["spec"]["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}
    assert {p["name"]: p["containerPort"] for p in container["ports"]}.items() >= ports.items()
    assert args.host == "0.0.0.0"


def test_leaderworkerset_manifest_gives_every_pod_its_place():
    found = _manifests("jaxllm-lws.yaml")
    lws, front = found["LeaderWorkerSet/jaxllm"], found["Service/jaxllm-grpc"]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert lws["spec"]["replicas"] >= 2 and template["size"] >= 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    env = {"LWS_LEADER_ADDRESS": "jaxllm-0.jaxllm", "LWS_GROUP_SIZE": str(template["size"])}
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    lead = _serve_args(leader, {**env, "LWS_WORKER_INDEX": "0"})
    follow = _serve_args(worker, {**env, "LWS_WORKER_INDEX": "1"})
    assert (lead.process_id, follow.process_id) == (0, 1)
    assert lead.num_processes == follow.num_processes == template["size"]
    assert lead.coordinator == follow.coordinator == "jaxllm-0.jaxllm:8476"
    assert lead.model == follow.model and lead.mesh == follow.mesh  # one program
    probe = leader["readinessProbe"]["grpc"]
    assert probe == {"port": lead.port, "service": "jaxllm.v1.LLM"}
    ports = {p["name"]: p["port"] for p in front["spec"]["ports"]}
    assert ports == {"grpc": lead.port, "http": lead.http_port, "metrics": lead.metrics_port}
    assert {p["name"]: p["containerPort"] for p in leader["ports"]}.items() >= ports.items()
    assert front["spec"]["clusterIP"] == "None"
    labels = template["leaderTemplate"]["metadata"]["labels"]
    assert front["spec"]["selector"].items() <= labels.items()
    worker_labels = template["workerTemplate"]["metadata"]["labels"]
    assert not front["spec"]["selector"].items() <= worker_labels.items()


# -- start-up input checks --------------------------------------------------------------------


def test_incomplete_process_flags_are_clear_errors(capsys):
    code = cli.main(["serve", "--num-processes", "2", "--process-id", "0"])
    assert code == 2
    assert "missing ['coordinator']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        ServeConfig(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="coordinator must be 'host:port'"):
        ServeConfig(coordinator="nohost", num_processes=2, process_id=0)
    os.environ["JAXLLM_PROCESS_ID"] = "first"
    try:
        assert cli.main(["serve", "--coordinator", "h:1", "--num-processes", "2"]) == 2
        assert "$JAXLLM_PROCESS_ID must be a non-negative integer" in capsys.readouterr().err
    finally:
        del os.environ["JAXLLM_PROCESS_ID"]


# -- the lockstep channel's timeouts, on real sockets -----------------------------------------


def test_a_silent_leader_makes_the_follower_fail_fast():
    """A leader that accepted the follower and then says nothing (a vanished host)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]} token"
        start = time.monotonic()
        with pytest.raises(lockstep.PeerLost, match="no word from the leader for 1 s"):
            lockstep.follow(Recorder(), address, 1, timeout_s=1.0, connect_timeout_s=5)
        assert time.monotonic() - start < 5


def test_a_silent_follower_is_reported_and_a_wrong_token_refused():
    lost = []
    leader = lockstep.Leader("127.0.0.1", 1, timeout_s=1.0, on_lost=lost.append)
    host, port = leader.address.split(":")
    intruder = socket.create_connection((host, int(port)))
    intruder.sendall(lockstep._encode("hello", process=1, token="wrong"))
    silent = socket.create_connection((host, int(port)))
    silent.sendall(lockstep._encode("hello", process=1, token=leader.token))
    leader.accept(timeout_s=10)
    assert intruder.recv(1) == b""  # refused: closed without a word
    start = time.monotonic()
    while not lost and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert lost == ["process 1 sent no heartbeat for 1 s"]
    with pytest.raises(lockstep.PeerLost):  # the engine's next call fails instead of hanging
        leader.step(step.padding_only((1, 0), EngineConfig(max_seq_len=64), num_pages=8))
    silent.close()
    intruder.close()


def test_followers_that_never_join_time_out_by_name():
    leader = lockstep.Leader("127.0.0.1", 2, timeout_s=1.0)
    host, port = leader.address.split(":")
    with socket.create_connection((host, int(port))) as joined:
        joined.sendall(lockstep._encode("hello", process=2, token=leader.token))
        with pytest.raises(lockstep.PeerLost, match=r"processes \[1\] did not join within 1 s"):
            leader.accept(timeout_s=1.0)


class Recorder:
    """Takes a follower's replayed calls (an Engine would run them on the devices)."""

    def __init__(self):
        self.calls = []

    def run_step(self, inp):
        self.calls.append(inp)


def _request(prompt: list[int], params: SamplingParams) -> Request:
    output = RequestOutput(byte_level_tokenizer(), params, prompt)
    return Request("r", prompt, output, params.seed)


def test_the_follower_replays_exactly_what_the_leader_sends():
    """Every array of a step (0-d block counts and empty row groups included) arrives with
    its dtype, shape and values, in the same tree."""
    config = EngineConfig(max_num_seqs=4, max_seq_len=64, max_step_tokens=32, chunk=16)
    num_pages = 20
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=2**62 + 5)
    greedy = SamplingParams(temperature=0.0, top_k=3, seed=9)
    decoding = Sequence(
        "d", [5, 6, 7, 8, 9], 3, 16, payload=_request([5, 6, 7], params), computed=4, pages=[3]
    )
    prompt = list(range(40, 60))
    chunked = Sequence(
        "p", prompt, 20, 16, payload=_request(prompt, greedy), computed=16, pages=[7, 2]
    )
    plan = StepPlan(decodes=[decoding], prefills=[Chunk(chunked, 16, 4, True)])  # the last 4
    steps = [
        step.build(plan, config, num_pages),
        step.padding_only((4, 0), config, num_pages),  # no prefill rows: [0, Pmax] arrays
    ]
    assert steps[0].decode_blocks.shape == (1,) and steps[1].prefill_pages.shape[0] == 0
    leader = lockstep.Leader("127.0.0.1", 1, timeout_s=5.0)
    recorder, calls = Recorder(), []
    follower = threading.Thread(
        target=lambda: calls.append(lockstep.follow(recorder, leader.announcement, 1))
    )
    follower.start()
    leader.accept(timeout_s=10)
    for inp in steps:
        leader.step(inp)
    leader.close()
    follower.join(10)
    assert calls == [2] and len(recorder.calls) == 2
    for want, got in zip(steps, recorder.calls, strict=True):
        assert isinstance(got, step.StepInput) and got.shape == want.shape
        assert jax.tree.structure(got) == jax.tree.structure(want)
        leaves = zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
        for i, (a, b) in enumerate(leaves):
            a = np.asarray(a)
            assert (b.dtype, b.shape) == (a.dtype, a.shape), i
            assert np.array_equal(a, b), i
    # The 64-bit seed's high word made it across.
    assert recorder.calls[0].sampling.seed[0].tolist() == [2**30, 5]
