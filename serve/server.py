"""``jaxllm serve``: wires the model, the gRPC server, the OpenAI-compatible HTTP server
(``--http-port``), health, reflection, metrics, signals.

Start-up order makes readiness honest: the ports are bound and health answers NOT_SERVING
(HTTP: 503) first, the model loads and compiles every shape, and only then does health say
SERVING. On SIGTERM or SIGINT the server drains: health goes NOT_SERVING, new requests get
UNAVAILABLE (HTTP: 503), running streams of both front ends get ``drain_timeout_s`` to
finish, then the process exits 0. Both front ends share one engine, one admission queue, one
key and one metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import jax
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jaxllm.llm import LLM
from serve import faults, multihost
from serve.admission import Admission
from serve.auth import BearerTokenInterceptor, load_token, server_credentials
from serve.config import ServeConfig
from serve.metrics import Metrics
from serve.proto import jaxllm_pb2
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from serve.servicer import LLMServicer

log = logging.getLogger(__name__)

# Exit code of a server whose engine failed: a supervisor (Kubernetes, SLURM) restarts it.
EXIT_ENGINE_FAILED = 4
# Once the engine failed, clients get this long to read their UNAVAILABLE (and probes to see
# NOT_SERVING) before the process exits.
_FAILED_GRACE_S = 1.0

SERVICE = jaxllm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name  # "jaxllm.v1.LLM"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Undecodable:
    """A request whose bytes are no valid message (invalid UTF-8 in a string field, a corrupt
    wire format): the handler answers INVALID_ARGUMENT. gRPC itself would log a traceback and
    answer UNKNOWN when the deserializer raises."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(message_type):
    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return _Undecodable(str(e))

    return deserialize


