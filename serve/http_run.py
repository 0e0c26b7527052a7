"""The engine requests of one HTTP request: a ``Run`` of prompts x n ``Choice``s.

``Submitter.start`` checks a parsed generation request against the engine, takes one
admission ticket per engine request (all or none) and submits them. A run's ``on_update``
callbacks wake its handler through the shared ``serve.wakeup.Waker``: on every token when
streaming, only when a request ends otherwise. ``Run.close`` (idempotent, called whichever
way the response ends) cancels what still runs, releases the tickets and counts the outcome
in ``jaxllm_requests_total``; ``Run.abandon`` is the client hanging up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from jaxllm.engine import Engine
from jaxllm.request import Request as EngineRequest
from serve import openai_protocol as oa
from serve.admission import Admission
from serve.metrics import Metrics
from serve.openai_protocol import BadRequest
from serve.validation import refused_for_constraint
from serve.wakeup import Waker

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The engine failed or stopped under a request: 503."""


class Submitter:
    """Starts runs on one loaded engine (``HttpFrontEnd.attach`` makes it)."""

    def __init__(self, engine: Engine, admission: Admission, metrics: Metrics, limits: oa.Limits):
        self.engine, self.admission, self.metrics, self.limits = engine, admission, metrics, limits
        self.waker: Waker | None = None  # made on the serving loop, at the first run

    def start(self, req, prompts: list[list[int]], prefix: str, start: float) -> Run:
        """Submits ``req.n`` choices of each prompt; raises ``BadRequest`` (400 for what
        the engine cannot run, 429 when admission is full, 503 while draining)."""
        jobs = []
        for ids in prompts:
            params, echo_only = oa.sampling_params(req, self.limits, len(ids))
            try:
                self.engine.check(ids, params)
            except ValueError as e:
                at_fault = refused_for_constraint(self.engine, ids, params)
                raise BadRequest(
                    oa.constraint_field(req) if at_fault else "prompt", str(e)
                ) from None
            jobs.append((ids, params))
        sequences = len(prompts) * req.n
        if sequences > self.admission.capacity:
            raise BadRequest(
                "n",
                f"{len(prompts)} prompt(s) x n={req.n} = {sequences} sequences, more than this "
                f"server runs or queues at once ({self.admission.capacity})",
            )
        self._admit(sequences)
        if req.user:
            log.debug("request from user %r", req.user)
        if self.waker is None:
            self.waker = Waker(asyncio.get_running_loop())
        return Run(self, f"{prefix}-{uuid.uuid4().hex}", jobs, req.n, echo_only, req.stream, start)

    def _admit(self, tickets: int) -> None:
        refusal = self.admission.try_acquire(tickets)
        if refusal is None:
            return
        if self.admission.draining:
            raise BadRequest(None, refusal, 503, "draining")
        raise BadRequest(None, refusal, 429, "rate_limit_exceeded", "rate_limit_error")


@dataclasses.dataclass(eq=False)
class Choice:
    """One engine request of a run and how much of it has been sent."""

    index: int
    prompt_ids: list[int]
    request: EngineRequest
    echo_only: bool = False
    sent_ids: int = 0
    sent_chars: int = 0
    offset: int = 0  # text_offset of the next token (streamed completions' logprobs)
    finished: bool = False
    first_at: float | None = None
    last_at: float | None = None

    @property
    def finish_reason(self) -> str:
        return "length" if self.echo_only else self.request.output.finish_reason

    @property
    def completion_tokens(self) -> int:
        return 0 if self.echo_only else len(self.request.output.token_ids)


class Run:
    """The engine requests of one HTTP request (prompts x n choices), with their admission
    tickets. ``close`` (idempotent) cancels what still runs and releases the tickets."""

    def __init__(self, submitter: Submitter, run_id, jobs, n, echo_only, streaming, start):
        self.id, self.jobs, self.echo_only = run_id, jobs, echo_only
        self.start, self.created = start, int(time.time())
        self.logprobs = jobs[0][1].logprobs is not None
        self.wake = asyncio.Event()
        self.choices: list[Choice] = []
        self.abandoned = self._closed = False
        self._admission, self._metrics = submitter.admission, submitter.metrics
        self._outcome: str | None = None
        self._tickets = len(jobs) * n
        waker, wake, choices = submitter.waker, self.wake, self.choices
        if streaming:

            def on_update():
                waker.mark(wake)
        else:  # only the end matters: one wake-up per request instead of per token

            def on_update():
                if any(c.request.done for c in choices):
                    waker.mark(wake)

        engine = submitter.engine
        try:
            for p, (ids, params) in enumerate(jobs):
                request_id = f"{run_id}-{p}"
                if n == 1:
                    requests = [engine.submit(ids, params, request_id, on_update)]
                else:  # n samples sharing the prompt's pages; choice i seeded seed + i
                    requests = engine.submit_many(ids, params, n, request_id, on_update)
                for r in requests:
                    choices.append(Choice(len(choices), ids, r, echo_only))
        except (RuntimeError, ValueError) as e:
            self.finish("error")
            self.close()
            raise BadRequest(None, f"the engine cannot take requests: {e}", 503) from None
        waker.mark(wake)  # anything that happened before the choices were listed

    def done(self) -> bool:
        return all(c.request.done for c in self.choices)

    async def updates(self) -> AsyncIterator[None]:
        """Yields after each wake-up until every request is done (or the client left)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.abandoned:
                return
            finished = self.done()
            yield
            if finished:
                return

    async def prompt_logprobs(self, c: Choice) -> list:
        """The prompt's logprobs (filled before the first token), once they are there."""
        while not (c.request.done or len(c.request.output.token_ids)):
            await self.wake.wait()
            self.wake.clear()
        self.wake.set()  # what woke this is the stream's to read too
        return list(c.request.output.prompt_logprobs)

    def abandon(self) -> None:
        """The client hung up: cancel now (frees the slots at the engine's next step)."""
        self.abandoned = True
        self.finish("cancelled")
        for c in self.choices:
            c.request.cancel()
        self.wake.set()

    def finish(self, outcome: str) -> None:
        """Records how the run ended (the first call wins); ``close`` counts it."""
        if self._outcome is None:
            self._outcome = outcome

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self.choices:
            c.request.cancel()  # a no-op for finished ones
        self._admission.release(self._tickets)
        self._metrics.requests.labels(self._outcome or "cancelled").inc()
