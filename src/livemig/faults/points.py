"""Fault points: named places where a test or a chaos run injects a failure into a real service.

Why named points: the chaos suite must break *real* processes at exact moments ("SIGKILL the LMO
right after it prepared the target but before it saved that") without test-only code paths.
A point is armed at run time through the service's own API (``POST /faults``, ``faults/api.py``,
scoped to a migration, VM or host, with a count), or for the whole life of the process by a plan
read once at start from ``LIVEMIG_FAULTS``::

    LIVEMIG_FAULTS="controller.after.PreparingTarget=crash,hostd.switchover=delay:2"

Actions (``faults.model.Action``): ``crash``, ``error``, ``delay:S``, ``hang`` (``hang:S``: at
most S seconds), ``hold``, ``drop``. The points, by service (``<side>`` is ``src`` or ``dst``: the
side of the migration the VM last took part in on this host):

* LMO: ``controller.before.<Phase>``, ``controller.after.<Phase>`` (the step acted on the hosts,
  its result is not saved yet), ``lmo.store.<write>`` (every store write, e.g.
  ``lmo.store.save_migration``), ``lmo.call.<service>:<METHOD> <path>`` before every call to a
  host, blockd or vswitch and ``lmo.reply.<service>:<METHOD> <path>`` when its answer arrived,
  ``lmo.flow_sync`` (``hold``: copy no flow state).
* hostd: ``hostd.<side>.qmp.<command>`` before every QMP command it sends and
  ``hostd.<side>.qmp.<command>.reply`` once QEMU answered (``error`` here is a ``QemuError``: QEMU
  refusing), ``hostd.<side>.event.<EVENT>`` for every QMP event it handles (``MIGRATION`` events
  as ``hostd.src.event.MIGRATION.<status>``), ``hostd.<side>.launch`` before QEMU starts,
  ``hostd.switchover`` inside the pause, ``hostd.flow_sync``, and ``hostd.call.vswitch:...`` /
  ``hostd.reply.vswitch:...`` around its vswitch calls (the hand-off).
* blockd: ``blockd.nbd.<read|write|flush|trim|write_zeroes>`` (data path: scoped by the
  attachment's VM and host; ``hold`` holds the request until released, ``drop`` never answers it),
  ``blockd.attach``, ``blockd.fence``, ``blockd.detach`` and their ``.after``.
* vswitch: ``vswitch.attach``, ``vswitch.detach``, ``vswitch.mapping``, ``vswitch.flows.export``,
  ``vswitch.flows.import``, ``vswitch.pause_marker``, ``vswitch.handoff``, ``vswitch.resume``, and
  ``vswitch.overlay.send`` (data path: ``drop`` loses datagrams, ``delay``/``hold`` sends them late).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from livemig.errors import InvalidRequest
from livemig.faults.model import Action, ArmRequest
from livemig.faults.registry import REGISTRY, SERVICE_PREFIXES, Outcome

PLAN_ENV = "LIVEMIG_FAULTS"
LOG_ENV = "LIVEMIG_FAULT_LOG"
_plan_applied = False
P = ParamSpec("P")
R = TypeVar("R")


def parse_plan(text: str) -> list[ArmRequest]:
    """``point=action[:seconds],...`` as arm requests that fire every time (a plan lasts the process)."""
    plan: list[ArmRequest] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, sep, action = item.partition("=")
        name, _, seconds = action.partition(":")
        if not sep or name not in {a.value for a in Action}:
            raise InvalidRequest(f"bad fault {item!r}: use point=crash|error|delay:S|hang[:S]|hold|drop")
        try:
            limit = float(seconds) if seconds else None
        except ValueError:
            raise InvalidRequest(f"bad fault {item!r}: {seconds!r} is not seconds") from None
        if name == "delay" and limit is None:
            raise InvalidRequest(f"bad fault {item!r}: delay needs seconds, e.g. delay:2")
        plan.append(ArmRequest(point=point.strip(), action=Action(name), seconds=limit, count=None))
    return plan


def configure_service(service: str, host: str | None = None) -> None:
    """Name this process's service in its registry, open its firing log (``LIVEMIG_FAULT_LOG``) and
    arm its plan (``LIVEMIG_FAULTS``). Called once by each service's command line."""
    log_path = os.environ.get(LOG_ENV)
    REGISTRY.configure(service, host, SERVICE_PREFIXES.get(service, ()), Path(log_path) if log_path else None)
    _apply_plan()


def _apply_plan() -> None:
    global _plan_applied
    if _plan_applied:
        return
    _plan_applied = True
    prefixes, REGISTRY.prefixes = REGISTRY.prefixes, ()  # the plan is the operator's: any point
    try:
        for index, request in enumerate(parse_plan(os.environ.get(PLAN_ENV, ""))):
            REGISTRY.arm(request, arm_id=f"plan-{index + 1}")
    finally:
        REGISTRY.prefixes = prefixes


async def fault_point(point: str, *, vm: str | None = None, host: str | None = None) -> bool:
    """A step point: apply what is armed at ``point``; True means "hold: skip this step"."""
    if not _plan_applied:
        _apply_plan()
    if not REGISTRY.armed:
        return False
    return await REGISTRY.fire(point, vm=vm, host=host) is not Outcome.PROCEED


def sync_point(point: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A point in front of a synchronous method (the LMO's store writes): ``crash``, ``error``,
    ``delay`` and a bounded ``hang`` apply; ``hold`` and ``drop`` do nothing (a write the caller
    believes done but that is not would test a store livemig does not have)."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            if REGISTRY.armed:
                REGISTRY.fire_sync(point)
            return method(*args, **kwargs)

        return guarded

    return decorate
