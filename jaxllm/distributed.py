"""Process start-up for multi-host serving on JAX's own multi-controller runtime.

Every process of a multi-host server calls ``initialize`` before anything touches a device;
afterwards ``jax.devices()`` lists every process's devices, so one global mesh spans them all
(``sharding.make_mesh`` builds it from ``jax.devices()`` as on one host).

Where the coordinator, process count and process id come from:
  * given explicitly (``jaxllm serve --coordinator HOST:PORT --num-processes N --process-id I``,
    or the ``JAXLLM_*`` variables the CLI reads), e.g. ``scripts/launch_local.sh`` and the
    Kubernetes manifests;
  * detected by JAX (``auto=True``, ``--distributed``) on Cloud TPU VMs, SLURM jobs, Open MPI
    and Kubernetes (``jax.distributed.initialize()`` with no arguments): the TPU pod and SLURM
    launchers rely on it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = None  # "host:port" of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let JAX detect a TPU pod slice, SLURM, MPI or Kubernetes job
    init_timeout_s: int = 300  # how long every process waits for the others to start
    # A process that misses heartbeats for this long is declared dead by JAX's coordination
    # service; serving's own watchdog (``jaxllm.lockstep``) usually notices sooner.
    heartbeat_timeout_s: int = 100

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and not self.auto:
            names = ("coordinator", "num_processes", "process_id")
            missing = [name for name, v in zip(names, explicit, strict=True) if v is None]
            if missing:
                raise ValueError(
                    f"multi-process start-up needs coordinator, num_processes and process_id "
                    f"(or auto-detection); missing {missing}"
                )
        if self.coordinator is not None:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"coordinator must be 'host:port', got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None:
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(
                    f"process_id must be in [0, {self.num_processes}), got {self.process_id}"
                )

    @property
    def enabled(self) -> bool:
        """Whether this process is one of several (a single process needs no start-up)."""
        return self.auto or (self.num_processes or 1) > 1

    @property
    def coordinator_host(self) -> str | None:
        return self.coordinator.rpartition(":")[0] if self.coordinator else None


def initialize(config: DistributedConfig) -> bool:
    """Joins the other processes (blocks until all have joined or ``init_timeout_s`` passes).
    Returns whether this is a multi-process run. Must run before any device is used."""
    if not config.enabled:
        return False
    start = time.perf_counter()
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
        initialization_timeout=config.init_timeout_s,
        heartbeat_timeout_seconds=config.heartbeat_timeout_s,
    )
    log.info(
        "process %d of %d joined in %.1f s: %d local and %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        time.perf_counter() - start,
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    return jax.process_count() > 1


def coordinator_host(config: DistributedConfig) -> str | None:
    """Process 0's host as the other processes reach it: the coordinator given, or the one JAX
    detected (``--distributed``; a private attribute, so read defensively)."""
    if config.coordinator_host:
        return config.coordinator_host
    from jax._src import distributed as jax_distributed  # where JAX keeps the detected address

    detected = getattr(getattr(jax_distributed, "global_state", None), "coordinator_address", None)
    return detected.rpartition(":")[0].strip("[]") if isinstance(detected, str) else None


def describe() -> str:
    """One line about this process's place in the cluster, for logs and ``cluster-info``."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} {jax.default_backend()} devices"
    )


def local_share(arrays: Sequence[jax.Array]) -> tuple[int, int]:
    """(bytes of distinct shards this process's devices hold, bytes of the whole arrays): how
    much of a model a process restored, replicated copies on its devices counted once."""
    held = 0
    for array in arrays:
        distinct = {str(shard.index): shard.data.nbytes for shard in array.addressable_shards}
        held += sum(distinct.values())
    return held, sum(array.nbytes for array in arrays)
