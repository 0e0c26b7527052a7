"""A small Python client for the jaxllm gRPC API, blocking (``Client``) and asyncio
(``AsyncClient``). Both take one target or several (``"host:port"``, a comma-separated list
or a sequence) and spread calls over them round-robin; a gRPC name that resolves to several
servers (``"dns:///jaxllm.default.svc:50051"``, ``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``) is
spread round-robin by the channel itself.

    with Client("127.0.0.1:50051") as client:
        for piece in client.stream("Once upon a time", max_tokens=32, temperature=0):
            print(piece, end="", flush=True)
        reply = client.chat([{"role": "user", "content": "Hi!"}], max_tokens=32)
        choices = client.generate("def f(", n=3, seed=0, logprobs=True, num_logprobs=5)
        schema = {"type": "object", "properties": {"name": {"type": "string"}}}
        reply = client.generate("A person: ", structured={"json_schema": schema})
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.proto import jaxllm_pb2 as pb
from serve.proto import jaxllm_pb2_grpc as pb_grpc

SERVICE = "jaxllm.v1.LLM"
_URI_SCHEME = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|xds):")
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_SAMPLING_FIELDS = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # With logprobs: one per token id. With prompt_logprobs: one per prompt token from the
    # second on.
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    index: int = 0  # which choice, with n > 1


Messages = Sequence[Mapping[str, str]]


def generate_request(
    prompt: str | Sequence[int], request_id: str = "", *, n: int = 0, **sampling
) -> pb.GenerateRequest:
    """``prompt`` is text or token ids; ``sampling`` are SamplingParams fields (None = unset)."""
    request = pb.GenerateRequest(sampling=_sampling(sampling), request_id=request_id, n=n)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.extend(prompt)
    return request


def chat_request(
    messages: Messages, request_id: str = "", *, n: int = 0, **sampling
) -> pb.GenerateRequest:
    """``messages``: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``,
    rendered by the server with the model's chat template."""
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        sampling=_sampling(sampling),
        request_id=request_id,
        n=n,
    )


def _sampling(sampling: dict) -> pb.SamplingParams:
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling options {sorted(unknown)}")
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(sampling.get("structured"), Mapping):
        sampling["structured"] = structured(**sampling["structured"])
    return pb.SamplingParams(**sampling)


def structured(
    json_schema: str | Mapping | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
) -> pb.StructuredOutput:
    """The ``structured`` sampling option (one of these): a JSON Schema (an object or its
    JSON text), any JSON object, a regex or a Lark grammar. A dict of the same names works."""
    if isinstance(json_schema, Mapping):
        json_schema = json.dumps(json_schema)
    options = dict(json_schema=json_schema, json_object=json_object or None, regex=regex)
    options["grammar"] = grammar
    given = {k: v for k, v in options.items() if v is not None}
    if len(given) != 1:
        raise ValueError("structured takes one of json_schema, json_object, regex, grammar")
    return pb.StructuredOutput(**given)


def _logprobs(messages) -> list[TokenLogprob]:
    return [
        TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))
        for m in messages
    ]


def _targets(target: str | Sequence[str]) -> list[str]:
    """One channel per target. A gRPC name URI (``dns:///svc:50051``, ``ipv4:a:1,b:2``) is one
    target, whose addresses the channel itself spreads calls over."""
    if isinstance(target, str):
        targets = [target] if _URI_SCHEME.match(target) else target.split(",")
    else:
        targets = list(target)
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no server target given")
    return targets


def _credentials(ca_cert: str | Path | None) -> grpc.ChannelCredentials | None:
    return None if ca_cert is None else grpc.ssl_channel_credentials(Path(ca_cert).read_bytes())


def _options(server_name: str | None, max_message_bytes: int) -> list[tuple[str, object]]:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A name that resolves to several servers (a Kubernetes headless service, several
        # A records) gets calls spread over all of them, not pinned to the first.
        ("grpc.service_config", _ROUND_ROBIN),
    ]
    if server_name:  # the name the certificate was issued for, when dialling an IP address
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _merge(results: dict[int, Result], message: pb.GenerateResponse) -> None:
    result = results.setdefault(message.index, Result("", [], "", 0, 0, index=message.index))
    result.text += message.text
    result.token_ids += list(message.token_ids)
    result.logprobs += _logprobs(message.logprobs)
    result.prompt_logprobs += _logprobs(message.prompt_logprobs)
    if message.finish_reason:
        result.finish_reason = message.finish_reason
        result.prompt_tokens = message.usage.prompt_tokens
        result.completion_tokens = message.usage.completion_tokens


