"""The fault registry of one process: what is armed, what fired, and the hot-path check.

Why one registry per process, armed at run time: a chaos run breaks *real* services at exact
moments ("the destination hostd dies when QEMU answers ``migrate-incoming``, for this migration
only"), so each service serves its registry (``faults/api.py``) and the caller arms, releases and
disarms points while the service runs. ``LIVEMIG_FAULTS`` still arms a plan at start
(``points.py``).

Why unarmed points cost nothing: every point first tests ``REGISTRY.armed`` (an empty list when
nothing is armed, one attribute load and a truth test) and only then builds its name and scope;
``bench/fault_points.py`` measures it.

Scopes: an arm may be limited to a migration, a VM or a host. A point fires with what it knows
(hostd: its host and the VM; blockd: the attachment's VM and host). The migration comes from the
LMO, which names it in a header on every call it makes for a migration (``X-Livemig-Migration``,
set into :data:`CURRENT` by the service's middleware); the registry also remembers the last
migration named for each VM (:meth:`FaultRegistry.bind`), for points that run outside a request
(a QMP event, an NBD write).

Firings are kept in memory (the last :data:`KEEP` of them) and, with ``LIVEMIG_FAULT_LOG``, appended
to a file and fsync'd *before* the action, so a ``crash`` is still on record after the restart. The
LMO copies each into its migration's timeline (``control/firings.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from fnmatch import fnmatchcase
from pathlib import Path

from livemig.errors import InjectedFault, InvalidRequest, LivemigError, NotFound
from livemig.faults.model import Action, ArmedFault, ArmRequest, FaultsView, Firing, Scope

log = logging.getLogger(__name__)

#: the header in which the LMO names the migration (and VM) a call is made for: ``m-123;vm=web``
MIGRATION_HEADER = "x-livemig-migration"
#: the header in which a service tells its callers the sequence number of its latest firing
FIRED_HEADER = "x-livemig-faults"
#: firings kept in memory (and read back from the log at start)
KEEP = 2000
#: how often a hanging caller looks whether it was released
POLL_S = 0.02
#: the longest a *synchronous* point (a store write) hangs: it blocks its thread, and in an asyncio
#: service that is the thread that would serve the release
SYNC_HANG_MAX_S = 30.0

#: the prefixes of each service's points: arming another service's point is refused, and a firing
#: is labelled with the service its point belongs to
SERVICE_PREFIXES: dict[str, tuple[str, ...]] = {
    "lmo": ("controller.", "lmo."),
    "hostd": ("hostd.",),
    "blockd": ("blockd.",),
    "vswitch": ("vswitch.",),
}


def service_of(point: str, default: str) -> str:
    return next((s for s, prefixes in SERVICE_PREFIXES.items() if point.startswith(prefixes)), default)


#: the migration (and VM) the current task works for; set by the LMO's controller per step and by
#: each service's middleware from :data:`MIGRATION_HEADER`; inherited by the tasks a request starts
CURRENT: ContextVar[Scope | None] = ContextVar("livemig_fault_scope", default=None)


class Outcome(Enum):
    """What the caller of a point does next."""

    PROCEED = "proceed"
    SKIP = "skip"  # step points: skip this step (hold); the caller stays where it is
    DROP = "drop"  # data paths: drop the request or frame


@dataclass
class _Arm:
    request: ArmRequest
    id: str
    hits: int = 0
    fired: int = 0
    waiting: int = 0
    releases: int = 0  # a waiter goes on once this grows past what it saw when it began to wait
    disarmed: bool = False
    glob: bool = field(init=False)

    def __post_init__(self) -> None:
        self.glob = any(c in self.request.point for c in "*?[")

    def matches(self, point: str) -> bool:
        pattern = self.request.point
        return pattern == point or (self.glob and fnmatchcase(point, pattern))

    def view(self, service: str) -> ArmedFault:
        return ArmedFault(**self.request.model_dump(), id=self.id, service=service, hits=self.hits,
                          fired=self.fired, waiting=self.waiting)  # fmt: skip


@dataclass(frozen=True)
class Fired:
    """A point that fired: the arm, its action, and the firing recorded for it."""

    arm: _Arm
    action: Action
    seconds: float | None
    firing: Firing


class FaultRegistry:
    """Arms and firings of one process (one service)."""

    def __init__(self, service: str = "livemig", host: str | None = None, prefixes: tuple[str, ...] = ()) -> None:
        self.service = service
        self.host = host
        self.prefixes = prefixes
        #: the hot-path test: empty (falsy) when nothing is armed
        self.armed: list[_Arm] = []
        self.firings: deque[Firing] = deque(maxlen=KEEP)
        self.seq = 0
        self.bindings: dict[str, str] = {}  # VM -> the migration the LMO last named for it
        #: per remote service URL, the latest firing sequence its replies advertised
        self.remote_seen: dict[str, int] = {}
        self.log_path: Path | None = None
        #: what ``crash`` does; in-process tests replace it (SIGKILL would take pytest with it)
        self.crash: Callable[[], None] = _sigkill_self
        self._spent: deque[_Arm] = deque(maxlen=100)  # used-up arms, still releasable while callers wait
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ set-up

    def configure(self, service: str, host: str | None = None, prefixes: tuple[str, ...] = (),
                  log_path: Path | None = None) -> None:  # fmt: skip
        """Name this process's service; with ``log_path``, keep firings there (and read back the
        ones an earlier run of this service recorded: a crash's own firing among them)."""
        self.service, self.host, self.prefixes = service, host, prefixes
        self.log_path = log_path
        if log_path is not None and log_path.exists():
            for line in log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    firing = Firing.model_validate_json(line)
                    self.firings.append(firing)
                    self.seq = max(self.seq, firing.seq)

    def reset(self) -> None:
        """Forget every arm, firing and binding (tests)."""
        with self._lock:
            for arm in self.armed:
                arm.disarmed = True
            self.armed = []
            for arm in self._spent:
                arm.disarmed = True
            self._spent.clear()
            self.firings.clear()
            self.seq = 0
            self.bindings.clear()
            self.remote_seen.clear()

    # ------------------------------------------------------------------ the API's operations

    def arm(self, request: ArmRequest, arm_id: str | None = None) -> ArmedFault:
        if self.prefixes and not request.point.startswith(self.prefixes):
            raise InvalidRequest(f"{self.service} has no fault point {request.point!r}: its points start with "
                                 f"{', '.join(self.prefixes)}")  # fmt: skip
        arm = _Arm(request, arm_id or f"{self.service}-{os.getpid()}-{next(self._ids)}")
        with self._lock:
            self.armed = [*self.armed, arm]
        log.warning("fault armed: %s (%s, scope %s, count %s)", request.describe(), arm.id,
                    request.scope.model_dump(exclude_none=True) or "any", request.count)  # fmt: skip
        return arm.view(self.service)

    def disarm(self, arm_id: str) -> ArmedFault:
        """Disarm (and release whoever waits on it)."""
        arm = self._find(arm_id, include_spent=True)
        with self._lock:
            arm.disarmed = True
            self.armed = [a for a in self.armed if a is not arm]
        log.warning("fault disarmed: %s (%s)", arm.request.describe(), arm.id)
        return arm.view(self.service)

    def disarm_all(self) -> int:
        with self._lock:
            arms, self.armed = [*self.armed, *self._spent], []
            self._spent.clear()
        for arm in arms:
            arm.disarmed = True
        return len(arms)

    def release(self, arm_id: str) -> ArmedFault:
        """Let every caller hanging or held at this arm go on (it stays armed if it has firings left)."""
        arm = self._find(arm_id, include_spent=True)
        arm.releases += 1
        log.warning("fault released: %s (%s, %d waiting)", arm.request.describe(), arm.id, arm.waiting)
        return arm.view(self.service)

    def view(self) -> FaultsView:
        arms = {a.id: a for a in [*self.armed, *self._spent_waiting()]}
        return FaultsView(service=self.service, host=self.host, armed=[a.view(self.service) for a in arms.values()],
                          fired=self.seq)  # fmt: skip

    def since(self, seq: int = 0) -> list[Firing]:
        return [f for f in list(self.firings) if f.seq > seq]

    def bind(self, migration: str, vm: str | None) -> None:
        if vm:
            self.bindings[vm] = migration

    # ------------------------------------------------------------------ firing

    def scope(self, vm: str | None = None, host: str | None = None, migration: str | None = None) -> Scope:
        """The scope a point fires in: what it knows, completed from :data:`CURRENT` and the bindings."""
        current = CURRENT.get()
        if current is not None:
            if vm is None:
                vm = current.vm
            if migration is None and (current.vm is None or current.vm == vm):
                migration = current.migration
        if migration is None and vm is not None:
            migration = self.bindings.get(vm)
        return Scope(migration=migration, vm=vm, host=host or self.host)

    def matches(self, point: str, scope: Scope) -> bool:
        """Would ``point`` fire now (without counting a hit)? For data paths that must decide
        whether to leave their fast path."""
        return any(a.matches(point) and a.request.scope.covers(scope) for a in self.armed)

    def take(self, point: str, scope: Scope) -> Fired | None:
        """Count a hit at ``point``; if an arm fires, record the firing (durably) and return it."""
        with self._lock:
            arm = next((a for a in self.armed if a.matches(point) and a.request.scope.covers(scope)), None)
            if arm is None:
                return None
            arm.hits += 1
            if arm.hits <= arm.request.after:
                return None
            arm.fired += 1
            if arm.request.count is not None and arm.fired >= arm.request.count:
                self.armed = [a for a in self.armed if a is not arm]
                self._spent.append(arm)
            self.seq += 1
            request = arm.request
            action = request.action.value if request.seconds is None else f"{request.action.value}:{request.seconds:g}"
            service = service_of(point, self.service)
            firing = Firing(id=f"{service}:{scope.host or '-'}:{os.getpid()}:{self.seq}", seq=self.seq,
                            at=datetime.now(UTC), service=service, point=point, action=action,
                            migration=scope.migration, vm=scope.vm, host=scope.host, arm=arm.id)  # fmt: skip
            self.firings.append(firing)
        self._persist(firing)
        log.warning("fault point %s fired: %s (migration %s, vm %s, host %s)", point, action, scope.migration,
                    scope.vm, scope.host)  # fmt: skip
        return Fired(arm, request.action, request.seconds, firing)

    def _take_or_raise(self, point: str, vm: str | None, host: str | None, migration: str | None,
                       error: type[LivemigError]) -> Fired | None:  # fmt: skip
        """What fired at ``point`` for this scope (None: nothing); a crash or an error happens here,
        the same for async and sync callers."""
        fired = self.take(point, self.scope(vm, host, migration))
        if fired is not None and fired.action is Action.CRASH:
            self.crash()
        if fired is not None and fired.action is Action.ERROR:
            raise error(f"injected fault at {point} ({self.service})", fault=fired.firing.id)
        return fired

    async def fire(self, point: str, *, vm: str | None = None, host: str | None = None,
                   migration: str | None = None, data: bool = False,
                   error: type[LivemigError] = InjectedFault) -> Outcome:  # fmt: skip
        """Apply whatever is armed at ``point`` (call only when :attr:`armed` is non-empty, or
        not at all: the caller's ``if REGISTRY.armed`` is the whole cost of an unarmed point).

        ``data``: the caller is a data path (``hold`` waits for the release instead of skipping;
        ``drop`` drops). ``error``: the exception an ``error`` raises (a QMP point raises
        ``QemuError``, so the caller's handling of QEMU's refusals is what is tested)."""
        fired = self._take_or_raise(point, vm, host, migration, error)
        if fired is None:
            return Outcome.PROCEED
        action = fired.action
        if action is Action.DELAY:
            await asyncio.sleep(fired.seconds or 0.0)
        elif action is Action.HANG or (data and action is Action.HOLD):
            await self._wait(fired.arm, fired.seconds)
        elif action is Action.DROP:
            return Outcome.DROP if data else Outcome.SKIP
        elif action is Action.HOLD:
            return Outcome.SKIP
        return Outcome.PROCEED

    def fire_sync(self, point: str, *, vm: str | None = None, host: str | None = None,
                  migration: str | None = None, error: type[LivemigError] = InjectedFault) -> Outcome:  # fmt: skip
        """:meth:`fire` for synchronous code (the store): delay and hang block this thread;
        a hang lasts at most ``seconds`` or :data:`SYNC_HANG_MAX_S`."""
        fired = self._take_or_raise(point, vm, host, migration, error)
        if fired is None:
            return Outcome.PROCEED
        action = fired.action
        if action is Action.DELAY:
            time.sleep(fired.seconds or 0.0)
        elif action is Action.HANG:
            self._wait_sync(fired.arm, min(fired.seconds or SYNC_HANG_MAX_S, SYNC_HANG_MAX_S))
        elif action in (Action.HOLD, Action.DROP):
            return Outcome.SKIP
        return Outcome.PROCEED

    async def wait(self, fired: Fired) -> None:
        """Wait as a ``hang``/``hold`` at a data path does (for callers that schedule it themselves)."""
        await self._wait(fired.arm, fired.seconds)

    # ------------------------------------------------------------------ internals

    async def _wait(self, arm: _Arm, limit: float | None) -> None:
        seen = arm.releases
        deadline = None if limit is None else time.monotonic() + limit
        arm.waiting += 1
        try:
            while arm.releases == seen and not arm.disarmed:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                await asyncio.sleep(POLL_S)
        finally:
            arm.waiting -= 1

    def _wait_sync(self, arm: _Arm, limit: float) -> None:
        seen = arm.releases
        deadline = time.monotonic() + limit
        arm.waiting += 1
        try:
            while arm.releases == seen and not arm.disarmed and time.monotonic() < deadline:
                time.sleep(POLL_S)
        finally:
            arm.waiting -= 1

    def _find(self, arm_id: str, include_spent: bool = False) -> _Arm:
        arms = [*self.armed, *(self._spent_waiting() if include_spent else [])]
        for arm in arms:
            if arm.id == arm_id:
                return arm
        raise NotFound(f"{self.service} has no armed fault {arm_id!r}", arm=arm_id)

    def _spent_waiting(self) -> list[_Arm]:
        """Arms whose count is used up but whose callers still wait (they can still be released)."""
        return [s for s in self._spent if s.waiting and not s.disarmed]

    def _persist(self, firing: Firing) -> None:
        if self.log_path is None:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(firing.model_dump(mode="json")) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk must not turn a fault into another fault
            log.warning("cannot record firing %s in %s: %s", firing.id, self.log_path, exc)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


#: this process's registry (each service configures it at start: ``points.configure_service``)
REGISTRY = FaultRegistry()
