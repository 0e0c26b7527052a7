"""The engine loop: many requests share one model through a paged KV pool.

One request's way through:
  ``submit`` (checked, queued in the inbox) -> engine thread, every step:
  ``Scheduler.schedule`` (which decodes and prompt chunks run, which pages they use) ->
  ``step.build`` (numpy arrays) -> ``run_step`` (one jitted call: model over the step's
  tokens, paged attention, sampling; pool donated) -> ``Scheduler.update`` (append tokens,
  finish, release pages, register full pages for prefix caching) -> detokenizer thread:
  ``Request._push`` applies stop strings and streams text.

A request's state changes only on the engine thread; ``Request.cancel`` from any thread just
marks it, and the next step frees its pages. If the engine thread dies, every queued and
running request fails at once with the error and ``failure`` is set (the server's health
turns NOT_SERVING) rather than anything hanging.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np
from jaxtyping import Array, Int

from jaxllm import kv_cache, step
from jaxllm.engine_config import ACCELERATOR_KV_FRACTION, CPU_DEFAULT_KV_BYTES, EngineConfig
from jaxllm.kv_pages import KVPages
from jaxllm.request import Request
from jaxllm.request_output import RequestOutput
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.scheduler import Sequence as SchedSequence
from jaxllm.tokenizer import Tokenizer

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)


class CompileCounter:
    """Counts XLA compilations in this process (jax.monitoring's backend-compile event)."""

    count = 0
    _installed = False
    _lock = threading.Lock()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1


class Mirror(Protocol):
    """Told each step's inputs before the engine runs it, so that other processes of a
    multi-host mesh can run the same step (``jaxllm.lockstep.Leader``)."""

    def step(self, inp: step.StepInput) -> None: ...


def pool_pages(runner: ModelRunner, config: EngineConfig) -> int:
    """Pages of the KV pool: ``kv_cache_bytes`` if given; else on a one-process mesh whose
    backend reports memory, a fraction of what is free; else (CPU, multi-process) enough for
    ``max_num_seqs`` full-length sequences, at most ``CPU_DEFAULT_KV_BYTES``."""
    cfg = runner.config
    dtype = config.kv_cache_dtype or runner.spec.dtype
    per_token = kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    per_page = per_token * config.page_size
    budget = config.kv_cache_bytes
    mesh = runner.spec.mesh
    if budget is None:
        # Processes of a multi-host mesh must agree on the pool (their steps are one program),
        # and each sees only its own devices' free memory: they use the fixed rule below.
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        single_process = len(local) == mesh.devices.size
        stats = (local[0].memory_stats() or {}) if single_process else {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            # The pool's heads are split over the mesh; each device holds its share.
            budget = int(free * ACCELERATOR_KV_FRACTION) * mesh.devices.size
        else:
            need = config.max_num_seqs * config.max_pages_per_seq * per_page
            budget = min(need, CPU_DEFAULT_KV_BYTES)
    pages = budget // per_page
    if pages < config.max_pages_per_seq:
        raise ValueError(
            f"a KV pool of {budget} bytes holds {pages} pages of {config.page_size} tokens "
            f"({per_page} bytes each), fewer than one {config.max_seq_len}-token sequence "
            f"needs ({config.max_pages_per_seq}); raise kv_cache_bytes or lower max_seq_len"
        )
    return int(pages)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.num_pages = pool_pages(runner, config)
        self.pool = runner.new_pool(self.num_pages, config.page_size, config.kv_cache_dtype)
        self.pages = KVPages(self.num_pages, config.page_size, config.prefix_caching)
        self.scheduler = Scheduler(
            self.pages,
            max_num_seqs=config.max_num_seqs,
            max_step_tokens=config.max_step_tokens,
            chunk=config.chunk,
            max_prefill_rows=config.max_prefill_rows,
        )
        self._step = step.StepFunction(runner, config, self.pool)
        self._inbox: collections.deque[SchedSequence] = collections.deque()
        self._wake = threading.Condition()
        self._handoff: queue.SimpleQueue[list[tuple[Request, int]] | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.failure: BaseException | None = None
        self.mirror: Mirror | None = None  # set on the leader of a multi-host server
        self.steps = 0
        CompileCounter.install()
        log.info(
            "KV pool: %d pages of %d tokens (%.1f MiB, %s), %d step shapes",
            self.num_pages,
            config.page_size,
            self.pool.nbytes / 2**20,
            config.kv_cache_dtype or "model dtype",
            len(config.step_shapes),
        )

    # -- public API -------------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> Engine:
        if warm_up:
            self.warm_up()
        self._threads = [
            threading.Thread(target=self._engine_loop, name="jaxllm-engine", daemon=True),
            threading.Thread(target=self._detokenize_loop, name="jaxllm-detok", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._fail(RuntimeError("engine stopped"), record=False)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_update: Callable[[], None] | None = None,
    ) -> Request:
        """Queues a request; raises ValueError at once for input that cannot be served.
        ``on_update`` is called (from an engine thread) after each new token and at the end."""
        prompt_ids = self.check(prompt_ids, params)
        if self.failure is not None:
            raise RuntimeError(f"engine failed: {self.failure}")
        if self._stopping:
            raise RuntimeError("engine is stopped")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        output = RequestOutput(self.tokenizer, params, prompt_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, output, seed, on_update)
        seq = SchedSequence(
            id=request_id,
            tokens=list(prompt_ids),
            num_prompt=len(prompt_ids),
            max_tokens=params.max_tokens,
            stop_ids=frozenset(output.stop_ids),
            done=lambda: request.done,
            payload=request,
        )
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify_all()
        return request

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        context, vocab = self.config.max_seq_len, self.runner.config.vocab_size
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= context:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than the maximum of {context - 1}; "
                "prompts are never truncated"
            )
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + params.max_tokens > context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {context} tokens; lower max_tokens to at most {context - len(ids)}"
            )
        return ids

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def kv_cache_bytes(self) -> int:
        """Device bytes of the KV pool (every page, with an int8 pool's scales)."""
        return self.pool.nbytes

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool's pages held by running sequences."""
        return self.pages.used / self.num_pages

    def stats(self) -> dict[str, int | float]:
        """Counters for metrics, GetStats and benchmarks (read from any thread)."""
        sched, pages = self.scheduler, self.pages
        return {
            "running": self.running,
            "waiting": self.queue_depth,
            "pages_total": self.num_pages,
            "pages_used": pages.used,
            "pages_cached": pages.cached,
            "pages_free": pages.available - pages.cached,
            "page_size": self.config.page_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "prompt_tokens": sched.prompt_tokens,
            "prefix_hit_tokens": sched.cached_tokens,
            "prefix_hit_rate": sched.cached_tokens / max(1, sched.prompt_tokens),
            "preemptions": sched.preemptions,
            "steps": self.steps,
            "compiles": CompileCounter.count,
        }

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Blocks until no request is queued or running (finished ones are freed)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._inbox or not self.scheduler.idle:
                if self.failure is not None:
                    raise RuntimeError(f"engine failed: {self.failure}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine still busy after {timeout} s")
                self._wake.wait(0.01)

    def warm_up(self) -> None:
        """Compiles every step shape by running it once with padding only (nothing is
        written to the pool)."""
        start, compiles = time.perf_counter(), CompileCounter.count
        for shape in self.config.step_shapes:
            tokens = self.run_step(step.padding_only(shape, self.config, self.num_pages))
        np.asarray(tokens)
        log.info(
            "warm-up: %d step shapes, %d compiles, %.1f s",
            len(self.config.step_shapes),
            CompileCounter.count - compiles,
            time.perf_counter() - start,
        )

    def abort(self, error: BaseException) -> None:
        """Fails every queued and running request with ``error`` and refuses new ones (a lost
        peer process: the device loop cannot go on)."""
        self._fail(error)

    # -- the device call: the engine thread makes it; a multi-host follower replays it -----

    def run_step(self, inp: step.StepInput) -> Int[Array, " R"]:
        if self.mirror is not None:
            self.mirror.step(inp)
        tokens, self.pool = self._step(self.runner.params, self.pool, inp)
        return tokens

    # -- host loops -------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while self._next_step():
                pass
        except BaseException as e:  # a device or compiler failure: fail requests, never hang
            log.exception("engine loop failed")
            self._fail(e)
        finally:
            self._handoff.put(None)

    def _next_step(self) -> bool:
        """Schedules and runs one step; False once the engine is stopping."""
        with self._wake:
            while True:
                while self._inbox:
                    self.scheduler.add(self._inbox.popleft())
                if self._stopping:
                    return False
                plan = self.scheduler.schedule()
                if not plan.empty:
                    break
                self._wake.notify_all()  # wait_idle callers: the scheduler may be idle now
                self._wake.wait(0.05)
        inp = step.build(plan, self.config, self.num_pages)
        sampled = np.asarray(self.run_step(inp)).tolist()
        with self._wake:
            if self.failure is not None:  # aborted meanwhile: its requests already failed
                return False
            Sd, decodes, prefills = inp.shape[0], len(plan.decodes), len(plan.prefills)
            new = self.scheduler.update(plan, sampled[:decodes], sampled[Sd : Sd + prefills])
        self.steps += 1
        self._handoff.put([(seq.payload, token) for seq, token in new])
        return True

    def _detokenize_loop(self) -> None:
        while (batch := self._handoff.get()) is not None:
            for request, token in batch:
                if not request.done:
                    request._push(token)
            with self._wake:
                self._wake.notify_all()

    def _fail(self, error: BaseException, record: bool = True) -> None:
        """Ends every queued and running request with ``error``; they never hang."""
        if record:
            self.failure = error
        with self._wake:
            pending = [s.payload for s in self._inbox] + [
                s.payload for s in self.scheduler.abort_all()
            ]
            self._inbox.clear()
            self._wake.notify_all()
        for request in pending:
            request._finish("error", error)
