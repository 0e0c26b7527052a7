"""``Waker``: how the engine's threads wake the asyncio handlers of both front ends (gRPC
``serve.servicer`` and HTTP ``serve.http_run``)."""

from __future__ import annotations

import asyncio
import threading


class Waker:
    """Wakes asyncio handlers from the engine's threads with one loop callback per burst.

    The detokenizer pushes a token to every running request per step; a
    ``call_soon_threadsafe`` each would cost a self-pipe write and a loop wake-up per token
    and stream, all CPU taken from the model on a host that also computes. Events marked
    while a flush is pending ride along with it. Made on the loop it wakes (``loop``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._marked: set[asyncio.Event] = set()
        self._scheduled = False

    def mark(self, event: asyncio.Event) -> None:
        """Sets ``event`` on the loop soon; callable from any thread."""
        with self._lock:
            self._marked.add(event)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            marked, self._marked, self._scheduled = self._marked, set(), False
        for event in marked:
            event.set()
