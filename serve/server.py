"""``jaxllm serve``: wires the model, the gRPC server, health, reflection, metrics, signals.

Start-up order makes readiness honest: the port is bound and health answers NOT_SERVING
first, the model loads and compiles every shape, and only then does health say SERVING.
On SIGTERM or SIGINT the server drains: health goes NOT_SERVING, new requests get
UNAVAILABLE, running streams get ``drain_timeout_s`` to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jaxllm.llm import LLM
from serve.admission import Admission
from serve.auth import BearerTokenInterceptor, load_token, server_credentials
from serve.config import ServeConfig
from serve.metrics import Metrics
from serve.proto import jaxllm_pb2
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from serve.servicer import LLMServicer

log = logging.getLogger(__name__)

SERVICE = jaxllm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name  # "jaxllm.v1.LLM"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Switch(pb_grpc.LLMServicer):
    """Answers UNAVAILABLE until the model is ready, then forwards to the real servicer (which
    cannot exist before the model does, while gRPC wants its servicers before it starts)."""

    def __init__(self):
        self.target: LLMServicer | None = None

    async def _ready(self, context) -> LLMServicer:
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading; watch health")
        return self.target

    async def Generate(self, request, context):
        target = await self._ready(context)
        async for message in target.Generate(request, context):
            yield message

    async def Tokenize(self, request, context):
        return await (await self._ready(context)).Tokenize(request, context)

    async def GetModelInfo(self, request, context):
        return await (await self._ready(context)).GetModelInfo(request, context)

    async def GetStats(self, request, context):
        return await (await self._ready(context)).GetStats(request, context)


async def serve(config: ServeConfig) -> int:
    """Runs a server until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    token = load_token(config)
    limits = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=limits)
    switch = _Switch()
    pb_grpc.add_LLMServicer_to_server(switch, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    await _set_health(health, _NOT_SERVING)
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    metrics = Metrics()
    if config.metrics_port is not None:
        metrics_port = metrics.serve_http(config.host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    log.info(
        "listening on %s:%d (%s, %s); loading the model",
        config.host,
        port,
        "TLS" if credentials else "plaintext",
        "bearer-token auth" if token else "no auth",
    )

    started = time.perf_counter()
    load = loop.run_in_executor(None, _load, config, metrics)
    done, _ = await asyncio.wait(
        [load, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED"
    )
    if load not in done:  # stopped while loading: nothing to drain
        log.info("stopped before the model was ready")
        await server.stop(grace=0)
        llm = await load
        llm.close()
        return 0
    llm = load.result()
    admission = Admission(llm.engine.config.max_slots, config.max_queue)
    metrics.watch(llm.engine, admission)
    switch.target = LLMServicer(llm, config, admission, metrics)
    await _set_health(health, _SERVING)
    log.info("ready in %.1f s: serving %s", time.perf_counter() - started, llm.name)
    print(f"jaxllm: serving {llm.name} on {config.host}:{port}", flush=True)

    watcher = asyncio.ensure_future(_watch_engine(llm, health))
    await stop.wait()
    watcher.cancel()
    log.info("draining: %d requests in flight", admission.in_flight)
    await _set_health(health, _NOT_SERVING)
    admission.drain()
    deadline = time.monotonic() + config.drain_timeout_s
    while admission.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if admission.in_flight:
        log.warning(
            "cancelling %d requests still running after %.0f s",
            admission.in_flight,
            config.drain_timeout_s,
        )
    # The remaining streams are cancelled; Health.Watch streams end here too.
    await server.stop(grace=1.0)
    llm.close()
    log.info("stopped")
    return 0


def _load(config: ServeConfig, metrics: Metrics) -> LLM:
    start = time.perf_counter()
    llm = LLM.load(
        config.model,
        mesh=config.mesh,
        dtype=config.dtype,
        rules=config.rules,
        warm_up=False,
        **config.engine,
    )
    loaded = time.perf_counter()
    metrics.load_seconds.set(loaded - start)
    # Warm-up here rather than in LLM.load so the two times are reported apart. The engine is
    # already running, but nothing can reach it until health says SERVING.
    llm.engine.warm_up()
    metrics.warm_up_seconds.set(time.perf_counter() - loaded)
    return llm


async def _watch_engine(llm: LLM, health: health_aio.HealthServicer) -> None:
    """Flips health to NOT_SERVING if the engine dies; its requests already failed."""
    while llm.engine.failure is None:
        await asyncio.sleep(0.2)
    log.error("engine failed: %s; health is NOT_SERVING", llm.engine.failure)
    await _set_health(health, _NOT_SERVING)


async def _set_health(health: health_aio.HealthServicer, status) -> None:
    for service in ("", SERVICE):
        await health.set(service, status)
