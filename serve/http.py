"""The OpenAI-compatible HTTP front end: FastAPI on uvicorn, in the server's own asyncio loop,
on the same engine, admission, auth, metrics and drain as gRPC.

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models
    POST /tokenize              POST /detokenize               GET /health   GET /metrics

Request bodies are parsed by ``serve.openai_protocol`` (which says which fields are honoured);
every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad
input), 401 (missing or wrong key), 404 (unknown model or route), 413 (body too large), 429
(admission full) or 503 (loading, draining, or the engine failed). ``/health`` and
``/metrics`` need no key, like gRPC health, so probes and scrapers need no secret.

This module is the app: routes, auth, readiness, errors, uvicorn's life cycle, and turning a
request body into prompt token ids. What follows is in two modules: ``serve.http_run`` turns
one HTTP request into prompts x n engine requests (a ``Run``), each holding an admission
ticket until it ends; ``serve.http_responses`` answers a run with a JSON body or an SSE
stream. Whichever way the response ends (done, client gone, shutdown), its engine requests
are cancelled and their tickets released; a client that hangs up is noticed at once, even
while its request waits in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from jaxllm.chat import chat_prompt_ids
from jaxllm.llm import LLM
from serve import openai_protocol as oa
from serve.admission import Admission
from serve.config import ServeConfig
from serve.http_responses import Responder
from serve.http_run import Submitter
from serve.metrics import Metrics
from serve.openai_protocol import BadRequest

log = logging.getLogger(__name__)

# Prompts longer than this many characters are tokenized in a worker thread, so a long prompt
# never stalls the other streams this loop serves.
_TOKENIZE_INLINE_CHARS = 2048
# A prompt this many times the context in characters can only tokenize past it.
_PROMPT_CHARS_PER_TOKEN = 64
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")
_ROUTES += ("/health", "/metrics")
_GENERATE = ("/v1/completions", "/v1/chat/completions")
# Refusals by their error code -> jaxllm_requests_total's outcome (other 4xx: "invalid").
_OUTCOMES = {"rate_limit_exceeded": "rejected", "draining": "draining"}


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
        self.submitter: Submitter | None = None  # set by attach
        self.responder: Responder | None = None

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
            # Bounds open connections plus running requests: beyond it, 503 before any work.
            limit_concurrency=self.config.max_http_connections,
            # The same certificate and key as gRPC: one TLS switch for both front ends.
            ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key,
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
            max_structured_chars=self.config.max_structured_chars,
            speculative=engine_config.speculative,
        )
        spec = llm.runner.spec
        described = f"{llm.name}|{llm.config}|{spec.dtype}|{spec.quantized}|{engine_config}"
        fingerprint = "fp_" + hashlib.sha256(described.encode()).hexdigest()[:10]
        self.submitter = Submitter(llm.engine, admission, self.metrics, self.limits)
        self.responder = Responder(
            llm.tokenizer, self.model_name, fingerprint, self.metrics, self.config.stream_interval
        )
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
        run = self.submitter.start(req, prompts, "cmpl", start)
        return await self.responder.completion(request, run, req)

    async def chat(self, request: Request) -> Response:
        start = time.perf_counter()
        self._gate(request)
        req = oa.parse(oa.ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        ids = await self._chat_ids(req.messages)
        run = self.submitter.start(req, [ids], "chatcmpl", start)
        return await self.responder.chat(request, run, req)

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
