"""Warm-up in stages: an engine serves once its smallest step shapes are compiled, and
compiles the rest in the background while it serves.

Every step shape is one XLA program (``EngineConfig.step_shapes``), and compiling all of
them is most of a cold start (tens of programs, seconds each on a CPU). A step's shape
follows from three counts the scheduler controls: decode rows (running sequences), prompt
chunks, and decode rows that verify drafts. So the engine starts with those capped at one
(``Stage``: the programs of one decode row and one chunk, two or three programs), answers
requests at once, and raises the caps stage by stage (two rows, four, ..., then every
prefill row) as each stage's programs finish compiling. A step therefore never needs a
program that is not compiled: nothing compiles on the engine thread, and when the last stage
is done the engine is exactly as fully warmed up as a blocking ``Engine.warm_up``.

While stages remain, requests beyond the cap wait in the queue (as they would behind a full
batch); on a machine whose cores the compiler also uses, the first steps run slower.
A multi-process engine warms up fully before serving: its followers must have every program
its leader may run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax

from jaxllm.engine_config import EngineConfig

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]


class Stage(NamedTuple):
    """Caps on a step while serving at this stage (``Scheduler``'s limits)."""

    decode_rows: int  # running sequences (each decodes in one row)
    prefill_rows: int  # prompt chunks in one step
    draft_rows: int  # decode rows of a step that verifies drafts (0: no drafts)


def stages(config: EngineConfig) -> list[Stage]:
    """Stages in compile order: one row first, then each decode bucket (with drafts, if
    speculating, up to ``verify_buckets``), then every prefill row."""
    verify = max(config.verify_buckets, default=0)
    out = [Stage(1, 1, 0)]
    if verify:
        out.append(Stage(1, 1, 1))
    for rows in config.decode_buckets[1:]:
        out.append(Stage(rows, 1, min(rows, verify)))
    last = out[-1]
    if config.max_prefill_rows > last.prefill_rows:
        out.append(last._replace(prefill_rows=config.max_prefill_rows))
    return out


def shapes_of(stage: Stage, config: EngineConfig) -> list[Shape]:
    """The step shapes a step within ``stage``'s caps can take."""
    return [
        (d, p, q)
        for d, p, q in config.step_shapes
        if p <= stage.prefill_rows and d <= (stage.decode_rows if q == 1 else stage.draft_rows)
    ]


def compile_all(lowerings: dict[str, Callable[[], jax.stages.Lowered]]) -> dict:
    """Lowers each program (tracing is Python: one at a time), then compiles them on as many
    threads as there are cores (XLA releases the GIL), or loads them from JAX's persistent
    cache."""
    lowered = {name: lower() for name, lower in lowerings.items()}
    if not lowered:
        return {}
    workers = max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers, "jaxllm-compile") as pool:
        return dict(
            zip(lowered, pool.map(lambda low: low.compile(), lowered.values()), strict=True)
        )


class StagedWarmUp:
    """Compiles the stages after the first on a background thread. ``lowerings(shapes)``
    gives the named programs of those shapes; ``use(compiled, stage)`` installs them and then
    raises the scheduler's caps to ``stage``; ``done(seconds)`` runs once all are compiled."""

    def __init__(
        self,
        rest: Iterable[tuple[Stage, list[Shape]]],
        lowerings: Callable[[list[Shape]], dict],
        use: Callable[[dict, Stage], None],
        done: Callable[[float], None],
    ):
        self._rest = list(rest)
        self._lowerings, self._use, self._done = lowerings, use, done
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxllm-warm-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            for stage, shapes in self._rest:
                if self._stopping.is_set():
                    return
                self._use(compile_all(self._lowerings(shapes)), stage)
                log.debug("warm-up: serving up to %s", stage)
        except BaseException as e:  # the engine keeps serving within the caps it has
            self.error = e
            log.exception("background warm-up failed; serving stays at the compiled stages")
            return
        self._done(time.perf_counter() - start)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every stage is compiled (raises if a compile failed)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"warm-up still compiling after {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"background warm-up failed: {self.error}") from self.error

    def stop(self) -> None:
        """Stops after the stage being compiled (a thread inside XLA at interpreter exit
        aborts the process, see ``Engine.start``)."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join()


def plan(config: EngineConfig) -> list[tuple[Stage, list[Shape]]]:
    """Each stage with the step shapes it adds to those of the stages before it (the first
    stage: all of its own)."""
    seen: set[Shape] = set()
    out = []
    for stage in stages(config):
        new = [shape for shape in shapes_of(stage, config) if shape not in seen]
        seen.update(new)
        out.append((stage, new))
    return out
