"""What scripts/soak.py sends: the random mix of requests (``Mix``), how one request goes out
over gRPC (``serve.client.AsyncClient``) or HTTP (the official ``openai`` client; raw
``httpx`` for a body that is not JSON), and what its answer counts as (``Answer``).

Every request is planned before it is sent (``Plan``): which front end, a valid or an invalid
request, and whether the client gives up at a random moment (gRPC: a cancel or a deadline;
HTTP: the connection closed). The answer is then judged against the plan: an invalid request
must get INVALID_ARGUMENT / a 4xx, a valid one its completion or, when the server is full, a
refusal (RESOURCE_EXHAUSTED / 429); anything else is ``unexpected``, and INTERNAL / UNKNOWN /
a 5xx / an error event in a stream is ``internal``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import openai

from serve.client import AsyncClient

OUTCOMES = ("ok", "cancelled", "invalid", "rejected", "killed", "internal", "unexpected")
# What a request ends as, by the front end's own words.
_GRPC_INTERNAL = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
_GRPC_GAVE_UP = {"CANCELLED", "DEADLINE_EXCEEDED"}
# A request that has not ended after this long is a hang, not a slow answer (the longest
# valid request, 256 tokens, takes seconds on this machine even behind a full queue).
HANG_S = 120.0

INVALID_GRPC = ("negative_temperature", "nan_top_p", "over_context", "token_out_of_vocab")
INVALID_GRPC += ("empty_prompt",)
INVALID_HTTP = ("negative_temperature", "over_context", "token_out_of_vocab", "unknown_model")
INVALID_HTTP += ("malformed_json", "zero_n")

# Short prompts the demo model knows the look of (it was trained on Python's standard library).
_SHORT = (
    "def ",
    "class Stack:\n",
    "import os\n",
    "    def __init__(self",
    "for i in range(",
    "if __name__ == '__main__':\n",
    "    return ",
    '"""',
    "try:\n    ",
    "def parse(text):\n    ",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    api: str  # "grpc" or "http"
    kind: str  # "short", "long" (a prompt of most of the context), "burst" or "invalid"
    prompt: str | tuple[int, ...]
    max_tokens: int
    stream: bool = True  # HTTP only: gRPC always streams
    # Seconds after sending at which the client gives up; None: it waits for the end.
    cancel_after: float | None = None
    deadline: bool = False  # gRPC: give up by the call's deadline instead of a cancel
    invalid: str | None = None  # which rule the request breaks
    sampling: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Answer:
    outcome: str  # one of OUTCOMES
    code: str  # "grpc OK", "grpc CANCELLED", "http 200", "http 429", "client cancel", ...
    seconds: float  # from sending to the end
    first_token_s: float | None  # from sending to the first token, if one came


class Mix:
    """Draws plans: ``cancel_share`` of lane requests give up at a random moment and
    ``invalid_share`` break a rule; a ``long_share`` of the valid ones carry a long prompt."""

    def __init__(
        self,
        rng: random.Random,
        *,
        context: int,
        vocab: int,
        prompts: dict[str, list[tuple[str, int]]],
        cancel_share: float = 0.30,
        invalid_share: float = 0.05,
        long_share: float = 0.15,
    ):
        self.rng, self.context, self.vocab = rng, context, vocab
        self.short, self.long = prompts["short"], prompts["long"]
        self.cancel_share, self.invalid_share = cancel_share, invalid_share
        self.long_share = long_share

    def lane(self) -> Plan:
        rng = self.rng
        api = rng.choice(("grpc", "http"))
        roll = rng.random()
        if roll < self.invalid_share:
            return self._invalid(api)
        kind = "long" if rng.random() < self.long_share else "short"
        prompt, tokens = rng.choice(self.long if kind == "long" else self.short)
        room = self.context - tokens - 2  # the server may add a BOS token
        max_tokens = rng.randint(1, min(room, 16 if kind == "long" else 160))
        cancel = roll < self.invalid_share + self.cancel_share
        return Plan(
            api,
            kind,
            prompt,
            max_tokens,
            stream=rng.random() < 0.7,
            # From before the first token (queued or prefilling) to deep into the stream.
            cancel_after=rng.uniform(0.0, 1.5) if cancel else None,
            deadline=cancel and api == "grpc" and rng.random() < 0.5,
            sampling=self._sampling(),
        )

    def burst(self) -> Plan:
        """A valid streaming request of a burst: it completes or is refused."""
        rng = self.rng
        prompt, _ = rng.choice(self.short)
        return Plan(rng.choice(("grpc", "http")), "burst", prompt, rng.randint(4, 32))

    def _sampling(self) -> dict:
        rng, sampling = self.rng, {}
        if rng.random() < 0.5:
            sampling["temperature"] = 0.0
        else:
            sampling.update(temperature=0.8, seed=rng.randrange(2**31))
            if rng.random() < 0.3:
                sampling["top_p"] = 0.9
            if rng.random() < 0.3:
                sampling["top_k"] = 40
        if rng.random() < 0.5:
            sampling["ignore_eos"] = True
        if rng.random() < 0.1:
            sampling["stop"] = ["\n\n"]
        if rng.random() < 0.1:
            sampling["logprobs"] = 3
        if rng.random() < 0.1:
            sampling["n"] = 2
        return sampling

    def _invalid(self, api: str) -> Plan:
        rng = self.rng
        case = rng.choice(INVALID_GRPC if api == "grpc" else INVALID_HTTP)
        prompt, _ = rng.choice(self.short)
        sampling, max_tokens = {}, 8
        if case == "negative_temperature":
            sampling["temperature"] = -1.0
        elif case == "nan_top_p":
            sampling["top_p"] = math.nan
        elif case == "over_context":
            prompt, max_tokens = rng.choice(self.long)[0], self.context
        elif case == "token_out_of_vocab":
            prompt = (1, self.vocab + rng.randrange(1000))
        elif case == "empty_prompt":
            prompt = ""
        elif case == "zero_n":
            sampling["n"] = 0
        return Plan(api, "invalid", prompt, max_tokens, invalid=case, sampling=sampling)


