"""serve: the front ends of jaxllm (``jaxllm serve``): gRPC with its proto and client, the
OpenAI-compatible HTTP API (``--http-port``), and the metrics both share.

Only the client is re-exported here, so ``from serve import Client`` does not load JAX; the
server lives in ``serve.server`` (``Server``, ``serve``), the HTTP API in ``serve.http``, and
their settings in ``serve.config``.
"""

from serve.client import AsyncClient, Client, Result

__all__ = ["AsyncClient", "Client", "Result"]