def _results(results: dict[int, Result], n: int) -> Result | list[Result]:
    ordered = [results[i] for i in sorted(results)]
    return ordered if n > 1 else ordered[0]


class Client:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        ca_cert: str | Path | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ):
        creds, options = _credentials(ca_cert), _options(server_name, max_message_bytes)
        self._channels = [
            grpc.secure_channel(t, creds, options) if creds else grpc.insecure_channel(t, options)
            for t in _targets(target)
        ]
        self._next = itertools.cycle(range(len(self._channels)))
        self._metadata = [("authorization", f"Bearer {token}")] if token else []

    def _stub(self) -> pb_grpc.LLMStub:
        return pb_grpc.LLMStub(self._channels[next(self._next)])

    def generate_stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **sampling
    ) -> Iterator[pb.GenerateResponse]:
        """The raw response messages; closing the iterator early cancels the request."""
        return self._messages(generate_request(prompt, **sampling), timeout)

    def _messages(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> Iterator[pb.GenerateResponse]:
        call = self._stub().Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[str]:
        """Text pieces as they arrive."""
        for message in self.generate_stream(prompt, **options):
            if message.text:
                yield message.text

    def generate(
        self, prompt: str | Sequence[int], *, n: int = 1, timeout: float | None = None, **sampling
    ) -> Result | list[Result]:
        """One Result, or a list of n for ``n > 1`` (each seeded ``seed + i`` given a seed)."""
        request = generate_request(prompt, n=n, **sampling)
        results: dict[int, Result] = {}
        for message in self._messages(request, timeout):
            _merge(results, message)
        return _results(results, n)

    def chat(
        self, messages: Messages, *, n: int = 1, timeout: float | None = None, **sampling
    ) -> Result | list[Result]:
        """The assistant's reply to ``messages`` (the server applies the chat template)."""
        results: dict[int, Result] = {}
        for message in self._messages(chat_request(messages, n=n, **sampling), timeout):
            _merge(results, message)
        return _results(results, n)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._stub().Tokenize(request, metadata=self._metadata).token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self._stub().GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata)

    def stats(self) -> pb.ServerStats:
        return self._stub().GetStats(pb.GetStatsRequest(), metadata=self._metadata)

    def health(self, service: str = SERVICE, timeout: float = 5.0) -> str:
        """``"SERVING"`` or ``"NOT_SERVING"`` for the first target."""
        stub = health_pb2_grpc.HealthStub(self._channels[0])
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of ``Client``; create it inside the event loop that uses it."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        ca_cert: str | Path | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ):
        creds, options = _credentials(ca_cert), _options(server_name, max_message_bytes)
        aio = grpc.aio
        self._channels = [
            aio.secure_channel(t, creds, options) if creds else aio.insecure_channel(t, options)
            for t in _targets(target)
        ]
        self._next = itertools.cycle(range(len(self._channels)))
        self._metadata = [("authorization", f"Bearer {token}")] if token else None

    def _stub(self) -> pb_grpc.LLMStub:
        return pb_grpc.LLMStub(self._channels[next(self._next)])

    def generate_stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **sampling
    ) -> AsyncIterator[pb.GenerateResponse]:
        return self._messages(generate_request(prompt, **sampling), timeout)

    async def _messages(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self._stub().Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def stream(self, prompt: str | Sequence[int], **options) -> AsyncIterator[str]:
        async for message in self.generate_stream(prompt, **options):
            if message.text:
                yield message.text

    async def generate(
        self, prompt: str | Sequence[int], *, n: int = 1, timeout: float | None = None, **sampling
    ) -> Result | list[Result]:
        results: dict[int, Result] = {}
        async for message in self._messages(generate_request(prompt, n=n, **sampling), timeout):
            _merge(results, message)
        return _results(results, n)

    async def chat(
        self, messages: Messages, *, n: int = 1, timeout: float | None = None, **sampling
    ) -> Result | list[Result]:
        results: dict[int, Result] = {}
        async for message in self._messages(chat_request(messages, n=n, **sampling), timeout):
            _merge(results, message)
        return _results(results, n)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = await self._stub().Tokenize(request, metadata=self._metadata)
        return list(reply.token_ids)

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub().GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata)

    async def stats(self) -> pb.ServerStats:
        return await self._stub().GetStats(pb.GetStatsRequest(), metadata=self._metadata)

    async def health(self, service: str = SERVICE, timeout: float = 5.0) -> str:
        stub = health_pb2_grpc.HealthStub(self._channels[0])
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
