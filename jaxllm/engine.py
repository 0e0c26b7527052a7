"""The engine loop: many requests share one model through a paged KV pool.

One request's way through:
  ``submit`` (checked, queued in ``jaxllm.intake``) -> engine thread, every step:
  ``Scheduler.schedule`` (which decodes and prompt chunks run, which pages they use) ->
  ``step.build`` (numpy arrays) -> ``run_step`` (one jitted call: model over the step's
  tokens, paged attention, sampling; pool donated) -> ``Scheduler.update`` (append tokens,
  finish, release pages, register full pages for prefix caching) -> detokenizer thread:
  ``Request._push`` applies stop strings and streams text.

Logprobs travel with their tokens: the sampler computes them in the step's call when a row
asked (``jaxllm.sampling.sample_with_logprobs``), the engine thread copies them to the host
only then, and the detokenizer thread builds each ``TokenLogprob`` before it pushes the
token. Prompt logprobs come from a dense scoring pass (``jaxllm.scoring``) run on the engine
thread before the request is scheduled. ``submit_many`` (n > 1) holds choices 1..n-1 back
until choice 0 has computed its prompt, so they start from its cached pages. Both wait in
``jaxllm.intake`` until the scheduler may have them.

Speculative decoding (``jaxllm.speculative``, off by default): the scheduler holds pages for
each decode's drafts, the drafter fills them in before the step is built, and the step
verifies them (``Scheduler.update`` keeps what the model's own draws agree with). Structured
output (``jaxllm.structured``): a request's constraint is compiled when it is checked; each
step, the masks of the constrained rows are computed while the device runs the model's call
and applied by the sampler.

A request's state changes only on the engine thread; ``Request.cancel`` from any thread just
marks it, and the next step frees its pages. If the engine thread dies, every queued and
running request fails at once with the error and ``failure`` is set (the server's health
turns NOT_SERVING) rather than anything hanging.
"""

from __future__ import annotations

import atexit
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

from jaxllm import attention_kernels, staged_warm_up, step
from jaxllm.compiles import CompileCounter
from jaxllm.engine_config import SPECULATIVE_MAX_ROWS, EngineConfig, pool_pages
from jaxllm.intake import Intake
from jaxllm.kv_pages import KVPages
from jaxllm.request import Request
from jaxllm.request_output import RequestOutput, TokenLogprob
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import Sampled, SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.scheduler import Sequence as SchedSequence
from jaxllm.scoring import PromptScorer
from jaxllm.speculative import Drafter, DraftModelDrafter, NgramDrafter
from jaxllm.startup import StartupReport
from jaxllm.structured import Constraints
from jaxllm.tokenizer import Tokenizer

__all__ = ["CompileCounter", "Engine", "EngineConfig"]

log = logging.getLogger(__name__)


class Mirror(Protocol):
    """Told each step's inputs before the engine runs it, so that other processes of a
    multi-host mesh can run the same step (``jaxllm.lockstep.Leader``)."""

    def step(self, inp: step.StepInput) -> None: ...


