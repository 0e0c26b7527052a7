"""Lockstep serving across processes: process 0's engine decides, the others replay.

On a mesh that spans several processes every jitted call is one program run by all of them
together (SPMD): each process must make the same calls, in the same order, with the same
arguments, or the collectives inside never meet. Process 0 runs the scheduler (the engine
thread). Before each device call it sends the call's arguments to every other process, and
they make the same call, ``Engine.run_step(inp)``: every array of the step's ``StepInput``
(tokens, positions, pool slots, page tables, per-row sampling parameters and seeds; 0-d
ones included) travels with its dtype and shape, so the follower's call has the same
arguments, hence runs the same compiled program, as the leader's.

Frees, cancellations, preemptions and stop conditions are host bookkeeping on the leader's
scheduler: they change which tokens and pages the next step names, nothing else, so they
need no message of their own. Followers never read tokens back or detokenize.

The messages travel over a TCP side channel from the leader to each follower rather than
through a collective (``multihost_utils.broadcast_one_to_all``): a follower waiting in a
collective for an idle leader, or for a dead peer, blocks inside gloo/NCCL with no timeout,
while a socket has timeouts and sees a killed peer's connection close at once. The channel's
address and a random token (a connection without it is refused) are shared once at start-up
with ``exchange``, a collective every process makes after warm-up.

Liveness: each side sends a heartbeat after ``timeout_s / 4`` of silence. The leader watches
every follower's connection; a closed one, or silence for ``timeout_s``, calls ``on_lost``.
A follower that sees its connection close or hears nothing for ``timeout_s`` raises
``PeerLost``. Wire format: frames of ``[u32 header length][u32 body length][JSON header]
[array bytes]``; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from jax.experimental import multihost_utils

from jaxllm.sampling import SamplingArrays
from jaxllm.step import StepInput

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">II")
_MAX_HEADER, _MAX_BODY = 1 << 20, 1 << 30
_ADDRESS_BYTES = 512  # the broadcast address text, zero-padded to a fixed shape


@runtime_checkable
class Replayer(Protocol):
    """What a follower replays the leader's calls on: an ``Engine``."""

    def run_step(self, inp: StepInput) -> object: ...


class PeerLost(RuntimeError):
    """Another process of a multi-host server died, vanished or broke the protocol."""


# -- start-up ---------------------------------------------------------------------------------


def exchange(address: str | None = None) -> str:
    """Every process calls this at the same point; process 0 passes its side channel's
    ``"host:port token"`` and every process gets it back (a collective over the mesh)."""
    text = np.zeros(_ADDRESS_BYTES, np.uint8)
    if address is not None:
        data = address.encode()
        if len(data) > _ADDRESS_BYTES:
            raise ValueError(f"side-channel address {address!r} is too long")
        text[: len(data)] = np.frombuffer(data, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(text))
    return bytes(shared.astype(np.uint8)).rstrip(b"\0").decode()


def advertised_host(coordinator_host: str | None) -> str:
    """The host followers dial: the coordinator's (process 0's: the others already reach it),
    else this machine's address as its own name resolves (which some hosts map to 127.0.1.1:
    give the coordinator explicitly there)."""
    if coordinator_host:
        return coordinator_host
    return socket.gethostbyname(socket.gethostname())


# -- wire format ------------------------------------------------------------------------------