def _add_llm_service(switch: _Switch, server: grpc.aio.Server) -> None:
    """``pb_grpc.add_LLMServicer_to_server`` with deserializers that never raise."""
    kinds = {
        "Generate": (grpc.unary_stream_rpc_method_handler, "GenerateRequest", "GenerateResponse"),
        "Tokenize": (grpc.unary_unary_rpc_method_handler, "TokenizeRequest", "TokenizeResponse"),
        "GetModelInfo": (grpc.unary_unary_rpc_method_handler, "GetModelInfoRequest", "ModelInfo"),
        "GetStats": (grpc.unary_unary_rpc_method_handler, "GetStatsRequest", "ServerStats"),
    }
    handlers = {
        name: handler(
            getattr(switch, name),
            request_deserializer=_tolerant(getattr(jaxllm_pb2, request)),
            response_serializer=getattr(jaxllm_pb2, response).SerializeToString,
        )
        for name, (handler, request, response) in kinds.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class _Switch(pb_grpc.LLMServicer):
    """Answers UNAVAILABLE until the model is ready, then forwards to the real servicer (which
    cannot exist before the model does, while gRPC wants its servicers before it starts)."""

    def __init__(self):
        self.target: LLMServicer | None = None

    async def _ready(self, context, request) -> LLMServicer:
        if isinstance(request, _Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a valid message: {request.reason}"
            )
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading; watch health")
        return self.target

    async def Generate(self, request, context):
        target = await self._ready(context, request)
        async for message in target.Generate(request, context):
            yield message

    async def Tokenize(self, request, context):
        return await (await self._ready(context, request)).Tokenize(request, context)

    async def GetModelInfo(self, request, context):
        return await (await self._ready(context, request)).GetModelInfo(request, context)

    async def GetStats(self, request, context):
        return await (await self._ready(context, request)).GetStats(request, context)


class Server:
    """One server: ``start`` binds (health NOT_SERVING), ``load`` brings the model up (health
    SERVING), ``drain`` shuts down gracefully. ``serve`` runs the three for the CLI."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.token = config.api_key or load_token(config)
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        self.switch = _Switch()
        self.llm: LLM | None = None
        self.admission: Admission | None = None
        self.port = self.metrics_port = self.http_port = None
        self.http = None  # serve.http.HttpFrontEnd with --http-port
        self._watcher: asyncio.Future | None = None
        self.leader = None  # jaxllm.lockstep.Leader when this is process 0 of several
        limits = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ]
        interceptors = [BearerTokenInterceptor(self.token)] if self.token else []
        self.grpc = grpc.aio.server(interceptors=interceptors, options=limits)
        _add_llm_service(self.switch, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (SERVICE, health_name, reflection.SERVICE_NAME), self.grpc
        )

    async def start(self) -> None:
        config = self.config
        await _set_health(self.health, _NOT_SERVING)
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        await self.grpc.start()
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.host, config.metrics_port)
        if config.http_port is not None:
            # Imported here: FastAPI and uvicorn load only for a server that speaks HTTP.
            from serve.http import HttpFrontEnd

            self.http = HttpFrontEnd(config, self.metrics, self.token)
            self.http_port = await self.http.start(config.host, config.http_port)
        log.info(
            "listening on %s:%d (%s, %s), %s, metrics on port %s; loading the model",
            config.host,
            self.port,
            "TLS" if credentials else "plaintext",
            "bearer-token auth" if self.token else "no auth",
            f"HTTP on port {self.http_port}" if self.http_port is not None else "no HTTP",
            self.metrics_port,
        )

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self.llm = await loop.run_in_executor(None, _load, self.config, self.metrics)
        faults.arm(self.llm.engine)
        if jax.process_count() > 1:
            self.leader = await loop.run_in_executor(None, multihost.lead, self.llm, self.config)
        self.admission = Admission(self.llm.engine.config.max_num_seqs, self.config.max_queue)
        self.metrics.watch(self.llm.engine, self.admission)
        self.switch.target = LLMServicer(self.llm, self.config, self.admission, self.metrics)
        if self.http is not None:
            self.http.attach(self.llm, self.admission)
        await _set_health(self.health, _SERVING)
        self._watcher = asyncio.ensure_future(_watch_engine(self.llm, self.health))

    async def drain(self) -> None:
        """Stops admitting, lets running streams finish (up to drain_timeout_s), stops."""
        await _set_health(self.health, _NOT_SERVING)
        if self._watcher is not None:
            self._watcher.cancel()
        if self.admission is not None:
            log.info("draining: %d requests in flight", self.admission.in_flight)
            self.admission.drain()
            deadline = time.monotonic() + self.config.drain_timeout_s
            while self.admission.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.admission.in_flight:
                log.warning("cancelling %d requests still running", self.admission.in_flight)
        # Whatever still runs is cancelled here; Health.Watch streams end here too.
        await asyncio.gather(
            self.grpc.stop(grace=1.0), self.http.stop() if self.http else asyncio.sleep(0)
        )
        if self.llm is not None:
            self.llm.close()
        if self.leader is not None:
            self.leader.close()  # the followers exit 0
        log.info("stopped")


async def serve(config: ServeConfig) -> int:
    """Runs a server until SIGTERM/SIGINT; returns the process exit code. Of several
    processes (``jaxllm.distributed``) this runs on process 0; the others run
    ``serve.multihost.follow``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    try:
        await server.start()
    except BaseException:  # a port in use: close what did start before saying why
        await server.grpc.stop(None)
        raise
    # Machine-readable lines (tests and scripts read the ports when 0 asked for any).
    print(f"jaxllm: listening on {config.host}:{server.port}", flush=True)
    if server.metrics_port is not None:
        print(f"jaxllm: metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
    if server.http_port is not None:
        host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6
        scheme = "https" if config.tls_cert else "http"
        print(f"jaxllm: OpenAI API on {scheme}://{host}:{server.http_port}/v1", flush=True)
    started = time.perf_counter()
    load = asyncio.ensure_future(server.load())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        if load.exception() is not None:  # close the ports before saying why, then raise
            await server.drain()
        await load  # raises if loading failed
        log.info("ready in %.1f s", time.perf_counter() - started)
        print(f"jaxllm: serving {server.llm.name} on {config.host}:{server.port}", flush=True)
        if config.sample_prompt:
            await _print_sample(server.llm, config)
        await asyncio.wait([stopped, server._watcher], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():  # the engine failed: its requests already got UNAVAILABLE
            await asyncio.sleep(_FAILED_GRACE_S)
            server.config = config.replace(drain_timeout_s=0)  # nothing can finish now
            await server.drain()
            print(f"jaxllm: error: engine failed: {server.llm.engine.failure}", flush=True)
            return EXIT_ENGINE_FAILED
    else:
        await asyncio.wait([load])  # the loading thread cannot be interrupted
    await server.drain()
    return 0


def _load(config: ServeConfig, metrics: Metrics) -> LLM:
    start = time.perf_counter()
    llm = LLM.load(config.model, warm_up=False, **config.load_options)
    loaded = time.perf_counter()
    metrics.load_seconds.set(loaded - start)
    # Warm-up here rather than in LLM.load so the two times are reported apart. The engine is
    # already running, but nothing can reach it until health says SERVING.
    llm.engine.warm_up()
    metrics.warm_up_seconds.set(time.perf_counter() - loaded)
    return llm


async def _print_sample(llm: LLM, config: ServeConfig) -> None:
    """One greedy completion through the same engine that serves the clients."""
    loop = asyncio.get_running_loop()
    prompt = config.sample_prompt
    out = await loop.run_in_executor(
        None, lambda: llm.generate(prompt, max_tokens=config.sample_tokens, temperature=0)
    )
    print(f"jaxllm: sample completion (greedy, {len(out.token_ids)} tokens):", flush=True)
    print(prompt + out.text, flush=True)


async def _watch_engine(llm: LLM, health: health_aio.HealthServicer) -> None:
    """Flips health to NOT_SERVING if the engine dies; its requests already failed."""
    while llm.engine.failure is None:
        await asyncio.sleep(0.05)  # cheap; load balancers see the failure within a poll
    log.error("engine failed: %s; health is NOT_SERVING", llm.engine.failure)
    await _set_health(health, _NOT_SERVING)


async def _set_health(health: health_aio.HealthServicer, status) -> None:
    for service in ("", SERVICE):
        await health.set(service, status)