# What the engine thread hands the detokenizer per new token: the request, the token, and
# (when the request asked for logprobs) the sampler's row: its logprob, top ids, top logprobs.
_Handoff = tuple[Request, int, tuple[float, np.ndarray, np.ndarray] | None]


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        warm_up_prompt_logprobs: bool = False,
        startup: StartupReport | None = None,
        draft: ModelRunner | None = None,
    ):
        """``warm_up_prompt_logprobs`` makes warm-up also compile the prompt-scoring
        buckets (``jaxllm.scoring``); without it the first prompt_logprobs request of each
        length bucket compiles on the engine thread. ``startup``: the report of the load
        that made ``runner``, completed by ``warm_up`` (``jaxllm.startup``). ``draft``: the
        draft model of ``config.speculative == "draft"`` (on ``runner``'s mesh)."""
        self.startup = startup or StartupReport()
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.warm_up_prompt_logprobs = warm_up_prompt_logprobs
        if (config.speculative == "draft") != (draft is not None):
            raise ValueError("a draft model is given exactly when speculative='draft'")
        self.num_pages = pool_pages(runner, config, draft)
        self.pool = runner.new_pool(self.num_pages, config.page_size, config.kv_cache_dtype)
        self.pages = KVPages(self.num_pages, config.page_size, config.prefix_caching)
        self.drafter: Drafter | None = None
        if config.speculative == "ngram":
            self.drafter = NgramDrafter(config)
        elif draft is not None:
            self.drafter = DraftModelDrafter(config, draft, self.num_pages, config.kv_cache_dtype)
        self.scheduler = Scheduler(
            self.pages,
            max_num_seqs=config.max_num_seqs,
            max_step_tokens=config.max_step_tokens,
            chunk=config.chunk,
            max_prefill_rows=config.max_prefill_rows,
            window=runner.config.shared_window,
            speculate=self.drafter.wanted if self.drafter else None,
            max_draft_rows=SPECULATIVE_MAX_ROWS,
        )
        self._step = step.StepFunction(runner, config, self.pool)
        self.constraints = Constraints(tokenizer, runner.config.vocab_size)
        self._scorer = PromptScorer(runner, config.max_seq_len, config.kv_cache_dtype)
        self._intake = Intake()  # submitted, not yet given to the scheduler (under _wake)
        self._wake = threading.Condition()
        self._handoff: queue.SimpleQueue[list[_Handoff] | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.failure: BaseException | None = None
        self._compiled: set[str] = set()  # names of the programs compiled so far
        self._warming: staged_warm_up.StagedWarmUp | None = None
        self.mirror: Mirror | None = None  # set on the leader of a multi-host server
        self.steps = 0
        # Mixture-of-Experts: tokens each layer routed to each expert, summed over steps
        # (``[L, E]``, padding excluded); None for a dense model.
        cfg = runner.config
        self.expert_tokens = (
            np.zeros((cfg.num_layers, cfg.num_experts), np.int64) if cfg.num_experts else None
        )
        CompileCounter.install()
        log.info(
            "KV pool: %d pages of %d tokens (%.1f MiB, %s), %d step shapes",
            self.num_pages,
            config.page_size,
            self.pool.nbytes / 2**20,
            config.kv_cache_dtype or "model dtype",
            len(config.step_shapes),
        )
        log.info(attention_kernels.choose().describe())

    # -- public API -------------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> Engine:
        """Starts the engine's threads, after compiling every step shape (``warm_up``);
        with ``background_compile`` (single process) only the first stage's, the rest
        while serving (``jaxllm.staged_warm_up``; ``wait_compiled`` waits for them)."""
        if warm_up:
            self.warm_up()
        self._threads = [
            threading.Thread(target=self._engine_loop, name="jaxllm-engine", daemon=True),
            threading.Thread(target=self._detokenize_loop, name="jaxllm-detok", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        # Daemon threads never keep a script alive, but one still inside XLA (compiling,
        # running or awaiting a step) when the interpreter finalizes is killed by
        # pthread_exit unwinding through C++ frames: the process aborts ("FATAL: exception
        # not rethrown", status -6). atexit handlers run after non-daemon threads end and
        # before finalization, last registered first, so this stops the threads also before
        # JAX's own exit handler (registered at import) tears its backends down.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._warming is not None:
            atexit.unregister(self._warming.stop)
            self._warming.stop()
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
        prompt_ids = self._accept(prompt_ids, params)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = self._sequence(prompt_ids, params, seed, request_id, on_update)
        with self._wake:
            self._intake.put(seq)
            self._wake.notify_all()
        return seq.payload

    def submit_many(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int,
        request_id: str | None = None,
        on_update: Callable[[], None] | None = None,
    ) -> list[Request]:
        """``n`` independent completions of one prompt (OpenAI's ``n``), as requests
        ``f"{request_id}-{i}"``. With ``params.seed``, choice i is seeded ``seed + i``, so each
        is reproducible whatever else runs (choice 0 equals ``submit`` with that seed).
        Choices 1..n-1 are admitted once choice 0 has computed its prompt, so that with prefix
        caching they reuse its full pages and recompute at most the last partial one.
        Cancelling one choice leaves the others running; ``on_update`` is called for each."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        prompt_ids = self._accept(prompt_ids, params)
        base = request_id or f"req-{next(self._ids)}"
        seqs = [
            self._sequence(
                prompt_ids,
                params,
                params.seed + i if params.seed is not None else secrets.randbits(63),
                f"{base}-{i}",
                on_update,
            )
            for i in range(n)
        ]
        with self._wake:
            self._intake.put(seqs[0])
            if self.config.prefix_caching and n > 1:
                self._intake.hold(seqs[0], seqs[1:])
            else:
                for seq in seqs[1:]:
                    self._intake.put(seq)
            self._wake.notify_all()
        return [seq.payload for seq in seqs]

    def _accept(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        prompt_ids = self.check(prompt_ids, params)
        if self.failure is not None:
            raise RuntimeError(f"engine failed: {self.failure}")
        if self._stopping:
            raise RuntimeError("engine is stopped")
        if params.speculative and self.drafter is None:
            raise ValueError(
                "speculative=True, but this engine has no speculative method configured "
                "(engine option speculative='ngram' or 'draft')"
            )
        if params.structured is not None and self.mirror is not None:
            # The masks are computed after the step is sent to the other processes.
            raise ValueError("structured output is not supported on a multi-host mesh")
        if params.prompt_logprobs is not None and self.mirror is not None:
            # The scoring pass is not replayed by the other processes of a multi-host mesh.
            raise ValueError("prompt_logprobs are not supported on a multi-host mesh")
        return prompt_ids

    def _sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        request_id: str | None,
        on_update: Callable[[], None] | None,
    ) -> SchedSequence:
        output = RequestOutput(self.tokenizer, params, prompt_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt_ids, output, seed, on_update)
        if params.structured is not None:  # compiled (and cached) by check
            request.matcher = self.constraints.grammar(params.structured).matcher()
        return SchedSequence(
            id=request_id,
            tokens=list(prompt_ids),
            num_prompt=len(prompt_ids),
            max_tokens=params.max_tokens,
            stop_ids=frozenset(output.stop_ids),
            done=lambda: request.done,
            payload=request,
        )

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
        if params.structured is not None:
            self.constraints.grammar(params.structured)  # ValueError if it cannot be compiled
        return ids

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + len(self._intake)

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
            "startup": self.startup.as_dict(),
            **self._expert_stats(),
            **self._speculative_stats(),
        }

    def _speculative_stats(self) -> dict:
        """Drafted tokens verified, how many were kept, their ratio, and the tokens a
        verifying decode row produced on average (1 + kept drafts; 1 without speculation)."""
        if self.drafter is None:
            return {}
        sched = self.scheduler
        return {
            "spec_draft_tokens": sched.drafted_tokens,
            "spec_accepted_tokens": sched.accepted_tokens,
            "spec_acceptance_rate": sched.accepted_tokens / max(1, sched.drafted_tokens),
            "spec_tokens_per_step": 1 + sched.accepted_tokens / max(1, sched.verify_rows),
        }

    def _expert_stats(self) -> dict:
        """Expert load balance of a Mixture-of-Experts model (nothing for a dense one):
        tokens routed to each expert (summed over layers and steps; each token counts once
        per layer for each of its k experts) and the imbalance, the busiest expert's share
        over the mean share, averaged over layers (1.0: perfectly even)."""
        if self.expert_tokens is None:
            return {}
        tokens = self.expert_tokens.copy()  # [L, E]
        per_layer = tokens.max(axis=1) / np.maximum(tokens.mean(axis=1), 1e-9)
        return {
            "expert_tokens": tokens.sum(axis=0).tolist(),
            "expert_load_imbalance": float(per_layer.mean()) if tokens.any() else 1.0,
        }

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Blocks until no request is queued or running (finished ones are freed)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while len(self._intake) or not self.scheduler.idle:
                if self.failure is not None:
                    raise RuntimeError(f"engine failed: {self.failure}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine still busy after {timeout} s")
                self._wake.wait(0.01)

    def warm_up(self) -> None:
        """Compiles every step shape ahead of time (and the prompt-scoring buckets if
        asked): every program is lowered, then compiled concurrently (or loaded from JAX's
        persistent compilation cache, ``jaxllm.startup``). Nothing runs on the device: no
        step executes, so a multi-host warm-up makes no collective call. With
        ``background_compile`` on one process, returns after the first stage's programs and
        compiles the rest on a background thread (``jaxllm.staged_warm_up``)."""
        staged = self.config.background_compile and jax.process_count() == 1
        stages = staged_warm_up.plan(self.config) if staged else []
        shapes = stages[0][1] if staged else self.config.step_shapes
        start, compiles = time.perf_counter(), CompileCounter.count
        if staged:
            self._limit(stages[0][0])
        programs = self._install(staged_warm_up.compile_all(self._lowerings(shapes)))
        if self.warm_up_prompt_logprobs:
            self._scorer.warm_up()
        seconds = time.perf_counter() - start
        log.info(
            "warm-up: %d of %d step shapes, %d programs, %d compiles, %.1f s%s",
            len(shapes),
            len(self.config.step_shapes),
            programs,
            CompileCounter.count - compiles,
            seconds,
            "; the other step shapes compile while serving" if staged else "",
        )
        self.startup.ready(seconds)
        if staged:
            self._warming = staged_warm_up.StagedWarmUp(
                stages[1:], self._lowerings, self._install_stage, self.startup.background_done
            )
            self._warming.start()
            atexit.register(self._warming.stop)  # also when the engine was never started

    def wait_compiled(self, timeout: float | None = 600.0) -> None:
        """Blocks until every step shape is compiled (at once without background compile)."""
        if self._warming is not None:
            self._warming.wait(timeout)

    def _lowerings(self, shapes) -> dict:
        """The programs ``shapes`` run that are not compiled yet, by name (to lower)."""
        lowerings = {}
        for shape in shapes:
            inp = step.padding_only(shape, self.config, self.num_pages)
            lowerings |= self._step.lowerings(self.runner.params, self.pool, inp)
        if isinstance(self.drafter, DraftModelDrafter):
            lowerings |= self.drafter.lowerings(shapes)
        return {name: lower for name, lower in lowerings.items() if name not in self._compiled}

    def _install(self, compiled: dict) -> int:
        """Steps use these programs from now on; returns how many there were."""
        self._step.use(compiled)
        if isinstance(self.drafter, DraftModelDrafter):
            self.drafter.use(compiled)
        self._compiled.update(compiled)
        return len(compiled)

    def _install_stage(self, compiled: dict, stage: staged_warm_up.Stage) -> None:
        self._install(compiled)
        self._limit(stage)

    def _limit(self, stage: staged_warm_up.Stage) -> None:
        """Keeps every step within ``stage``'s compiled shapes (raised stage by stage)."""
        config, sched = self.config, self.scheduler
        with self._wake:
            sched.max_num_seqs = min(config.max_num_seqs, stage.decode_rows)
            sched.max_prefill_rows = min(config.max_prefill_rows, stage.prefill_rows)
            sched.max_draft_rows = min(SPECULATIVE_MAX_ROWS, stage.draft_rows)
            self._wake.notify_all()

    def abort(self, error: BaseException) -> None:
        """Fails every queued and running request with ``error`` and refuses new ones (a lost
        peer process: the device loop cannot go on)."""
        self._fail(error)

    # -- the device call: the engine thread makes it; a multi-host follower replays it -----

    def run_step(self, inp: step.StepInput, masks=None) -> Sampled:
        """One step; ``masks``: see ``StepFunction.__call__`` (never on a multi-host mesh)."""
        if self.mirror is not None:
            self.mirror.step(inp)
        sampled, self.pool, load = self._step(self.runner.params, self.pool, inp, masks)
        if self.expert_tokens is not None:  # [L, E]: small, and the step is done by now
            self.expert_tokens += np.asarray(load, np.int64)
        return sampled

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
        """Scores waiting prompts, or schedules and runs one step; False once the engine is
        stopping."""
        self._score_prompts()
        with self._wake:
            while True:
                for seq in self._intake.take_ready():
                    self.scheduler.add(seq)
                if self._stopping:
                    return False
                if self._intake.scoring:
                    return True  # score them first (outside the lock)
                plan = self.scheduler.schedule()
                if not plan.empty:
                    break
                self._wake.notify_all()  # wait_idle callers: the scheduler may be idle now
                self._wake.wait(0.05)
        if self.drafter is not None:
            self.drafter.propose(plan)
        inp = step.build(plan, self.config, self.num_pages)
        Sd, Sp, Q = inp.shape
        out = self.run_step(inp, lambda: self._masks(plan, inp))
        sampled = np.asarray(out.tokens).tolist()
        # Logprobs cross to the host only when some row asked for them.
        rows = None
        if inp.sampling.logprobs.any():
            rows = np.asarray(out.logprob), np.asarray(out.top_ids), np.asarray(out.top_logprobs)
        with self._wake:
            if self.failure is not None:  # aborted meanwhile: its requests already failed
                return False
            # A decode row's logits rows start at i * Q: its newest token's, then each draft's.
            row_of = {seq: i * Q for i, seq in enumerate(plan.decodes)}
            row_of.update({c.seq: Sd * Q + i for i, c in enumerate(plan.prefills)})
            decoded = [
                sampled[row_of[seq] : row_of[seq] + 1 + len(seq.draft)] for seq in plan.decodes
            ]
            prefilled = sampled[Sd * Q : Sd * Q + len(plan.prefills)]
            new = self.scheduler.update(plan, decoded, prefilled)
            if self.drafter is not None:
                self.drafter.verified(plan)
        self.steps += 1
        handoff = []
        for seq, token, offset in new:
            request, extra = seq.payload, None
            if request.matcher is not None:
                self.constraints.sampled(request, token)
            if rows is not None and request.output.params.logprobs is not None:
                row = row_of[seq] + offset
                extra = (float(rows[0][row]), rows[1][row], rows[2][row])
            handoff.append((request, token, extra))
        self._handoff.put(handoff)
        return True

    def _masks(self, plan, inp: step.StepInput) -> np.ndarray | None:
        """The step's allowed-token masks (``jaxllm.structured``), computed while the device
        runs its model call. A constrained sequence never drafts: it samples at offset 0."""
        Sd, Sp, Q = inp.shape
        rows = [(seq.payload, i * Q) for i, seq in enumerate(plan.decodes)]
        rows += [(c.seq.payload, Sd * Q + i) for i, c in enumerate(plan.prefills) if c.samples]
        return self.constraints.masks(rows, inp.sample_step.shape[0])

    def _score_prompts(self) -> None:
        """Fills the prompt logprobs of requests that asked, then queues them (engine thread)."""
        while True:
            with self._wake:
                seq = None if self._stopping else self._intake.next_to_score()
            if seq is None:
                return
            request = seq.payload
            if not request.done:
                k = request.output.params.prompt_logprobs
                try:
                    request.output.prompt_logprobs = self._scorer(request.prompt_ids, k)
                except BaseException as e:  # in no queue now: _fail would not reach it
                    request._finish("error", e)
                    raise
            with self._wake:
                self._intake.scored(seq)

    def _detokenize_loop(self) -> None:
        while (batch := self._handoff.get()) is not None:
            for request, token, extra in batch:
                if request.done:
                    continue
                try:
                    logprob = None
                    if extra is not None:
                        k = request.output.params.logprobs
                        logprob = TokenLogprob.from_row(token, *extra, k)
                    request._push(token, logprob)
                except Exception as e:  # a bug of ours: fail this request, never hang them all
                    log.exception("detokenizing request %s failed", request.id)
                    request._finish("error", e)
            with self._wake:
                self._wake.notify_all()

    def _fail(self, error: BaseException, record: bool = True) -> None:
        """Ends every queued and running request with ``error``; they never hang."""
        if record:
            self.failure = error
        with self._wake:
            queued = [*self._intake.drain(), *self.scheduler.abort_all()]
            pending = [s.payload for s in queued]
            self._wake.notify_all()
        for request in pending:
            request._finish("error", error)
