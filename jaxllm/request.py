"""A submitted request as its submitter sees it: a stream of text pieces, a result to wait
for, and ``cancel()``. The engine's threads feed it (``_push``, ``_finish``); everything here
is host-side and thread-safe through a queue and an event."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from jaxllm.request_output import RequestOutput, TokenLogprob

log = logging.getLogger(__name__)


class Request:
    """A submitted request: iterate it for text pieces; ``cancel()`` frees its slot."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        output: RequestOutput,
        seed: int,
        on_update: Callable[[], None] | None = None,
    ):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.output = output
        self.seed = seed
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self.error: BaseException | None = None
        # Structured output: where the text is in its grammar (``jaxllm.structured``; the
        # engine thread's alone); None for free text.
        self.matcher = None
        # Called from the engine's threads after every new token and at the finish, so an
        # asyncio server can be woken (loop.call_soon_threadsafe) instead of polling.
        self._on_update = on_update

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request; its slot is freed at the engine's next step."""
        if not self.done:
            self.cancelled = True
            self._finish("cancelled")

    def wait(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed: {self.error}") from self.error
        return self.output

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are decoded; ends when the request finishes."""
        while (piece := self._pieces.get()) is not None:
            yield piece
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed: {self.error}") from self.error

    # -- called by the engine's threads -------------------------------------------------

    def _push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        piece = self.output.add(token, logprob)
        if piece:
            self._pieces.put(piece)
        if self.output.finished:
            self._finish(self.output.finish_reason)
        else:
            self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        if self.output.finish_reason is None:
            self.output.finish_reason = reason
        self.error = error
        self.finished_at = time.perf_counter()
        self._done.set()
        self._pieces.put(None)
        self._notify()

    def _notify(self) -> None:
        if self._on_update is not None:
            try:
                self._on_update()
            except Exception:  # a listener's bug must not take the engine thread down
                log.exception("on_update of request %s failed", self.id)
