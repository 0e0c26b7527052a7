"""Test-only fault injection: makes a running server's engine fail as a broken device would.

With ``JAXLLM_FAULT_FILE=PATH`` in a server's environment, its engine raises once ``PATH``
exists: from the device step if the file says ``step`` (or is empty), from the engine thread's
scheduling if it says ``scheduler``. Tests create the file while requests run, so the failure
happens at a moment they choose; the server must then fail every request with UNAVAILABLE (HTTP
503), turn health NOT_SERVING and exit non-zero. Unset, which it always is outside tests,
nothing here runs. It lives in ``serve`` because ``jaxllm`` reads no environment switches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jaxllm.engine import Engine

log = logging.getLogger(__name__)

ENV = "JAXLLM_FAULT_FILE"


class InjectedFault(RuntimeError):
    pass


def arm(engine: Engine) -> None:
    """Wraps the engine's step or its scheduler so that it raises once the file exists."""
    path = os.environ.get(ENV)
    if not path:
        return
    trigger = Path(path)
    log.warning("fault injection armed: the engine fails once %s exists", trigger)

    def fired(where: str) -> bool:
        return trigger.exists() and (trigger.read_text().strip() or "step") == where

    run_step, schedule = engine.run_step, engine.scheduler.schedule

    def faulty_step(inp, masks=None):
        if fired("step"):
            raise InjectedFault(f"injected device-step fault ({ENV})")
        return run_step(inp, masks)

    def faulty_schedule():
        if fired("scheduler"):
            raise InjectedFault(f"injected engine-thread fault ({ENV})")
        return schedule()

    engine.run_step = faulty_step
    engine.scheduler.schedule = faulty_schedule
