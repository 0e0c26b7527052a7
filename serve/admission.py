"""The bounded admission queue: a request is either admitted at once or refused at once.

Capacity is the engine's slots plus ``max_queue`` waiting places. The servicer holds a ticket
from admission until its stream ends, so a refused client learns immediately (and can go to
another replica) instead of waiting in an unbounded line.
"""

from __future__ import annotations

import threading


class Admission:
    def __init__(self, max_running: int, max_queue: int):
        self.capacity = max_running + max_queue
        self._in_flight = 0
        self._draining = False
        self._lock = threading.Lock()  # released from asyncio, read by metrics' HTTP thread

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    def try_acquire(self, n: int = 1) -> str | None:
        """Admits ``n`` engine requests (one client request with ``n`` choices) all at once
        (returns None), or none of them and says why not."""
        with self._lock:
            if self._draining:
                return "server is shutting down"
            if self._in_flight + n > self.capacity:
                return (
                    f"server is at capacity ({self.capacity} requests running or queued"
                    + (f"; this one needs {n}" if n > 1 else "")
                    + "); retry later"
                )
            self._in_flight += n
            return None

    def release(self, n: int = 1) -> None:
        with self._lock:
            if self._in_flight < n:
                raise RuntimeError("admission released more often than acquired")
            self._in_flight -= n

    def drain(self) -> None:
        """Refuses every later request; running ones keep their tickets."""
        with self._lock:
            self._draining = True
