"""Counting XLA compilations, so tests and benchmarks can assert that serving compiles
nothing after warm-up."""

from __future__ import annotations

import threading

import jax


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