def _encode(kind: str, arrays: dict[str, np.ndarray] | None = None, **fields) -> bytes:
    # np.require, not np.ascontiguousarray: that one turns a 0-d array into shape [1].
    arrays = {name: np.require(a, requirements="C") for name, a in (arrays or {}).items()}
    specs = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    header = json.dumps({"kind": kind, "arrays": specs, **fields}).encode()
    body = b"".join(a.tobytes() for a in arrays.values())
    return _FRAME.pack(len(header), len(body)) + header + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _decode(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray]]:
    """One frame: (header, arrays). Raises ConnectionError, TimeoutError or PeerLost."""
    header_len, body_len = _FRAME.unpack(_recv_exactly(sock, _FRAME.size))
    if header_len > _MAX_HEADER or body_len > _MAX_BODY:
        raise PeerLost(f"malformed frame ({header_len} + {body_len} bytes)")
    header = json.loads(_recv_exactly(sock, header_len))
    body = _recv_exactly(sock, body_len)
    arrays, offset = {}, 0
    for name, dtype, shape in header["arrays"]:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(body, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    return header, arrays


def _step_arrays(inp: StepInput) -> dict[str, np.ndarray]:
    arrays = {f: getattr(inp, f) for f in StepInput._fields if f != "sampling"}
    arrays.update({f"sampling.{f}": getattr(inp.sampling, f) for f in SamplingArrays._fields})
    return arrays


def _step_of(arrays: dict[str, np.ndarray]) -> StepInput:
    sampling = SamplingArrays(*(arrays[f"sampling.{f}"] for f in SamplingArrays._fields))
    fields = {f: arrays[f] for f in StepInput._fields if f != "sampling"}
    return StepInput(**fields, sampling=sampling)


# -- process 0 --------------------------------------------------------------------------------


class Leader:
    """Process 0's end of the side channel, and the engine's ``Mirror``: each device call is
    sent to every follower before the leader makes it. ``on_lost(reason)`` is called once,
    from a watchdog thread, when a follower dies or goes silent for ``timeout_s``."""

    def __init__(
        self,
        host: str,
        followers: int,
        *,
        port: int = 0,
        timeout_s: float = 30.0,
        on_lost: Callable[[str], None] | None = None,
    ):
        if followers < 1:
            raise ValueError("a leader needs at least one follower")
        self.followers, self.timeout_s = followers, timeout_s
        self.on_lost = on_lost
        self.token = secrets.token_hex(16)
        # Bound on every interface so that followers on other hosts reach it; the token
        # keeps strangers from joining (a joined follower only ever receives).
        self._listener = socket.create_server(("", port))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._peers: dict[int, socket.socket] = {}
        self._send_lock = threading.Lock()
        self._last_send = time.monotonic()
        self._closing = threading.Event()
        self._lost_once = threading.Lock()
        self.lost: str | None = None

    @property
    def announcement(self) -> str:
        """What ``exchange`` shares with the followers."""
        return f"{self.address} {self.token}"

    def accept(self, timeout_s: float) -> None:
        """Waits until every follower has connected and shown the token."""
        deadline = time.monotonic() + timeout_s
        while len(self._peers) < self.followers:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.followers + 1)) - set(self._peers))
                raise PeerLost(f"processes {missing} did not join within {timeout_s:.0f} s")
            self._listener.settimeout(left)
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            try:
                hello, _ = _decode(sock)
                process = int(hello.get("process", -1))
                valid = hello.get("kind") == "hello" and hello.get("token") == self.token
            except (OSError, ValueError, PeerLost) as e:
                log.warning("refused a side-channel connection from %s: %s", peer, e)
                sock.close()
                continue
            if not valid or not 1 <= process <= self.followers or process in self._peers:
                log.warning("refused a side-channel connection from %s (bad hello)", peer)
                sock.close()
                continue
            self._peers[process] = sock
            log.info("process %d joined the lockstep channel from %s", process, peer[0])
        self._listener.close()
        for process, sock in self._peers.items():
            name = f"jaxllm-watch-{process}"
            threading.Thread(
                target=self._watch, args=(process, sock), name=name, daemon=True
            ).start()
        threading.Thread(target=self._heartbeat, name="jaxllm-heartbeat", daemon=True).start()

    # Mirror: called by the engine thread before each device call.

    def step(self, inp: StepInput) -> None:
        self._send(_encode("step", _step_arrays(inp)))

    def close(self) -> None:
        """Tells the followers to stop (they exit 0), then closes the channel."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._send(_encode("stop"))
        except PeerLost as e:
            log.warning("could not tell every follower to stop: %s", e)
        for sock in self._peers.values():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            if self.lost is not None:
                raise PeerLost(self.lost)
            for process, sock in self._peers.items():
                try:
                    sock.sendall(frame)  # bounded by the socket's timeout_s
                except OSError as e:
                    self._lose(f"process {process} stopped taking the leader's steps ({e!r})")
                    raise PeerLost(self.lost) from e
            self._last_send = time.monotonic()

    def _heartbeat(self) -> None:
        interval = self.timeout_s / 4
        while not self._closing.wait(interval / 2):
            if time.monotonic() - self._last_send >= interval:
                try:
                    self._send(_encode("heartbeat"))
                except PeerLost:
                    return

    def _watch(self, process: int, sock: socket.socket) -> None:
        """Reads the follower's heartbeats; a closed connection or silence is a lost peer."""
        while True:
            try:
                header, _ = _decode(sock)
            except TimeoutError:
                reason = f"process {process} sent no heartbeat for {self.timeout_s:.0f} s"
            except (OSError, ValueError, PeerLost) as e:
                reason = f"process {process} closed its connection ({e})"
            else:
                if header.get("kind") == "heartbeat":
                    continue
                reason = f"process {process} sent an unexpected {header.get('kind')!r}"
            if not self._closing.is_set():
                self._lose(reason)
            return

    def _lose(self, reason: str) -> None:
        with self._lost_once:
            if self.lost is not None:
                return
            self.lost = reason
        log.error("multi-host serving lost a process: %s", reason)
        if self.on_lost is not None:
            self.on_lost(reason)


# -- processes 1..N-1 -------------------------------------------------------------------------


def follow(
    engine: Replayer,
    announcement: str,
    process: int,
    *,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 300.0,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Joins the leader's side channel (``announcement`` from ``exchange``) and replays its
    device calls on ``engine`` until the leader says stop. Returns the number of calls made;
    raises ``PeerLost`` if the leader dies or goes silent for ``timeout_s``."""
    address, _, token = announcement.partition(" ")
    host, _, port = address.rpartition(":")
    sock = _connect(host, int(port), connect_timeout_s)
    sock.settimeout(timeout_s)
    sock.sendall(_encode("hello", process=process, token=token))
    if on_ready is not None:
        on_ready()
    stop = threading.Event()
    beat = threading.Thread(
        target=_follower_heartbeat, args=(sock, timeout_s / 4, stop), daemon=True
    )
    beat.start()
    calls = 0
    try:
        while True:
            try:
                header, arrays = _decode(sock)
            except TimeoutError as e:
                raise PeerLost(f"no word from the leader for {timeout_s:.0f} s") from e
            except (OSError, ValueError) as e:
                raise PeerLost(f"the leader's connection closed ({e})") from e
            kind = header["kind"]
            if kind == "step":
                engine.run_step(_step_of(arrays))
            elif kind == "stop":
                return calls
            elif kind != "heartbeat":
                raise PeerLost(f"unexpected message {kind!r} from the leader")
            calls += kind != "heartbeat"
    finally:
        stop.set()
        sock.close()


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """Connects, retrying while the leader finishes its own start-up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            if time.monotonic() > deadline:
                raise PeerLost(f"cannot reach the leader at {host}:{port}: {e}") from e
            time.sleep(0.2)


def _follower_heartbeat(sock: socket.socket, interval: float, stop: threading.Event) -> None:
    frame = _encode("heartbeat")
    while not stop.wait(interval):
        try:
            sock.sendall(frame)
        except OSError:
            return  # the main loop sees the closed connection
