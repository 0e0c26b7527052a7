"""A real ``jaxllm serve`` process on localhost for tests, and the tiny model it serves."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hf_models
from jaxllm.tokenizer import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
SERVICE = "jaxllm.v1.LLM"


def write_model(path: Path) -> Path:
    hf_models.write("llama3_gqa", path)
    byte_level_tokenizer().save(path)
    return path


class ServerProcess:
    """``python -m serve.cli serve ARGS`` with one CPU device; ports are read from its output."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        environment = {
            **os.environ,
            # One device: quick compiles, and the same programs as the in-process reference.
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self._log = open(log_path, "w")
        command = [sys.executable, "-m", "serve.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.port = int(self._wait_for(r"jaxllm: listening on [\d.]+:(\d+)", 120))
        metrics = re.search(r"jaxllm: metrics on (http://\S+)", self.log())
        self.metrics_url = metrics.group(1) if metrics else None
        self.target = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the server log:\n{self.log()[-3000:]}")

    def wait_ready(self, channel: grpc.Channel, timeout: float = 300) -> None:
        """Until health says SERVING (it says NOT_SERVING while the model loads)."""
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def health(channel: grpc.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@contextlib.contextmanager
def serving(args: list[str], log_path: Path) -> Iterator[ServerProcess]:
    """A plaintext server process, ready (health SERVING); on exit SIGTERM, after which it
    must drain and exit 0."""
    proc = ServerProcess(args, log_path)
    try:
        with grpc.insecure_channel(proc.target) as channel:
            proc.wait_ready(channel)
        yield proc
    finally:
        code = proc.terminate()
        assert code == 0, proc.log()[-3000:]
