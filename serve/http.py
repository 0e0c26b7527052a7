"""The OpenAI-compatible HTTP front end: FastAPI on uvicorn, in the server's own asyncio loop,
on the same engine, admission, auth, metrics and drain as gRPC.

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models
    POST /tokenize              POST /detokenize               GET /health   GET /metrics

Request bodies are parsed by ``serve.openai_protocol`` (which says which fields are honoured);
every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad
input), 401 (missing or wrong key), 404 (unknown model or route), 413 (body too large), 429
(admission full) or 503 (loading, draining, or the engine failed). ``/health`` and
``/metrics`` need no key, like gRPC health, so probes and scrapers need no secret.

One HTTP request becomes prompts x n engine requests (a ``_Run``), each holding an admission
ticket until it ends. Tokens wake the handler through the gRPC servicer's ``_Waker`` (one loop
callback per burst). Whichever way the response ends (done, client gone, shutdown), its engine
requests are cancelled and their tickets released; a client that hangs up is noticed at once,
even while its request waits in the queue (Starlette watches ``http.disconnect`` while it
streams; a non-streaming handler watches it itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxllm.chat import chat_prompt_ids
from jaxllm.llm import LLM
from jaxllm.request import Request as EngineRequest
from serve import openai_protocol as oa
from serve.admission import Admission
from serve.config import ServeConfig
from serve.metrics import Metrics
from serve.openai_protocol import BadRequest
from serve.servicer import _Waker

log = logging.getLogger(__name__)

# Prompts longer than this many characters are tokenized in a worker thread, so a long prompt
# never stalls the other streams this loop serves.
_TOKENIZE_INLINE_CHARS = 2048
# A prompt this many times the context in characters can only tokenize past it.
_PROMPT_CHARS_PER_TOKEN = 64
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")
_ROUTES += ("/health", "/metrics")
_GENERATE = ("/v1/completions", "/v1/chat/completions")
# Refusals by their error code -> jaxllm_requests_total's outcome (other 4xx: "invalid").
_OUTCOMES = {"rate_limit_exceeded": "rejected", "draining": "draining"}


class _EngineError(Exception):
    """The engine failed or stopped under a request: 503."""


class HttpFrontEnd:
    """The HTTP server of one ``serve.server.Server``. ``start`` binds and answers 503 until
    ``attach`` gives it the loaded model; ``stop`` closes it after the server drained."""

    def __init__(self, config: ServeConfig, metrics: Metrics, token: str | None):
        self.config, self.metrics = config, metrics
        self._expected = f"Bearer {token}".encode() if token else None
        self.llm: LLM | None = None  # set last by attach: None answers 503
        self.engine = self.admission = None
        self.created = int(time.time())
        self.app = self._build_app()
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Future | None = None
        self._waker: _Waker | None = None
        self._token_text: dict[int, str] = {}
        self._token_width: dict[int, int] = {}

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Binds ``host:port`` (0 = any free port), serves, returns the port bound."""
        config = uvicorn.Config(
            _CountResponses(self.app, self.metrics),
            host=host,
            port=port,
            log_config=None,  # the server's logging set-up stays as it is
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        sock = config.bind_socket()
        self.port = sock.getsockname()[1]
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    def attach(self, llm: LLM, admission: Admission) -> None:
        """The model is loaded and warm: from now on requests are served."""
        self.engine, self.admission, self.tokenizer = llm.engine, admission, llm.tokenizer
        self.model_name = self.config.served_model_name or llm.name
        engine_config = llm.engine.config
        self.limits = oa.Limits(
            context=engine_config.max_seq_len,
            vocab=llm.config.vocab_size,
            default_max_tokens=self.config.default_max_tokens,
            max_stop_strings=self.config.max_stop_strings,
            max_stop_string_chars=self.config.max_stop_string_chars,
            max_stop_token_ids=self.config.max_stop_token_ids,
        )
        spec = llm.runner.spec
        described = f"{llm.name}|{llm.config}|{spec.dtype}|{spec.quantized}|{engine_config}"
        self.fingerprint = "fp_" + hashlib.sha256(described.encode()).hexdigest()[:10]
        self.llm = llm

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # -- the app ----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        # No /docs or /openapi.json: bodies are parsed by serve.openai_protocol, whose
        # docstring is the reference, and nothing answers without a key but health and metrics.
        app = FastAPI(title="jaxllm", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(BadRequest, self._refused)
        app.add_exception_handler(HTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        app.get("/v1/models")(self.models)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        return app

    async def _refused(self, request: Request, e: BadRequest) -> JSONResponse:
        """A refused generation request counts in jaxllm_requests_total as gRPC's do."""
        if request.url.path in _GENERATE:
            outcome = _OUTCOMES.get(e.code, "invalid" if e.status in (400, 404, 413) else None)
            if outcome is not None:
                self.metrics.requests.labels(outcome).inc()
        return _error_body(e.status, str(e), e.type, e.param, e.code)

    async def health(self) -> Response:
        self._ready()
        return JSONResponse({"status": "ok"})

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self._gate(request)
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxllm",
            "max_model_len": self.limits.context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def tokenize(self, request: Request) -> Response:
        self._gate(request)
        req = oa.parse(oa.TokenizeRequest, await self._body(request))
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("prompt", "give prompt or messages (one of them)")
        if req.messages is not None:
            ids = await self._chat_ids(req.messages)
        else:
            ids = await self._encode(req.prompt, "prompt", req.add_special_tokens, check=False)
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.limits.context, "tokens": ids}
        )

    async def detokenize(self, request: Request) -> Response:
        self._gate(request)
        req = oa.parse(oa.DetokenizeRequest, await self._body(request))
        if req.model is not None:
            self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    async def completions(self, request: Request) -> Response:
        start = time.perf_counter()
        self._gate(request)
        req = oa.parse(oa.CompletionRequest, await self._body(request))
        prompts = await self._completion_prompts(req)
        run = self._submit(req, prompts, "cmpl", start)
        if req.stream:
            return _SSE(self._stream_completion(run, req), run)
        return await self._respond(request, run, lambda: self._completion_body(run, req))

    async def chat(self, request: Request) -> Response:
        start = time.perf_counter()
        self._gate(request)
        req = oa.parse(oa.ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        ids = await self._chat_ids(req.messages)
        run = self._submit(req, [ids], "chatcmpl", start)
        if req.stream:
            return _SSE(self._stream_chat(run, req), run)
        return await self._respond(request, run, lambda: self._chat_body(run, req))

    # -- checks -----------------------------------------------------------------------------

    def _gate(self, request: Request) -> None:
        """Auth, then readiness: 401 before anything is said about the server."""
        if self._expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                raise BadRequest(
                    None,
                    "missing or wrong API key (header 'Authorization: Bearer <key>')",
                    401,
                    "invalid_api_key",
                )
        self._ready()

    def _ready(self) -> None:
        if self.llm is None:
            raise BadRequest(None, "the model is loading; watch /health", 503, "model_loading")
        if self.admission.draining:
            raise BadRequest(None, "the server is shutting down", 503, "draining")
        if self.engine.failure is not None:
            raise BadRequest(
                None, f"the engine failed: {self.engine.failure}", 503, "engine_failed"
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_message_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise BadRequest(None, f"the body is larger than {limit} bytes", 413)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(None, f"the body is larger than {limit} bytes", 413)
                chunks.append(chunk)
        except ClientDisconnect:
            raise BadRequest(None, "the client went away", 400) from None
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise BadRequest(
                "model",
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                404,
                "model_not_found",
            )

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.limits.vocab
        if not all(0 <= t < vocab for t in ids):
            raise BadRequest(param, f"token ids must be in [0, {vocab})")

    # -- prompts ----------------------------------------------------------------------------

    async def _completion_prompts(self, req: oa.CompletionRequest) -> list[list[int]]:
        self._check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, str):
            return [await self._encode(prompt, "prompt")]
        if not prompt:
            raise BadRequest("prompt", "empty: give a string, strings or token ids")
        if isinstance(prompt[0], int):
            return [self._prompt_ids(prompt, "prompt")]
        out = []
        for i, p in enumerate(prompt):
            param = f"prompt[{i}]"
            if isinstance(p, str):
                out.append(await self._encode(p, param))
            else:
                out.append(self._prompt_ids(p, param))
        return out

    async def _encode(
        self, text: str, param: str, add_special_tokens: bool = True, check: bool = True
    ) -> list[int]:
        limit = self.limits.context - 1
        if check and not text:
            raise BadRequest(param, "empty")
        if len(text) > limit * _PROMPT_CHARS_PER_TOKEN:
            raise BadRequest(param, f"longer than the context of {limit} tokens")
        encode = self.tokenizer.encode
        if len(text) > _TOKENIZE_INLINE_CHARS:
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(None, encode, text, add_special_tokens)
        else:
            ids = encode(text, add_special_tokens)
        return self._prompt_ids(ids, param) if check else ids

    def _prompt_ids(self, ids: list[int], param: str) -> list[int]:
        limit = self.limits.context - 1
        if not ids:
            raise BadRequest(param, "empty: no tokens")
        if len(ids) > limit:
            raise BadRequest(
                param,
                f"{len(ids)} tokens, more than the maximum of {limit}; prompts are never truncated",
            )
        self._check_ids(ids, param)
        return list(ids)

    async def _chat_ids(self, messages: list[oa.ChatMessage]) -> list[int]:
        rendered = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            rendered.append(
                {"role": "system" if m.role == "developer" else m.role, "content": content}
            )
        chars = sum(len(m["content"]) for m in rendered)
        if chars > (self.limits.context - 1) * _PROMPT_CHARS_PER_TOKEN:
            raise BadRequest("messages", f"longer than the context of {self.limits.context} tokens")
        try:
            if chars > _TOKENIZE_INLINE_CHARS:
                loop = asyncio.get_running_loop()
                ids = await loop.run_in_executor(None, chat_prompt_ids, self.tokenizer, rendered)
            else:
                ids = chat_prompt_ids(self.tokenizer, rendered)
        except ValueError as e:
            raise BadRequest("messages", str(e)) from None
        return self._prompt_ids(ids, "messages")

    # -- running ----------------------------------------------------------------------------

    def _submit(self, req, prompts: list[list[int]], prefix: str, start: float) -> _Run:
        jobs = []
        for ids in prompts:
            params, echo_only = oa.sampling_params(req, self.limits, len(ids))
            try:
                self.engine.check(ids, params)
            except ValueError as e:
                raise BadRequest("prompt", str(e)) from None
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
        if self._waker is None:
            self._waker = _Waker(asyncio.get_running_loop())
        return _Run(self, f"{prefix}-{uuid.uuid4().hex}", jobs, req.n, echo_only, req.stream, start)

    def _admit(self, tickets: int) -> None:
        admission = self.admission
        for taken in range(tickets):
            refusal = admission.try_acquire()
            if refusal is not None:
                for _ in range(taken):
                    admission.release()
                if admission.draining:
                    raise BadRequest(None, refusal, 503, "draining")
                raise BadRequest(None, refusal, 429, "rate_limit_exceeded", "rate_limit_error")

    async def _respond(self, request: Request, run: _Run, body: Callable[[], dict]) -> Response:
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
                    raise _EngineError(f"engine failed: {c.request.error}")
            for c in run.choices:
                request = c.request
                if request.first_token_at is not None:
                    c.first_at, c.last_at = request.first_token_at, request.finished_at
                    self.metrics.ttft.observe(c.first_at - run.start)
                self._observe_done(run, c)
            run.finish("ok")
            return JSONResponse(body())
        except _EngineError as e:
            run.finish("error")
            raise BadRequest(None, str(e), 503, "engine_failed") from None
        finally:
            watcher.cancel()
            run.close()

    # -- bodies -----------------------------------------------------------------------------

    def _usage(self, run: _Run) -> oa.Usage:
        prompt = sum(len(ids) for ids, _ in run.jobs)
        completion = sum(c.completion_tokens for c in run.choices)
        return oa.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _completion_body(self, run: _Run, req: oa.CompletionRequest) -> dict:
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
                        logprobs, c.prompt_ids, _prompt_logprobs(out), k, 0
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

    def _chat_body(self, run: _Run, req: oa.ChatCompletionRequest) -> dict:
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

    async def _stream_completion(
        self, run: _Run, req: oa.CompletionRequest
    ) -> AsyncIterator[bytes]:
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
        except _EngineError as e:
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

    async def _stream_chat(self, run: _Run, req: oa.ChatCompletionRequest) -> AsyncIterator[bytes]:
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
        except _EngineError as e:
            yield _sse_error(e)
            yield _DONE
            return
        if include_usage:
            yield chunk([], self._usage(run))
        yield _DONE

    async def _pieces(self, run: _Run) -> AsyncIterator[list]:
        """After each wake-up, what each choice has new: (choice, text, token ids, logprob
        entries, finish_reason or None). Tokens after the first wait for stream_interval of
        them, as gRPC's do. Ends once every choice has sent its finish."""
        interval = self.config.stream_interval
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
                        raise _EngineError(f"engine failed: {request.error}")
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
                        self._observe_done(run, c)
                    if run.echo_only:
                        piece, ids, entries = "", [], []
                        if not done:
                            continue
                    ready.append((c, piece, ids, entries, finish))
                if ready:
                    yield ready
            run.finish("ok")
        except _EngineError:
            run.finish("error")
            raise

    def _observe_done(self, run: _Run, c: _Choice) -> None:
        n = c.completion_tokens
        self.metrics.prompt_tokens.observe(len(c.prompt_ids))
        self.metrics.output_tokens.observe(n)
        if n > 1 and c.first_at is not None:
            self.metrics.tpot.observe((c.last_at - c.first_at) / (n - 1))


@dataclasses.dataclass(eq=False)
class _Choice:
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


class _Run:
    """The engine requests of one HTTP request (prompts x n choices), with their admission
    tickets. ``close`` (idempotent) cancels what still runs and releases the tickets."""

    def __init__(self, api: HttpFrontEnd, run_id: str, jobs, n, echo_only, streaming, start):
        self.api, self.id, self.jobs, self.echo_only = api, run_id, jobs, echo_only
        self.start, self.created = start, int(time.time())
        self.logprobs = jobs[0][1].logprobs is not None
        self.wake = asyncio.Event()
        self.choices: list[_Choice] = []
        self.abandoned = self._closed = False
        self._outcome: str | None = None
        self._tickets = len(jobs) * n
        waker, wake, choices = api._waker, self.wake, self.choices
        if streaming:

            def on_update():
                waker.mark(wake)
        else:  # only the end matters: one wake-up per request instead of per token

            def on_update():
                if any(c.request.done for c in choices):
                    waker.mark(wake)

        engine = api.engine
        try:
            for p, (ids, params) in enumerate(jobs):
                request_id = f"{run_id}-{p}"
                if n == 1:
                    requests = [engine.submit(ids, params, request_id, on_update)]
                else:  # n samples sharing the prompt's pages; choice i seeded seed + i
                    requests = engine.submit_many(ids, params, n, request_id, on_update)
                for r in requests:
                    choices.append(_Choice(len(choices), ids, r, echo_only))
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

    async def prompt_logprobs(self, c: _Choice) -> list:
        """The prompt's logprobs (filled before the first token), once they are there."""
        while not (c.request.done or len(c.request.output.token_ids)):
            await self.wake.wait()
            self.wake.clear()
        self.wake.set()  # what woke this is _pieces' to read too
        return _prompt_logprobs(c.request.output)

    def abandon(self) -> None:
        """The client hung up: cancel now (frees the slots at the engine's next step)."""
        self.abandoned = True
        self.finish("cancelled")
        for c in self.choices:
            c.request.cancel()
        self.wake.set()

    def finish(self, outcome: str) -> None:
        if self._outcome is None:
            self._outcome = outcome

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self.choices:
            c.request.cancel()  # a no-op for finished ones
        for _ in range(self._tickets):
            self.api.admission.release()
        self.api.metrics.requests.labels(self._outcome or "cancelled").inc()


def _prompt_logprobs(output) -> list:
    return list(output.prompt_logprobs)


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    """Calls ``callback`` when the client hangs up (the body was read before this)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            callback()
            return


class _SSE(StreamingResponse):
    """Server-Sent Events of a run; whatever ends the response (the last event, the client
    hanging up, shutdown) also ends the run."""

    def __init__(self, events: AsyncIterator[bytes], run: _Run):
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM belongs to ``serve.server``, which
    drains both front ends before stopping this one."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _CountResponses:
    """ASGI wrapper that counts responses by route and status (``jaxllm_http_responses``)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.counter = app, metrics.http_responses

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _error_body(status: int, message: str, type: str, param=None, code=None) -> JSONResponse:
    error = {"message": message, "type": type, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found" if e.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {e.detail}"
    return _error_body(e.status_code, message, kind, None, None)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error_body(500, f"internal error: {e!r}", "server_error")


def _sse_error(e: Exception) -> bytes:
    """An error after the stream began (the status is sent): one event, as vLLM sends it."""
    error = {"message": str(e), "type": "server_error", "param": None, "code": "engine_failed"}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
