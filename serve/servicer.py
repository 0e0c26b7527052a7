"""The ``jaxllm.v1.LLM`` service: turns RPCs into engine requests and streams tokens back.

The engine runs in its own threads; a request's ``on_update`` wakes this asyncio handler
(through ``serve.wakeup.Waker``), which sends everything decoded since its last message in
one message. A stream that ends early for any reason (client cancel, deadline, shutdown) cancels
its engine request, whose slot is freed at the engine's next step. With ``n > 1`` the RPC
holds n engine requests (``Engine.submit_many``) and each message is one choice's
(``GenerateResponse.index``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import jax.numpy as jnp

from jaxllm.llm import LLM
from jaxllm.request import Request
from jaxllm.request_output import TokenLogprob
from serve.admission import Admission
from serve.config import ServeConfig
from serve.metrics import Metrics
from serve.proto import jaxllm_pb2 as pb
from serve.proto import jaxllm_pb2_grpc as pb_grpc
from serve.validation import InvalidRequest, validate
from serve.wakeup import Waker
from sharding import describe_mesh

log = logging.getLogger(__name__)


class LLMServicer(pb_grpc.LLMServicer):
    def __init__(self, llm: LLM, config: ServeConfig, admission: Admission, metrics: Metrics):
        self.llm, self.engine, self.config = llm, llm.engine, config
        self.admission, self.metrics = admission, metrics
        self._waker: Waker | None = None  # made on the serving loop, at the first request
        self._interval = config.stream_interval

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        try:
            job = validate(request, self.engine, self.llm.tokenizer, self.config)
        except InvalidRequest as e:
            self.metrics.requests.labels("invalid").inc()
            await context.abort(e.code, str(e))
        if job.params.prompt_logprobs is not None and self.engine.mirror is not None:
            self.metrics.requests.labels("invalid").inc()
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "sampling.prompt_logprobs: not supported on a multi-host mesh",
            )
        if job.n > self.admission.capacity:
            self.metrics.requests.labels("invalid").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"n: {job.n} choices, more than this server runs or queues at once "
                f"({self.admission.capacity})",
            )
        refusal = self.admission.try_acquire(job.n)  # one ticket per choice, as over HTTP
        if refusal is not None:
            draining = self.admission.draining
            self.metrics.requests.labels("draining" if draining else "rejected").inc()
            code = grpc.StatusCode.UNAVAILABLE if draining else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, refusal)
        outcome = "cancelled"
        try:
            async for message in self._stream(job, context, start):
                yield message
            outcome = "ok"
        except _EngineError as e:
            outcome = "error"
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:  # a bug of ours: say so plainly rather than UNKNOWN
            outcome = "error"
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        finally:
            self.admission.release(job.n)
            if outcome == "cancelled":
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    outcome = "deadline_exceeded"
            self.metrics.requests.labels(outcome).inc()

    async def _stream(self, job, context: grpc.aio.ServicerContext, start: float):
        if self._waker is None:
            self._waker = Waker(asyncio.get_running_loop())
        waker, wake = self._waker, asyncio.Event()
        try:
            if job.n == 1:
                requests = [
                    self.engine.submit(
                        job.prompt_ids,
                        job.params,
                        request_id=job.request_id or None,
                        on_update=lambda: waker.mark(wake),
                    )
                ]
            else:
                requests = self.engine.submit_many(
                    job.prompt_ids,
                    job.params,
                    job.n,
                    request_id=job.request_id or None,
                    on_update=lambda: waker.mark(wake),
                )
        except RuntimeError as e:  # the engine failed or is stopping
            raise _EngineError(str(e)) from None

        def cancel_all(_=None) -> None:
            for request in requests:
                request.cancel()  # a no-op once finished

        # Whichever way the RPC ends (cancel, deadline, shutdown, done), the slots are released.
        context.add_done_callback(cancel_all)
        choices = [_Choice(i, r) for i, r in enumerate(requests)]
        try:
            while choices:
                await wake.wait()
                wake.clear()
                for choice in list(choices):
                    message = self._next_message(choice, job, start)
                    if message is None:
                        continue
                    if message.finish_reason:
                        choices.remove(choice)
                    yield message
        finally:
            cancel_all()

    def _next_message(self, choice: _Choice, job, start: float) -> pb.GenerateResponse | None:
        """What one choice has decoded since its last message, or None if it should wait."""
        request, output = choice.request, choice.request.output
        # Read `done` first: once it is set, the text and ids below are final.
        done = request.done
        text, ids = output.text, output.token_ids[choice.sent_ids :]
        if done and request.error is not None:
            raise _EngineError(f"engine failed: {request.error}")
        # After the first token, tokens wait until stream_interval of them are ready: each
        # gRPC message costs the server (and client) CPU, so fewer larger messages trade some
        # smoothness for throughput (vLLM's --stream-interval).
        if not done and (not ids or (choice.sent_ids and len(ids) < self._interval)):
            return None
        now = time.perf_counter()
        if ids:
            if choice.first_at is None:
                choice.first_at = now
                self.metrics.ttft.observe(now - start)
            else:
                for _ in ids:  # the gap, spread over the tokens it delivered
                    self.metrics.itl.observe((now - choice.last_at) / len(ids))
            choice.last_at = now
        message = pb.GenerateResponse(
            text=text[choice.sent_chars :], token_ids=ids, request_id=request.id, index=choice.index
        )
        params = output.params
        if params.logprobs is not None:
            # Logprobs are appended before their tokens: these are all there.
            logprobs = output.logprobs[choice.sent_ids : choice.sent_ids + len(ids)]
            message.logprobs.extend(_to_proto(lp) for lp in logprobs)
        if params.prompt_logprobs is not None and not choice.sent_prompt_logprobs and ids:
            message.prompt_logprobs.extend(_to_proto(lp) for lp in output.prompt_logprobs[1:])
            choice.sent_prompt_logprobs = True
        choice.sent_ids, choice.sent_chars = choice.sent_ids + len(ids), len(text)
        if done:
            n = len(output.token_ids)
            message.finish_reason = output.finish_reason
            message.usage.prompt_tokens = len(job.prompt_ids)
            message.usage.completion_tokens = n
            if choice.index == 0:  # the prompt once per RPC, however many choices
                self.metrics.prompt_tokens.observe(len(job.prompt_ids))
            self.metrics.output_tokens.observe(n)
            if n > 1 and choice.first_at is not None:
                self.metrics.tpot.observe((choice.last_at - choice.first_at) / (n - 1))
        return message

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        limit = self.engine.config.max_seq_len * 64
        if len(request.text) > limit:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"text: longer than {limit} characters"
            )
        ids = self.llm.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        cfg, engine_cfg = self.llm.config, self.engine.config
        return pb.ModelInfo(
            model_name=self.llm.name,
            architecture=cfg.architecture,
            max_context=engine_cfg.max_seq_len,
            max_prompt_tokens=engine_cfg.max_seq_len - 1,
            vocab_size=cfg.vocab_size,
            mesh=describe_mesh(self.llm.mesh),
            dtype=jnp.dtype(self.llm.runner.spec.dtype).name,
            max_slots=engine_cfg.max_num_seqs,
            max_queue=self.config.max_queue,
            num_params=cfg.num_params,
            kv_pages=self.engine.num_pages,
            page_size=engine_cfg.page_size,
            kv_cache_bytes=self.engine.kv_cache_bytes,
        )

    async def GetStats(self, request, context) -> pb.ServerStats:
        stats = self.engine.stats()
        return pb.ServerStats(
            slots_in_use=stats["running"],
            queue_depth=stats["waiting"],
            in_flight=self.admission.in_flight,
            kv_cache_usage=self.engine.kv_cache_usage,
            draining=self.admission.draining,
            kv_pages_used=stats["pages_used"],
            kv_pages_cached=stats["pages_cached"],
            kv_pages_free=stats["pages_free"],
            prefix_cache_hit_rate=stats["prefix_hit_rate"],
            preemptions=stats["preemptions"],
            startup=_startup_stats(stats["startup"]),
            expert_tokens=stats.get("expert_tokens", []),
            expert_load_imbalance=stats.get("expert_load_imbalance", 0.0),
            spec_draft_tokens=stats.get("spec_draft_tokens", 0),
            spec_accepted_tokens=stats.get("spec_accepted_tokens", 0),
            spec_acceptance_rate=stats.get("spec_acceptance_rate", 0.0),
            spec_tokens_per_step=stats.get("spec_tokens_per_step", 0.0),
        )


def _startup_stats(report: dict) -> pb.StartupStats:
    return pb.StartupStats(
        read_seconds=report["read_s"],
        place_seconds=report["place_s"],
        compile_seconds=report["compile_s"],
        total_seconds=report["total_s"],
        programs_compiled=report["programs_compiled"],
        programs_cached=report["programs_cached"],
        compilation_cache_dir=report["cache_dir"] or "",
        weight_bytes=report["weight_bytes"],
    )


class _Choice:
    """One engine request of an RPC and how much of it has been sent."""

    def __init__(self, index: int, request: Request):
        self.index, self.request = index, request
        self.sent_ids = self.sent_chars = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.sent_prompt_logprobs = False


def _to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


class _EngineError(Exception):
    """The engine failed or stopped under this request: UNAVAILABLE, and health flips."""
