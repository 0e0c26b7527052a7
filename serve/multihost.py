"""A server's processes on several hosts: process 0 serves gRPC, the others follow it.

Process 0 (``lead``) loads the model like a single-host server, opens the lockstep side
channel (``jaxllm.lockstep``) and mirrors every device call of its engine to the others.
Every other process (``follow``) loads the same model onto its share of the global mesh,
compiles the same shapes, and replays the leader's calls until the leader stops.

Losing a process ends the server: a device call that waits on a dead peer inside a
collective can never return, so the survivor logs why, fails its requests (clients get
UNAVAILABLE naming the lost process), and exits with ``EXIT_PEER_LOST`` without unwinding.
A launcher or Kubernetes then restarts the whole group.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax

from jaxllm import distributed, lockstep
from jaxllm.llm import LLM
from serve.config import ServeConfig

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3
# Time for clients to receive their UNAVAILABLE before the process exits.
_EXIT_GRACE_S = 1.0


def exit_now(reason: str) -> None:
    """Ends this process of a multi-host server at once, saying why on stderr."""
    print(f"jaxllm: error: {reason}; exiting", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


def lead(llm: LLM, config: ServeConfig) -> lockstep.Leader:
    """Process 0, after loading and warm-up: shares the side channel, waits for every
    follower, and from then on mirrors the engine's device calls to them."""

    def lost(reason: str) -> None:
        # The timer first: failing the requests takes engine locks that a thread stuck in a
        # collective with the dead process might hold.
        timer = threading.Timer(_EXIT_GRACE_S, exit_now, (f"lost a process: {reason}",))
        timer.daemon = True
        timer.start()
        llm.engine.abort(lockstep.PeerLost(f"multi-host serving lost a process: {reason}"))

    host = lockstep.advertised_host(distributed.coordinator_host(config.distributed_config))
    leader = lockstep.Leader(
        host,
        jax.process_count() - 1,
        port=config.lockstep_port,
        timeout_s=config.peer_timeout_s,
        on_lost=lost,
    )
    lockstep.exchange(leader.announcement)
    leader.accept(timeout_s=config.distributed_config.init_timeout_s)
    llm.engine.mirror = leader
    _print_share(llm)
    log.info("leading %d processes over %s", jax.process_count(), leader.address)
    return leader


def follow(config: ServeConfig) -> int:
    """Processes 1..N-1 (in the main thread): load the same model and compile the same
    shapes as the leader, with no engine threads, then replay the leader's device calls
    until it stops. Returns the exit code."""
    # The leader's options (one list, ServeConfig.load_options, so they cannot drift apart),
    # and a warm-up that makes the same calls in the same order as the leader's.
    llm = LLM.load(config.model, start=False, **config.load_options)
    _print_share(llm)
    announcement = lockstep.exchange()
    index = jax.process_index()

    def ready() -> None:
        # Kubernetes and launchers signal every process at once; the leader drains and then
        # stops its followers, which must keep stepping until it does (or is lost).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: log.info("signalled; process 0 decides when to stop"))
        print(f"jaxllm: process {index} following {announcement.split()[0]}", flush=True)

    try:
        calls = lockstep.follow(
            llm.engine, announcement, index, timeout_s=config.peer_timeout_s, on_ready=ready
        )
    except lockstep.PeerLost as e:
        exit_now(f"process {index} lost the leader: {e}")
    log.info("the leader stopped; %d device calls replayed", calls)
    return 0


def _print_share(llm: LLM) -> None:
    held, total = distributed.local_share(llm.runner.params)
    print(
        f"jaxllm: process {jax.process_index()} holds {held} of {total} parameter bytes "
        f"({distributed.describe()})",
        flush=True,
    )
