"""Optional bearer-token auth and TLS credentials for the server.

With a token configured, every RPC except health checks needs the metadata
``authorization: Bearer <token>``; anything else is answered UNAUTHENTICATED. Health stays
open so load balancers and Kubernetes probes need no secret.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from serve.config import ServeConfig

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_token(config: ServeConfig) -> str | None:
    """The token from ``auth_token_file``, else from the ``auth_token_env`` variable."""
    if config.auth_token_file:
        token = Path(config.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"auth token file {config.auth_token_file} is empty")
        return token
    return os.environ.get(config.auth_token_env, "").strip() or None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(_OPEN_PREFIXES):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the method's that only says UNAUTHENTICATED."""

    async def deny(request, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token (metadata 'authorization: Bearer <token>')",
        )

    async def deny_stream(request, context):
        await deny(request, context)
        yield  # never reached; makes this an async generator, as a streaming reply needs

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler(deny),
        (False, True): grpc.unary_stream_rpc_method_handler(deny_stream),
        (True, False): grpc.stream_unary_rpc_method_handler(deny),
        (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
    }
    if handler is None:
        return kinds[False, False]
    return kinds[handler.request_streaming, handler.response_streaming]


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
