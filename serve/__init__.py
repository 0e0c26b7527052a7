"""serve: the gRPC front end of jaxllm (``jaxllm serve``), its proto, client and metrics.

Only the client is re-exported here, so ``from serve import Client`` does not load JAX; the
server lives in ``serve.server`` (``Server``, ``serve``) and its settings in ``serve.config``.
"""

from serve.client import AsyncClient, Client, Result

__all__ = ["AsyncClient", "Client", "Result"]
