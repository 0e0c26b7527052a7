"""Start-up: the persistent compilation cache, and a report of where start-up time goes.

Most of a cold start is XLA compiling every step shape (``Engine.warm_up``). JAX can keep
compiled programs on disk, keyed by the program, the devices and the compiler options, so a
second start of the same model with the same options loads them instead of compiling.
``use_compilation_cache`` turns that on for the process, by default in a per-user folder
(``~/.cache/jaxllm/xla``); every program is cached, however quickly it compiled, so that a
warm start compiles nothing (JAX by default keeps only programs that took over a second).

``StartupReport`` collects what a user waits for: reading the weights into their shards,
placing them (stacking scanned layers in place), compiling and in total, with how many
programs were compiled and how many came from a cache. ``LLM.load`` and the server log one line per
phase and expose the figures (``Engine.stats()["startup"]``, ``GetStats``, metrics).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from jaxllm.compiles import CompileCounter

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "jaxllm" / "xla"


def use_compilation_cache(where: str | Path | bool = True) -> Path | None:
    """Turns the persistent compilation cache on for this process (``True``: the folder JAX
    is already configured with, else ``default_cache_dir()``; a path: there) or off
    (``False``), and returns the folder in use. Idempotent; safe after earlier compiles."""
    if where is False:
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        return None
    current = jax.config.jax_compilation_cache_dir
    if where is True:
        path = Path(current) if current else default_cache_dir()
    else:
        path = Path(where).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    changed = current != str(path) or not jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, however small: a warm start should compile nothing at all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if changed:
        # JAX decides once per process whether a cache is in use, at its first compile; a
        # reset makes it look again (a no-op if nothing has compiled yet).
        compilation_cache.reset_cache()
    return path


def cache_option(value: str | None) -> str | bool:
    """A ``--compilation-cache`` flag or config value as ``use_compilation_cache``'s argument:
    None the default folder, "off" none, else a folder."""
    if value is None:
        return True
    return False if value.lower() in ("off", "none", "false", "0") else value


@dataclasses.dataclass
class StartupReport:
    """Seconds and counts of one model's start-up (filled in as it goes)."""

    cache_dir: str | None = None
    weight_bytes: int = 0  # as read from the checkpoint
    read_s: float = 0.0  # checkpoint -> arrays in their shards (includes quantizing at load)
    place_s: float = 0.0  # stacking layers into the model's arrays, waiting for the device
    compile_s: float = 0.0  # warm-up: every step shape compiled (or loaded) and run once
    programs_compiled: int = 0  # XLA programs compiled during start-up
    programs_cached: int = 0  # ... and loaded from the persistent cache instead
    total_s: float = 0.0  # from LLM.load's call until ready to serve
    # Background compile (``jaxllm.staged_warm_up``): seconds from ready until every step
    # shape was compiled (0 until then, and without it); the program counts then include
    # its programs.
    background_compile_s: float = 0.0
    _started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)
    _compiles: tuple[int, int] = dataclasses.field(default=(0, 0), repr=False)

    def __post_init__(self):
        CompileCounter.install()
        self._compiles = self._counts()

    @staticmethod
    def _counts() -> tuple[int, int]:
        return CompileCounter.count, CompileCounter.cache_hits

    def weights_done(self, seconds: float) -> None:
        """The loader returned after ``seconds``; the stacking part was timed in ``place_s``."""
        self.read_s = max(0.0, seconds - self.place_s)
        gb = self.weight_bytes / 1e9
        log.info(
            "start-up: read %.2f GB of weights in %.1f s (%.2f GB/s)",
            gb,
            self.read_s,
            gb / max(self.read_s, 1e-9),
        )
        log.info(
            "start-up: placed them (stacking scanned layers, device sync) in %.1f s", self.place_s
        )

    def _count_programs(self) -> None:
        # JAX counts a program from its cache as a compile too.
        compiles, hits = (a - b for a, b in zip(self._counts(), self._compiles, strict=True))
        self.programs_compiled = compiles - hits
        self.programs_cached = hits

    def ready(self, compile_s: float | None = None) -> None:
        """Start-up is over (``compile_s``: the warm-up's seconds, if one ran)."""
        if compile_s is not None:
            self.compile_s = compile_s
        self._count_programs()
        self.total_s = time.perf_counter() - self._started
        cache = f"cache {self.cache_dir}" if self.cache_dir else "compilation cache off"
        log.info(
            "start-up: compiled %d programs, %d more loaded from the cache, warm-up %.1f s (%s)",
            self.programs_compiled,
            self.programs_cached,
            self.compile_s,
            cache,
        )
        log.info("start-up: ready in %.1f s", self.total_s)

    def background_done(self, seconds: float) -> None:
        """The background compile finished ``seconds`` after it started (at ready)."""
        self.background_compile_s = seconds
        self._count_programs()
        log.info(
            "start-up: every step shape compiled %.1f s after ready (%d programs compiled, "
            "%d loaded from the cache in all)",
            seconds,
            self.programs_compiled,
            self.programs_cached,
        )

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


# The report of the load in progress on this thread, for ``timed`` (``ModelSpec.fill``).
_current: contextvars.ContextVar[StartupReport | None] = contextvars.ContextVar(
    "jaxllm_startup", default=None
)


@contextlib.contextmanager
def recording(report: StartupReport) -> Iterator[StartupReport]:
    token = _current.set(report)
    try:
        yield report
    finally:
        _current.reset(token)


@contextlib.contextmanager
def placing() -> Iterator[None]:
    """Adds the time spent inside to the current report's ``place_s`` (if one is recording)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        report = _current.get()
        if report is not None:
            report.place_s += time.perf_counter() - start
