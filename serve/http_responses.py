"""OpenAI response bodies and Server-Sent Event streams of a ``serve.http_run.Run``.

A non-streaming response waits for every choice, cancelling them all at once if the client
hangs up meanwhile (the handler watches ``http.disconnect`` itself); a streaming one is an
``SSEResponse``, which Starlette ends when the client hangs up. Either way the run is closed
when the response ends. An engine failure before the status is sent is a 503; after it, one
``{"error": ...}`` event and ``[DONE]``, as vLLM sends it. Logprobs take the legacy
completions form (``tokens``, ``text_offset``, top-k dicts) or the chat form (entries with
``bytes``), with each token named by its text with special tokens shown.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxllm.tokenizer import Tokenizer
from serve import openai_protocol as oa
from serve.http_run import Choice, EngineError, Run
from serve.metrics import Metrics
from serve.openai_protocol import BadRequest

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


class Responder:
    """Answers the runs of one loaded model (``HttpFrontEnd.attach`` makes it)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        fingerprint: str,
        metrics: Metrics,
        stream_interval: int,
    ):
        self.tokenizer, self.model_name, self.fingerprint = tokenizer, model_name, fingerprint
        self.metrics, self.stream_interval = metrics, stream_interval
        # Logprobs name the same few thousand tokens over and over: decode each once.
        self._token_text: dict[int, str] = {}
        self._token_width: dict[int, int] = {}

    async def completion(self, request: Request, run: Run, req: oa.CompletionRequest) -> Response:
        if req.stream:
            return SSEResponse(self._stream_completion(run, req), run)
        return await self._respond(request, run, lambda: self._completion_body(run, req))

    async def chat(self, request: Request, run: Run, req: oa.ChatCompletionRequest) -> Response:
        if req.stream:
            return SSEResponse(self._stream_chat(run, req), run)
        return await self._respond(request, run, lambda: self._chat_body(run, req))

    async def _respond(self, request: Request, run: Run, body: Callable[[], dict]) -> Response:
        """Waits for every choice of a non-streaming request, cancelling them all at once
        if the client hangs up meanwhile."""
        watcher = asyncio.ensure_future(_on_disconnect(request, run.abandon))
        try:
            async for _ in run.updates():
                pass
            if run.abandoned:
                return Response(status_code=499)  # nobody reads it
            for c in run.choices:
                if c.request.error is not None:
                    raise EngineError(f"engine failed: {c.request.error}")
            for c in run.choices:
                if c.request.first_token_at is not None:
                    c.first_at, c.last_at = c.request.first_token_at, c.request.finished_at
                    self.metrics.ttft.observe(c.first_at - run.start)
                self._observe_done(c)
            run.finish("ok")
            return JSONResponse(body())
        except EngineError as e:
            run.finish("error")
            raise BadRequest(None, str(e), 503, "engine_failed") from None
        finally:
            watcher.cancel()
            run.close()

    # -- bodies -----------------------------------------------------------------------------

    def _usage(self, run: Run) -> oa.Usage:
        prompt = sum(len(ids) for ids, _ in run.jobs)
        completion = sum(c.completion_tokens for c in run.choices)
        return oa.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _completion_body(self, run: Run, req: oa.CompletionRequest) -> dict:
        k = oa.wanted_logprobs(req)
        choices = []
        for c in run.choices:
            out = c.request.output
            text = "" if run.echo_only else out.text
            prefix = self.tokenizer.decode(c.prompt_ids) if req.echo else ""
            logprobs = None
            if k is not None:
                logprobs = oa.CompletionLogprobs()
                if req.echo:
                    self._add_completion_logprobs(
                        logprobs, c.prompt_ids, list(out.prompt_logprobs), k, 0
                    )
                if not run.echo_only:
                    self._add_completion_logprobs(
                        logprobs, out.token_ids, out.logprobs, k, len(prefix)
                    )
            choices.append(
                oa.CompletionChoice(
                    index=c.index,
                    text=prefix + text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                )
            )
        return oa.CompletionResponse(
            id=run.id,
            created=run.created,
            model=self.model_name,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(run),
        ).model_dump(mode="json")

    def _chat_body(self, run: Run, req: oa.ChatCompletionRequest) -> dict:
        k = oa.wanted_logprobs(req)
        choices = []
        for c in run.choices:
            out = c.request.output
            logprobs = None
            if k is not None:
                logprobs = oa.ChatLogprobs(content=self._chat_logprobs(out.logprobs, k))
            choices.append(
                oa.ChatChoice(
                    index=c.index,
                    message=oa.AssistantMessage(content=out.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                )
            )
        return oa.ChatCompletionResponse(
            id=run.id,
            created=run.created,
            model=self.model_name,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=self._usage(run),
        ).model_dump(mode="json")

    # -- logprobs ---------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        """A token as logprobs name it (special tokens by their text)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _width(self, token_id: int) -> int:
        """Characters a token adds to the returned text (0 for special tokens)."""
        width = self._token_width.get(token_id)
        if width is None:
            width = len(self.tokenizer.decode([token_id]))
            self._token_width[token_id] = width
        return width

    def _add_completion_logprobs(self, into, ids, entries, k: int, offset: int) -> int:
        """Appends legacy-completions logprobs of tokens whose text starts at ``offset`` of
        the choice's text: the chosen token's and the top k (with the chosen one, as OpenAI's
        legacy API and vLLM show it). Returns the offset after them (special tokens, absent
        from the text, take no room)."""
        for token_id, entry in zip(ids, entries, strict=False):
            token = self._token(token_id)
            into.tokens.append(token)
            into.text_offset.append(offset)
            offset += self._width(token_id)
            if entry is None:  # the first prompt token has no logprob
                into.token_logprobs.append(None)
                into.top_logprobs.append(None)
                continue
            into.token_logprobs.append(float(entry.logprob))
            top: dict[str, float] = {}
            for t, lp in (*entry.top[:k], (token_id, entry.logprob)):
                # Two ids may read the same (byte tokens of half a character): the likelier
                # one keeps the key.
                top.setdefault(self._token(t), float(lp))
            into.top_logprobs.append(top)
        return offset

    def _chat_logprobs(self, entries, k: int) -> list[oa.TokenLogprobEntry]:
        out = []
        for entry in entries:
            token = self._token(entry.token_id)
            out.append(
                oa.TokenLogprobEntry(
                    token=token,
                    logprob=float(entry.logprob),
                    bytes=list(token.encode()),
                    top_logprobs=[
                        oa.TopLogprob(
                            token=(t := self._token(tid)), logprob=float(lp), bytes=list(t.encode())
                        )
                        for tid, lp in entry.top[:k]
                    ],
                )
            )
        return out

    # -- streams ----------------------------------------------------------------------------

    async def _stream_completion(self, run: Run, req: oa.CompletionRequest) -> AsyncIterator[bytes]:
        k = oa.wanted_logprobs(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice: oa.CompletionChoice) -> bytes:
            body = oa.CompletionResponse.model_construct(
                id=run.id,
                object="text_completion",
                created=run.created,
                model=self.model_name,
                system_fingerprint=self.fingerprint,
                choices=[choice],
                usage=None,
            )
            return b"data: " + body.model_dump_json().encode() + b"\n\n"

        if req.echo:  # the prompt first, as its own chunk per choice
            for c in run.choices:
                logprobs = None
                if k is not None:
                    logprobs = oa.CompletionLogprobs()
                    entries = await run.prompt_logprobs(c)
                    self._add_completion_logprobs(logprobs, c.prompt_ids, entries, k, 0)
                c.offset = len(prefix := self.tokenizer.decode(c.prompt_ids))
                yield chunk(oa.CompletionChoice(index=c.index, text=prefix, logprobs=logprobs))
        try:
            async for ready in self._pieces(run):
                for c, text, ids, entries, finish in ready:
                    logprobs = None
                    if k is not None:
                        logprobs = oa.CompletionLogprobs()
                        c.offset = self._add_completion_logprobs(
                            logprobs, ids, entries, k, c.offset
                        )
                    yield chunk(
                        oa.CompletionChoice(
                            index=c.index, text=text, logprobs=logprobs, finish_reason=finish
                        )
                    )
        except EngineError as e:
            yield _sse_error(e)
            yield _DONE
            return
        if include_usage:
            usage = oa.CompletionResponse.model_construct(
                id=run.id,
                object="text_completion",
                created=run.created,
                model=self.model_name,
                system_fingerprint=self.fingerprint,
                choices=[],
                usage=self._usage(run),
            )
            yield b"data: " + usage.model_dump_json().encode() + b"\n\n"
        yield _DONE

    async def _stream_chat(self, run: Run, req: oa.ChatCompletionRequest) -> AsyncIterator[bytes]:
        k = oa.wanted_logprobs(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[oa.ChatChunkChoice], usage=None) -> bytes:
            body = oa.ChatCompletionChunk.model_construct(
                id=run.id,
                object="chat.completion.chunk",
                created=run.created,
                model=self.model_name,
                system_fingerprint=self.fingerprint,
                choices=choices,
                usage=usage,
            )
            return b"data: " + body.model_dump_json().encode() + b"\n\n"

        for c in run.choices:  # the role first, as OpenAI sends it
            delta = oa.Delta(role="assistant", content="")
            yield chunk([oa.ChatChunkChoice(index=c.index, delta=delta)])
        try:
            async for ready in self._pieces(run):
                for c, text, _, entries, finish in ready:
                    logprobs = None
                    if k is not None:
                        logprobs = oa.ChatLogprobs(content=self._chat_logprobs(entries, k))
                    delta = oa.Delta.model_construct(role=None, content=text if text else None)
                    choice = oa.ChatChunkChoice.model_construct(
                        index=c.index, delta=delta, logprobs=logprobs, finish_reason=finish
                    )
                    yield chunk([choice])
        except EngineError as e:
            yield _sse_error(e)
            yield _DONE
            return
        if include_usage:
            yield chunk([], self._usage(run))
        yield _DONE

    async def _pieces(self, run: Run) -> AsyncIterator[list]:
        """After each wake-up, what each choice has new: (choice, text, token ids, logprob
        entries, finish_reason or None). Tokens after the first wait for stream_interval of
        them, as gRPC's do. Ends once every choice has sent its finish."""
        interval = self.stream_interval
        metrics = self.metrics
        try:
            async for _ in run.updates():
                ready, now = [], time.perf_counter()
                for c in run.choices:
                    if c.finished:
                        continue
                    request = c.request
                    done = request.done  # first: once set, what follows is final
                    if done and request.error is not None:
                        raise EngineError(f"engine failed: {request.error}")
                    out = request.output
                    text, end = out.text, len(out.token_ids)
                    if run.logprobs and not done:
                        end = min(end, len(out.logprobs))
                    new = end - c.sent_ids
                    if not done and (new <= 0 or (c.sent_ids and new < interval)):
                        continue
                    if new > 0:
                        if c.first_at is None:
                            c.first_at = now
                            metrics.ttft.observe(now - run.start)
                        else:
                            for _ in range(new):
                                metrics.itl.observe((now - c.last_at) / new)
                        c.last_at = now
                    ids = out.token_ids[c.sent_ids : end]
                    entries = out.logprobs[c.sent_ids : end] if run.logprobs else ()
                    piece = text[c.sent_chars :]
                    c.sent_ids, c.sent_chars = end, len(text)
                    finish = None
                    if done:
                        c.finished, finish = True, c.finish_reason
                        self._observe_done(c)
                    if run.echo_only:
                        piece, ids, entries = "", [], []
                        if not done:
                            continue
                    ready.append((c, piece, ids, entries, finish))
                if ready:
                    yield ready
            run.finish("ok")
        except EngineError:
            run.finish("error")
            raise

    def _observe_done(self, c: Choice) -> None:
        n = c.completion_tokens
        self.metrics.prompt_tokens.observe(len(c.prompt_ids))
        self.metrics.output_tokens.observe(n)
        if n > 1 and c.first_at is not None:
            self.metrics.tpot.observe((c.last_at - c.first_at) / (n - 1))


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    """Calls ``callback`` when the client hangs up (the body was read before this)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            callback()
            return


class SSEResponse(StreamingResponse):
    """Server-Sent Events of a run; whatever ends the response (the last event, the client
    hanging up, shutdown) also ends the run."""

    def __init__(self, events: AsyncIterator[bytes], run: Run):
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def _sse_error(e: Exception) -> bytes:
    """An error after the stream began (the status is sent): one event, as vLLM sends it."""
    error = {"message": str(e), "type": "server_error", "param": None, "code": "engine_failed"}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
