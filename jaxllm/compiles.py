"""Counting XLA compilations, so tests and benchmarks can assert that serving compiles
nothing after warm-up."""

from __future__ import annotations

import threading

import jax


class CompileCounter:
    """Counts XLA compilations in this process (jax.monitoring's backend-compile event).
    ``count`` includes programs loaded from the persistent compilation cache (JAX reports
    those as compiles too); ``cache_hits`` counts those alone."""

    count = 0
    cache_hits = 0
    _installed = False
    _lock = threading.Lock()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                jax.monitoring.register_event_listener(cls._on_cache_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls.count += 1

    @classmethod
    def _on_cache_event(cls, event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            cls.cache_hits += 1
