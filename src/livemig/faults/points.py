"""Fault points: named places where a test or a chaos plan injects a failure.

Why named points read from the environment: the chaos suite must break *real* processes (the LMO,
hostd) at exact moments — "SIGKILL the LMO right after it prepared the target but before it saved
that" — without test-only code paths. Each process reads its plan once from ``LIVEMIG_FAULTS``:

    LIVEMIG_FAULTS="controller.after.PreparingTarget=crash,hostd.switchover=delay:2"

Actions: ``crash`` (SIGKILL ourselves: no cleanup, no flush, like a power cut), ``hold`` (skip this
step; the caller stays where it is), ``error`` (raise ``InjectedFault``), ``delay:S`` (sleep S
seconds). Points in the code: ``controller.before.<Phase>``, ``controller.after.<Phase>`` (the
step acted on the hosts but its result is not saved yet), ``hostd.switchover`` (inside the pause),
``lmo.flow_sync`` and ``hostd.flow_sync`` (``hold`` skips copying flow state: the switch that lets
the flow-state test fail).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from functools import lru_cache

from livemig.errors import InjectedFault, InvalidRequest

log = logging.getLogger(__name__)
ACTIONS = ("crash", "hold", "error", "delay")


def parse_plan(text: str) -> dict[str, str]:
    plan: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, sep, action = item.partition("=")
        if not sep or action.split(":")[0] not in ACTIONS:
            raise InvalidRequest(f"bad fault {item!r}: use point=crash|hold|error|delay:SECONDS")
        if action.startswith("delay"):
            try:
                float(action.split(":", 1)[1])
            except (IndexError, ValueError):
                raise InvalidRequest(f"bad fault {item!r}: delay needs seconds, e.g. delay:2") from None
        plan[point.strip()] = action
    return plan


@lru_cache(maxsize=1)
def active_plan() -> dict[str, str]:
    return parse_plan(os.environ.get("LIVEMIG_FAULTS", ""))


async def fault_point(point: str) -> bool:
    """Apply the fault planned for ``point``; True means "hold: skip this step"."""
    action = active_plan().get(point)
    if action is None:
        return False
    log.warning("fault point %s: %s", point, action)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "error":
        raise InjectedFault(f"injected fault at {point}")
    if action.startswith("delay"):
        await asyncio.sleep(float(action.split(":", 1)[1]))
    return action == "hold"