async def prompt_pool(
    token_count: Callable[[str], Awaitable[int]], context: int, rng: random.Random
) -> dict[str, list[tuple[str, int]]]:
    """Short prompts and long ones (150 tokens up to nearly the context) cut from the standard
    library's source, each with its token count (``await token_count(text)``: the server's)."""
    short = [(p, await token_count(p)) for p in _SHORT]
    source = "".join(Path(m.__file__).read_text() for m in (json.decoder, asyncio.queues))
    long = []
    for _ in range(200):
        start = rng.randrange(len(source) - 2000)
        text = source[start : start + rng.randint(500, 900)]
        if text.strip():
            n = await token_count(text)
            if 150 <= n <= context - 16:
                long.append((text, n))
        if len(long) >= 24:
            break
    if not long:
        raise RuntimeError(f"no long prompt fits a context of {context} tokens")
    return {"short": short, "long": long}


class Sender:
    """Sends plans to one server over both front ends and judges the answers."""

    def __init__(self, target: str, http_base: str, model: str):
        self.grpc = AsyncClient(target)
        # No retries: a 429 must reach the tally, not be retried behind its back.
        self.openai = openai.AsyncOpenAI(
            base_url=http_base + "/v1", api_key="soak", max_retries=0, timeout=HANG_S
        )
        self.raw = httpx.AsyncClient(base_url=http_base, timeout=HANG_S)
        self.model = model

    async def close(self) -> None:
        await self.grpc.close()
        await self.openai.close()
        await self.raw.aclose()

    async def send(self, plan: Plan) -> Answer:
        start = time.monotonic()
        first: list[float] = []  # the first token's time, once it comes
        request = self._grpc(plan, first) if plan.api == "grpc" else self._http(plan, first)
        gives_up = plan.cancel_after is not None and not plan.deadline
        try:
            code = await asyncio.wait_for(request, plan.cancel_after if gives_up else HANG_S)
        except TimeoutError:
            code = "client cancel" if gives_up else "client hang"
        end = time.monotonic()
        first_token_s = first[0] - start if first else None
        return Answer(_judge(plan, code), code, end - start, first_token_s)

    async def _grpc(self, plan: Plan, first: list[float]) -> str:
        sampling = dict(plan.sampling)
        if "logprobs" in sampling:
            sampling.update(logprobs=True, num_logprobs=sampling.pop("logprobs"))
        n = sampling.pop("n", 1)
        timeout = plan.cancel_after if plan.deadline else HANG_S
        try:
            stream = self.grpc.generate_stream(
                plan.prompt if isinstance(plan.prompt, str) else list(plan.prompt),
                timeout=timeout,
                max_tokens=plan.max_tokens,
                n=n,
                **sampling,
            )
            async for message in stream:
                if message.token_ids and not first:
                    first.append(time.monotonic())
        except grpc.aio.AioRpcError as e:
            return f"grpc {e.code().name}"
        return "grpc OK"

    async def _http(self, plan: Plan, first: list[float]) -> str:
        if plan.invalid == "malformed_json":
            reply = await self.raw.post(
                "/v1/completions", content=b'{"model": "x", "prompt": ', headers=_JSON
            )
            return f"http {reply.status_code}"
        sampling = dict(plan.sampling)
        extra = {k: sampling.pop(k) for k in ("ignore_eos", "top_k") if k in sampling}
        model = "no-such-model" if plan.invalid == "unknown_model" else self.model
        prompt = plan.prompt if isinstance(plan.prompt, str) else list(plan.prompt)
        try:
            if not plan.stream:
                await self.openai.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=plan.max_tokens,
                    extra_body=extra,
                    **sampling,
                )
                return "http 200"
            stream = await self.openai.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=plan.max_tokens,
                stream=True,
                extra_body=extra,
                **sampling,
            )
            async with stream:
                async for chunk in stream:
                    if not first and any(c.text for c in chunk.choices):
                        first.append(time.monotonic())
        except openai.APIStatusError as e:
            return f"http {e.status_code}"
        except openai.APIConnectionError as e:
            return f"http connection error: {e!r}"
        except openai.APIError:  # an error event inside a stream that began with 200
            return "http error event"
        return "http 200"


_JSON = {"content-type": "application/json"}


def _judge(plan: Plan, code: str) -> str:
    """The outcome of ``plan`` answered with ``code`` (see the module's docstring)."""
    api, _, status = code.partition(" ")
    if code == "client cancel" or (api == "grpc" and status in _GRPC_GAVE_UP):
        return "cancelled" if plan.cancel_after is not None else "unexpected"
    if api == "grpc":
        if status in _GRPC_INTERNAL:
            return "internal"
        if status == "OK":
            return "unexpected" if plan.invalid else "ok"
        if status == "INVALID_ARGUMENT":
            return "invalid" if plan.invalid else "unexpected"
        if status == "RESOURCE_EXHAUSTED" and not plan.invalid:
            return "rejected"
        return "unexpected"
    if api == "http" and status.isdigit():
        number = int(status)
        if number >= 500:
            return "internal"
        if number == 200:
            return "unexpected" if plan.invalid else "ok"
        if number == 429 and not plan.invalid:
            return "rejected"
        if 400 <= number < 500 and number != 429:
            return "invalid" if plan.invalid else "unexpected"
        return "unexpected"
    if code == "http error event":
        return "internal"
    return "unexpected"  # a hang, a dropped connection
