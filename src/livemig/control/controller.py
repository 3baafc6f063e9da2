"""The migration controller: a level-triggered loop that walks each Migration through its phases.

Every pass observes the hosts first (is the source QEMU running? the destination? what does
the source's migration job say?) and then takes at most one idempotent step, recording each phase
transition in the migration's timeline. Because nothing is remembered between passes except
what the store holds, a restarted LMO simply resumes: the next pass observes and continues.

A pass touches only active migrations, and of those only this replica's fair part: replicas on
one PostgreSQL store share the leases evenly (``Store.claim``), each up to its ``capacity``, so
three replicas drive three times the migrations of one. Queued migrations are admitted together in
one admission transaction (``admission.Ledger``); the others are stepped concurrently, at most
``concurrency`` at once. Documents are re-read only when their version changed, and VM specs once
per migration, so a pass costs what its steps cost, not what the store holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Gauge, Histogram

from livemig.control.admission import Ledger
from livemig.control.firings import FiringCollector
from livemig.control.metrics import migration_ended
from livemig.control.network import vm_vnics
from livemig.control.policy import judge
from livemig.control.services import Services
from livemig.control.store import DirtyRate, Reservation
from livemig.errors import GuestError, HostUnreachable, LivemigError
from livemig.faults.model import Scope
from livemig.faults.points import fault_point
from livemig.faults.registry import CURRENT
from livemig.model.migration import ConditionType, Migration, Phase, utcnow
from livemig.model.vm import RunState, VmSpec, VolumeDevice
from livemig.wire import hostd
from livemig.wire.hostd import HostdClient, JobState, SourceMigrationStatus, VmStatus, VnicHandoff

log = logging.getLogger(__name__)

# phases in which a cancel still leaves the VM on the source, untouched
CANCELLABLE = frozenset({Phase.PENDING, Phase.VALIDATING, Phase.PREPARING_TARGET,
                         Phase.SYNCING_FLOWS, Phase.PRECOPY})  # fmt: skip
# a step goes on into the next phase when the one it took ends where that one starts at once: a
# migration's way to pre-copy (Validating -> PreparingTarget -> SyncingFlows) and from the
# cut-over to its cleanup are one step each, not one pass per phase. Each phase's fault points
# still fire in turn, a ``before`` point that holds ends the step there, and the step's result is
# saved once at the end of the pass: each of these phases observes before it acts, so a crash
# anywhere in the chain replays them from the last saved one (as a crash between passes does).
# The QEMU job is never started in the step that prepared it: PreCopy is saved first, so that a
# restarted LMO finds the job it may have started (and a PreCopy whose job has not started is a
# step that acts, taken by the next pass). Fewer, larger steps: fewer acting steps and saves per pass.
FOLLOWS_AT_ONCE: dict[Phase, Phase] = {
    Phase.VALIDATING: Phase.PREPARING_TARGET,
    Phase.PREPARING_TARGET: Phase.SYNCING_FLOWS,
    Phase.CUTTING_OVER: Phase.CLEANUP,
}
# how long a host may stay unreachable before the migration gives up
UNREACHABLE_GRACE_S = 30.0
# how long a migration may wait for bandwidth or a concurrency slot before it is aborted
QUEUE_TIMEOUT_S = 3600.0
# a replica's claim on a migration; another replica takes over this long after the last renewal
LEASE_S = 5.0
# how often pre-copy brings the destination's flow state up to date (so the pause's delta stays small)
FLOW_DELTA_INTERVAL_S = 1.0
# how often a destination paused by its storage (io-error) is asked to continue
RESUME_RETRY_S = 2.0
# how long after the source's QEMU reports completion the destination may still be loading the
# last state (QEMU takes well under a second); then it is held and the source resumes
LOAD_GRACE_S = 30.0
# the most migrations one replica drives at once (queued ones included); more replicas drive more
REPLICA_CAPACITY = 2000
# how many migrations a pass steps at the same time (each step mostly waits on its hosts). More
# in flight only queues at the hosts: at 1,000 simulated hosts 96 gave the same migrations per
# second as 32 and tripled what a user's call to a host waited behind them (create VM p99 104 ->
# 51 ms, pass p99 1.19 -> 0.75 s; docs/fleet.md); 32 steps of a real host's 10-20 ms each still
# make a pass's 200 steps in ~0.1 s
STEP_CONCURRENCY = 32
# how many recent passes a replica remembers for GET /controller
PASS_HISTORY = 512
# the LMO's pace (``Controller.pace``): measured over this window, from at least this many passes
# of which at least half had more due than they took, and at least this many migrations ended
PACE_WINDOW_S = 60.0
PACE_MIN_PASSES = 10
PACE_MIN_ENDED = 30
# phases whose step mostly observes (QEMU's pre-copy, the destination loading the last state): a
# replica holding N of them observes each at most every N x OBSERVE_COST_S seconds (at most every
# MAX_OBSERVE_INTERVAL_S), so its passes stay short however many it holds; with a few, every pass
OBSERVING = frozenset({Phase.PRECOPY, Phase.SWITCHOVER, Phase.CUTTING_OVER})
OBSERVE_COST_S = 0.005
MAX_OBSERVE_INTERVAL_S = 2.0
# a pass steps what fits in PASS_BUDGET_S at the cost per step this replica measures, saving the
# results included (the steps that act first, cancels first; then observations, longest
# unobserved first, at least a full concurrency's worth; no step started once the pass is
# PASS_BUDGET_S old but for a concurrency's worth of acting ones): however many migrations it
# holds or has just admitted, a pass stays short and every held migration is stepped in turn, so
# the controller answers a cancel or a finished pre-copy within a pass or two instead of waiting
# for a pass over everything
PASS_BUDGET_S = 0.5
# an observation that changed only QEMU's latest numbers (the last sample) is saved at most every
# N x SAVE_COST_S seconds (at most every MAX_SAVE_INTERVAL_S): with a few migrations, every step
SAVE_COST_S = 0.005
MAX_SAVE_INTERVAL_S = 5.0
# queued migrations one pass considers for admission, oldest first (the admission transaction is
# one lock replicas take in turn: it stays short)
ADMIT_BATCH = 256

PASS_SECONDS = Histogram("livemig_controller_pass_seconds", "duration of one controller pass",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
HELD = Gauge("livemig_controller_migrations_held", "active migrations this replica holds the lease on")


@dataclass(frozen=True)
class PassRecord:
    """One controller pass: when it started, what it held, stepped and admitted, how long it took."""

    at: float
    held: int
    stepped: int
    admitted: int
    queued: int
    seconds: float
    deferred: int = 0  # steps that were due but left to the next passes (the pass budget)
    ended: int = 0  # migrations its steps brought to an end
    acting: int = 0  # steps that act (not only observe): taken first
    # where the pass's time went: reading claims and documents, admission, the steps, saving them
    read_s: float = 0.0
    admit_s: float = 0.0
    step_s: float = 0.0
    save_s: float = 0.0


class Controller:
    def __init__(self, services: Services, interval_s: float = 0.1, replica: str | None = None,
                 lease_s: float = LEASE_S, capacity: int = REPLICA_CAPACITY,
                 concurrency: int = STEP_CONCURRENCY) -> None:  # fmt: skip
        self.services = services
        self.store = services.store
        self.volumes = services.volumes
        self.network = services.network
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.capacity = capacity
        self.concurrency = concurrency
        self.passes: deque[PassRecord] = deque(maxlen=PASS_HISTORY)
        self.finished = 0  # migrations this replica brought to a terminal phase
        # what this replica holds: each migration's document at the version it last read or wrote,
        # and its VM's spec and owner (changed only by the holder's own steps)
        self._held: dict[str, tuple[int, Migration]] = {}
        self._vms: dict[str, tuple[VmSpec, str]] = {}
        self._observed_at: dict[str, float] = {}  # migration id -> monotonic time of its last step
        self._step_cost_s = OBSERVE_COST_S  # wall seconds a pass spends per step, measured (moving average)
        self._saved_at: dict[str, float] = {}  # migration id -> monotonic time of its last save
        self._unreachable_since: dict[str, float] = {}
        self._flows_synced_at: dict[str, float] = {}  # migration id -> monotonic time of its last delta
        self.firings = FiringCollector(services, self.replica)
        self._resumed: dict[str, float] = {}  # migration id -> when a paused destination was last continued
        self._handlers: dict[Phase, Callable[[Migration], Awaitable[None]]] = {
            Phase.PENDING: self._pending,
            Phase.VALIDATING: self._validating,
            Phase.PREPARING_TARGET: self._preparing_target,
            Phase.SYNCING_FLOWS: self._syncing_flows,
            Phase.PRECOPY: self._precopy,
            Phase.SWITCHOVER: self._precopy,  # same observation, later phase
            Phase.CUTTING_OVER: self._cutting_over,
            Phase.CLEANUP: self._cleanup,
            Phase.CANCELLING: self._begin_rollback,
            Phase.ABORTING: self._begin_rollback,
            Phase.ROLLING_BACK: self._rolling_back,
        }

    def host(self, name: str) -> HostdClient:
        return self.services.host(name)

    @property
    def held(self) -> list[Migration]:
        """The active migrations this replica holds the lease on, as it last saw them (safe to call
        from another thread)."""
        while True:
            try:
                return [m for _, m in list(self._held.values())]
            except RuntimeError:  # changed while copied: copy again
                continue

    def recent_passes(self) -> list[PassRecord]:
        """The last passes (safe to call from another thread)."""
        while True:
            try:
                return list(self.passes)
            except RuntimeError:  # appended to while copied: copy again
                continue

    async def run_forever(self) -> None:
        """Pass after pass, for the life of the LMO. A pass that fails (the store went away, a
        fault was injected into a store write) is logged and the next one observes again: the
        controller task must never end while the LMO answers its API."""
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = exc.message if isinstance(exc, LivemigError) else repr(exc)
                log.warning("controller pass failed, retrying: %s", message)
                await asyncio.sleep(min(1.0, self.interval_s * 10))
            await asyncio.sleep(self.interval_s)

    async def pass_once(self) -> None:
        started, at = time.perf_counter(), time.time()
        claims = self.store.claim(self.replica, self.lease_s, self.capacity, self.pace())
        stale = [c.id for c in claims if self._held.get(c.id, (-1, None))[0] != c.version]
        fresh = self.store.load_migrations(stale) if stale else {}
        held: dict[str, tuple[int, Migration]] = {}
        for claim in claims:
            entry = fresh.get(claim.id) or self._held.get(claim.id)
            if entry is None:
                continue
            entry[1].cancel_requested = entry[1].cancel_requested or claim.cancel_requested
            held[claim.id] = entry
        self._held = held
        migrations = [m for _, m in held.values()]
        # a VM whose migration was (re)read may have moved under another replica: read it again
        reread = {fresh[i][1].vm for i in fresh}
        self._vms = {vm: spec for vm, spec in self._vms.items() if vm not in reread}
        self._vms = {m.vm: self._vms[m.vm] for m in migrations if m.vm in self._vms}
        queued = [m for m in migrations if m.phase is Phase.PENDING and not m.cancel_requested
                  and not self._timed_out(m)]  # fmt: skip
        queued_ids = {m.id for m in queued}
        now = time.monotonic()
        every = min(MAX_OBSERVE_INTERVAL_S, len(held) * OBSERVE_COST_S)
        active = [m for m in migrations if m.id not in queued_ids]
        acting: list[Migration] = []
        watched: list[Migration] = []
        for m in active:
            (acting if _acts(m) else watched).append(m)
        # cancels first, then the longest unstepped: those a late pass leaves are the next one's first
        acting.sort(key=lambda m: (not m.cancel_requested, self._observed_at.get(m.id, 0.0)))
        due = [m for m in watched if now - self._observed_at.get(m.id, 0.0) >= every]
        observing = self._within_budget(due, len(acting))
        stepping = acting + observing
        self._observed_at = {i: self._observed_at[i] for i in held if i in self._observed_at}
        self._saved_at = {i: self._saved_at[i] for i in held if i in self._saved_at}
        missing = {m.vm for m in stepping if m.vm not in self._vms}
        if missing:
            self._vms.update(self.store.vms_named(missing))
        # the hosts the steps call, in one read (not one per host whose registration expired)
        self.services.registrations.prefetch({h for m in stepping for h in (m.source, m.destination)})
        read_s = time.perf_counter() - started
        admitted = await self._admit(queued)
        admit_s = time.perf_counter() - started - read_s
        step_s = save_s = 0.0
        late = ended = 0
        if stepping:
            gate = asyncio.Semaphore(self.concurrency)
            # a step starts only while the pass is within its budget (but for a concurrency's worth
            # of acting steps, so that every pass moves some forward): a pass the machine slows
            # (busy cores, a collection, a slow store) or a burst of admissions leaves the rest to
            # the next passes, first in line, instead of growing with them
            deadline = started + PASS_BUDGET_S

            async def bounded(m: Migration, deferrable: bool) -> bool | None:
                async with gate:
                    if deferrable and time.perf_counter() > deadline:
                        return None
                    self._observed_at[m.id] = now
                    try:
                        return await self._step(m)
                    except Exception:  # a bug in one migration's step must not hold up the others
                        log.exception("migration %s: step failed; it is stepped again next pass", m.id)
                        self._held.pop(m.id, None)  # read it again from the store
                        return False

            steps_started = time.perf_counter()
            changed = await asyncio.gather(*(bounded(m, i >= self.concurrency) for i, m in enumerate(stepping)))
            step_s = time.perf_counter() - steps_started
            late = changed.count(None)
            ended = sum(1 for m, save in zip(stepping, changed, strict=True) if save and m.terminal)
            # the pass's results saved together (a few transactions): a step is idempotent and
            # observes before it acts, so a result saved at the end of the pass is as safe as one
            # saved at once (a crash in between is the controller.after.<Phase> fault)
            self._save_all([m for m, save in zip(stepping, changed, strict=True) if save])
            save_s = time.perf_counter() - steps_started - step_s
            self._measure_step_cost(step_s + save_s, len(stepping) - late)
        seconds = time.perf_counter() - started
        PASS_SECONDS.observe(seconds)
        HELD.set(len(self._held))
        self.passes.append(PassRecord(at=at, held=len(held), stepped=len(stepping) - late, admitted=admitted,
                                      queued=len(queued) - admitted, seconds=seconds,
                                      deferred=len(due) - len(observing) + late, acting=len(acting), ended=ended,
                                      read_s=read_s,
                                      admit_s=admit_s, step_s=step_s, save_s=save_s))  # fmt: skip
        await self.firings.sweep_late()

    def pace(self, now: float | None = None) -> tuple[float, int] | None:
        """This replica's pace when its passes cannot take all that is due: migrations ended per
        second over the last ``PACE_WINDOW_S``, and how many it held meanwhile (the median). None
        unless at least half of those passes left due steps to the next (a replica with time to
        spare ends migrations as fast as QEMU does, which says nothing of its own pace). The wave
        planner bounds a wave by it (``Store.lmo_pace``): at fleet scale the LMO, not the hosts'
        bandwidth, sets how fast migrations end."""
        now = time.time() if now is None else now
        recent = [p for p in self.passes if p.at >= now - PACE_WINDOW_S]
        if len(recent) < PACE_MIN_PASSES:
            return None
        ended = sum(p.ended for p in recent)
        if 2 * sum(1 for p in recent if p.deferred > 0) < len(recent) or ended < PACE_MIN_ENDED:
            return None
        span = recent[-1].at + recent[-1].seconds - recent[0].at
        held = sorted(p.held for p in recent)[len(recent) // 2]
        return (round(ended / span, 2), held) if span > 0 else None

    def _within_budget(self, due: list[Migration], acting: int) -> list[Migration]:
        """The due observations this pass makes: what fits in :data:`PASS_BUDGET_S` beside the
        ``acting`` steps (never fewer than the step concurrency, which one round of steps costs
        anyway), longest unobserved first (so that those a slow pass does not start are the first
        of the next); the rest wait for the next passes."""
        room = max(self.concurrency, int(PASS_BUDGET_S / self._step_cost_s) - acting)
        return sorted(due, key=lambda m: self._observed_at.get(m.id, 0.0))[:room]

    def _measure_step_cost(self, seconds: float, steps: int) -> None:
        """Fold a pass's wall time per step (stepping and saving) into the moving average the
        budget divides by. Only a pass with at least a full concurrency of steps measures the
        throughput; fewer measure one step's latency, which would shrink the budget for nothing."""
        if steps >= self.concurrency:
            self._step_cost_s = 0.5 * self._step_cost_s + 0.5 * max(seconds / steps, 1e-4)

    async def _admit(self, queued: list[Migration]) -> int:
        """Admit what fits of this replica's queued migrations, oldest first, in one admission
        transaction (replicas take turns): each admitted one gets its bandwidth share and moves to
        Validating; the others say why they wait (saved only when that changes). Returns how many."""
        if not queued or await fault_point("controller.before.Pending"):
            return 0
        admitted: list[Migration] = []
        waiting: list[Migration] = []
        queued = sorted(queued, key=lambda q: (q.created_at, q.id))[:ADMIT_BATCH]
        with self.store.admission() as round_:
            reservations = round_.reservations()
            hosts = {m.source for m in queued} | {m.destination for m in queued}
            hosts |= {r.source for r in reservations} | {r.destination for r in reservations}
            ledger = Ledger(reservations, round_.budgets(hosts))
            for m in queued:
                before = m.condition(ConditionType.BANDWIDTH_RESERVED)
                reason_before = None if before is None else (before.status, before.reason)
                if self._admit_one(m, ledger):
                    admitted.append(m)
                    continue
                after = m.condition(ConditionType.BANDWIDTH_RESERVED)
                if after is None or (after.status, after.reason) != reason_before:
                    waiting.append(m)
            versions = round_.save_many(admitted, self.replica)
        for m, version in zip(admitted, versions, strict=True):
            if version is None:
                self._lost(m)
            else:
                self._held[m.id] = (version, m)
        await fault_point("controller.after.Pending")
        self._save_all(waiting)
        return sum(1 for version in versions if version is not None)

    def _admit_one(self, m: Migration, ledger: Ledger) -> bool:
        """Admission of one queued migration against ``ledger`` (recorded there when admitted)."""
        decision = ledger.admit(m)
        if decision.reserved_mib_s is None:
            m.set_condition(ConditionType.BANDWIDTH_RESERVED, False, decision.reason)
            return False
        m.reserved_mib_s = decision.reserved_mib_s
        m.params.max_bandwidth_mib_s = decision.reserved_mib_s  # QEMU's max-bandwidth = the share
        m.set_condition(ConditionType.BANDWIDTH_RESERVED, True, decision.reason)
        m.transition(Phase.VALIDATING, decision.reason)
        ledger.add(Reservation(m.id, m.source, m.destination, decision.reserved_mib_s))
        return True

    def _save(self, m: Migration) -> bool:
        """Save a step's result while this replica holds the lease (remembering the new version)."""
        saved = self._saved(m, self.store.save_migration_versioned(m, self.replica))
        if saved:
            self.store.record_dirty_rates(_moved_guests_rates([m]))
        return saved

    def _save_all(self, migrations: list[Migration]) -> None:
        if migrations:
            versions = self.store.save_migrations(migrations, self.replica)
            saved = [m for m, version in zip(migrations, versions, strict=True) if self._saved(m, version)]
            self.store.record_dirty_rates(_moved_guests_rates(saved))

    def _saved(self, m: Migration, version: int | None) -> bool:
        if version is None:
            self._lost(m)
            return False
        self._saved_at[m.id] = time.monotonic()
        if m.terminal:
            self._held.pop(m.id, None)
            self._vms.pop(m.vm, None)
            self._flows_synced_at.pop(m.id, None)
            self.finished += 1
            migration_ended(m)  # only the lease holder's save of the end succeeds: counted once
        else:
            self._held[m.id] = (version, m)
        return True

    def _lost(self, m: Migration) -> None:
        log.warning("migration %s: lease lost to another replica; discarding this step's record", m.id)
        self._held.pop(m.id, None)
        self._vms.pop(m.vm, None)

    def _vm(self, name: str) -> tuple[VmSpec, str]:
        """The VM's spec and owner: from what this replica holds, else from the store."""
        found = self._vms.get(name)
        if found is None:
            found = self._vms[name] = self.store.vm(name)
        return found

    async def step(self, m: Migration) -> None:
        """One observe-then-act step for one migration, saved to the store afterwards."""
        if await self._step(m):
            self._save(m)

    async def _step(self, m: Migration) -> bool:
        """One step; whether its result should be saved (a step that only brought QEMU's latest
        numbers is saved less often when the replica holds many).

        Every call the step makes names the migration (a header the services' fault points read),
        and the fault firings that belong to it are copied into its timeline before it is saved."""
        token = CURRENT.set(Scope(migration=m.id, vm=m.vm))
        try:
            return await self._scoped_step(m)
        finally:
            CURRENT.reset(token)

    async def _scoped_step(self, m: Migration) -> bool:
        if m.terminal:  # ended in a pass whose save failed: only its saving is left to do
            return True
        loop = asyncio.get_running_loop()
        seen = len(m.timeline)
        before = _fingerprint(m)
        try:
            if m.cancel_requested and m.phase in CANCELLABLE:
                m.transition(Phase.CANCELLING, "cancel requested")
            elif self._timed_out(m) and m.phase in CANCELLABLE:
                self._fail(m, Phase.ABORTING, f"did not complete within {m.params.timeout_s:.0f} s",
                           end=Phase.ABORTED)  # fmt: skip
            else:
                await self._phases(m)
            self._unreachable_since.pop(m.id, None)
        except HostUnreachable as exc:
            for name in (m.source, m.destination):  # its address may have changed: read it again
                self.services.forget(name)
            first = self._unreachable_since.setdefault(m.id, loop.time())
            if loop.time() - first > UNREACHABLE_GRACE_S and m.phase in CANCELLABLE:
                self._fail(m, Phase.ABORTING, f"{exc.message} for {UNREACHABLE_GRACE_S:.0f} s")
        except LivemigError as exc:
            if m.phase in (Phase.ROLLING_BACK, Phase.CANCELLING, Phase.ABORTING):
                log.warning("migration %s: rollback step failed, will retry: %s", m.id, exc.message)
            elif m.phase in (Phase.CUTTING_OVER, Phase.CLEANUP):
                log.warning("migration %s: %s step failed, will retry: %s", m.id, m.phase, exc.message)
            else:
                self._fail(m, Phase.ABORTING, exc.message)
        for entry in m.timeline[seen:]:
            entry.by = self.replica
        try:
            await self.firings.collect(m, final=m.terminal)
        except LivemigError as exc:  # never let the record of a fault become one
            log.warning("migration %s: fault firings not collected: %s", m.id, exc.message)
        quiet = min(MAX_SAVE_INTERVAL_S, len(self._held) * SAVE_COST_S)
        return _fingerprint(m) != before or time.monotonic() - self._saved_at.get(m.id, 0.0) >= quiet

    async def _phases(self, m: Migration) -> None:
        """The migration's current phase, then each that follows it at once (``FOLLOWS_AT_ONCE``),
        each between its own fault points; a ``before`` point that holds ends the step there."""
        while not await fault_point(f"controller.before.{m.phase.value}"):
            phase = m.phase
            await self._handlers[phase](m)
            await fault_point(f"controller.after.{phase.value}")
            if FOLLOWS_AT_ONCE.get(phase) is not m.phase:
                return

    def _timed_out(self, m: Migration) -> bool:
        """Queued (Pending) migrations wait up to QUEUE_TIMEOUT_S; admitted ones get timeout_s."""
        admitted = next((e.at for e in m.timeline if e.phase is Phase.VALIDATING), None)
        if admitted is None:
            return (utcnow() - m.created_at).total_seconds() > QUEUE_TIMEOUT_S
        return (utcnow() - admitted).total_seconds() > m.params.timeout_s

    def _fail(self, m: Migration, via: Phase, reason: str, end: Phase = Phase.FAILED) -> None:
        """Start rolling back; the migration ends in ``end`` once the source is safe again."""
        m.reason = reason
        m.rollback_to = end
        m.transition(via, reason)

    # ------------------------------------------------------------------ forward path

    async def _pending(self, m: Migration) -> None:
        """A queued migration stepped on its own (the pass admits them together in ``_admit``)."""
        with self.store.admission() as round_:
            reservations = [r for r in round_.reservations() if r.id != m.id]
            names = {m.source, m.destination} | {r.source for r in reservations} | {r.destination for r in reservations}
            self._admit_one(m, Ledger(reservations, round_.budgets(names)))

    async def _validating(self, m: Migration) -> None:
        spec, owner = self._vm(m.vm)
        if owner != m.source:
            raise LivemigError(f"VM {m.vm} is on {owner}, not on the source {m.source}")
        source = self.host(m.source)
        observed = await source.observe(m.vm)
        if observed is None or observed.state is not RunState.RUNNING:
            raise LivemigError(f"VM {m.vm} is not running on {m.source} "
                               f"({observed.state.value if observed else 'absent'})")  # fmt: skip
        src, dst = self.services.registration(m.source), self.services.registration(m.destination)
        if src.qemu_version is None or src.accel is None:
            src_info = await source.run(hostd.info())
            src = src.model_copy(update={"qemu_version": src_info.qemu_version, "accel": src_info.accel})
        # the destination's room was reserved in the LMO's inventory when the migration was created;
        # an older hostd that reports no facts is asked, and its own count decides
        if dst.qemu_version is None or dst.accel is None or dst.memory_mib is None:
            dst_info = await self.host(m.destination).run(hostd.info())
            if m.vm not in dst_info.vms and dst_info.memory_free_mib < spec.memory_mib:
                raise LivemigError(f"destination {m.destination} has {dst_info.memory_free_mib} MiB free, "
                                   f"VM needs {spec.memory_mib} MiB")  # fmt: skip
            dst = dst.model_copy(update={"qemu_version": dst_info.qemu_version, "accel": dst_info.accel})
        m.transition(Phase.PREPARING_TARGET, "source running, destination has room",
                   source_qemu=src.qemu_version, destination_qemu=dst.qemu_version,
                   machine=spec.machine, accel=f"{src.accel}->{dst.accel}")  # fmt: skip

    async def _preparing_target(self, m: Migration) -> None:
        spec, _ = self._vm(m.vm)
        exports = await self.volumes.ensure_attached(spec, m.destination)
        policies = m.params.resolved_policies()
        tls_source = m.source if self.services.migration_tls else None  # only its QEMU may send (tls-authz)
        call = hostd.prepare_incoming(spec, exports, policies, tls_source)
        uri = (await self.host(m.destination).run(call)).uri
        m.incoming_uri = uri
        m.set_condition(ConditionType.TARGET_PREPARED, True, uri)
        m.transition(Phase.SYNCING_FLOWS, f"destination listening on {uri}")

    async def _syncing_flows(self, m: Migration) -> None:
        spec, _ = self._vm(m.vm)
        vnics = vm_vnics(spec)
        if not vnics:
            m.transition(Phase.PRECOPY, "no VNICs on the livemig dataplane: no flow state to copy")
            return
        await self.network.push(self._in_flight(m))  # dual ingress: source and destination
        copied = await self._copy_flow_changes(m, vnics)
        m.set_condition(ConditionType.FLOWS_SYNCED, True, f"bulk copy: destination holds the source's flow versions "
                                             f"{m.flow_versions}")  # fmt: skip
        m.transition(Phase.PRECOPY, f"dual ingress on for {', '.join(vnics)}; flows copied in bulk: {copied}",
                   flows=copied, flow_versions=dict(m.flow_versions))  # fmt: skip

    def _in_flight(self, m: Migration) -> list[Migration]:
        """Active migrations as the store has them, with ``m`` as this step has it."""
        return [m, *(other for other in self.store.migrations(active_only=True) if other.id != m.id)]

    def _handoffs(self, m: Migration, spec: VmSpec) -> list[VnicHandoff]:
        """What the source hostd hands over inside the pause: per VNIC, where it goes and the flow
        version the destination already has (so only later changes travel in the pause)."""
        url = self.services.registration(m.destination).vswitch_url
        return [VnicHandoff(vnic=v, destination_vswitch=url, flows_since=m.flow_versions.get(v, 0))
                for v in vm_vnics(spec) if url]  # fmt: skip

    async def _precopy(self, m: Migration) -> None:
        source = self.host(m.source)
        job = await source.observe_migration(m.vm)
        if job is None or job.uri != m.incoming_uri:
            if m.phase is Phase.SWITCHOVER or _condition(m, ConditionType.MIGRATION_STARTED):
                await self._job_lost(m, source)
                return
            assert m.incoming_uri is not None
            spec, _ = self._vm(m.vm)
            tls_hostname = m.destination if self.services.migration_tls else None
            job = await source.run(hostd.migrate(m.vm, m.incoming_uri, m.params, self._handoffs(m, spec),
                                                 tls_hostname))  # fmt: skip
            plain = "plain TCP: the LMO runs without migration TLS (an --insecure region)"
            m.set_condition(ConditionType.STREAM_ENCRYPTED, job.encryption is not None, job.encryption or plain)
            held_by = job.enforced_by or "QEMU max-bandwidth (no tc on loopback hosts)"
            m.set_condition(ConditionType.MIGRATION_STARTED, True,
                            f"{m.incoming_uri}; {m.params.resolved_policies().describe()}")  # fmt: skip
            m.set_condition(
                ConditionType.BANDWIDTH_ENFORCED, True, f"{m.params.max_bandwidth_mib_s} MiB/s held by {held_by}"
            )
            ignored = "".join(f"; QEMU kept {k}={v['qemu']} (asked {v['asked']})" for k, v in job.qemu_ignored.items())
            m.note(f"the source QEMU reports {_settings_line(job.qemu_settings)}{ignored}", qemu=job.qemu_settings,
                   qemu_ignored=job.qemu_ignored)  # fmt: skip
        self._absorb(m, job)
        if m.phase is Phase.PRECOPY and job.state is JobState.RUNNING:
            spec, _ = self._vm(m.vm)
            started = m.phase_started(Phase.PRECOPY) or m.timeline[-1].at
            policies = m.params.resolved_policies()
            verdict = judge(job.samples, m.params.policy, m.params.max_bandwidth_mib_s, spec.memory_mib, started,
                            policies)  # fmt: skip
            if verdict.abort:
                await source.run(hostd.cancel_migration(m.vm))
                self._fail(m, Phase.ABORTING, verdict.reason, end=Phase.ABORTED)
                return
            if policies.auto_converge.enabled:
                self._note_throttle(m, job, verdict.throttled)
            await self._sync_flow_deltas(m, spec)
        if m.phase is Phase.PRECOPY:
            pause = next((e for e in job.events if e.status in ("pre-switchover", "device")), None)
            if pause is not None:
                m.transition(Phase.SWITCHOVER, "source paused for the final dirty pages and device state",
                           at=pause.at)  # fmt: skip
        if job.state is JobState.COMPLETED:
            if m.phase is Phase.PRECOPY:
                m.transition(Phase.SWITCHOVER, "source paused", at=job.events[-1].at if job.events else None)
            stats = job.stats.model_dump() if job.stats else {}
            m.transition(Phase.CUTTING_OVER, "QEMU reports the migration completed", **stats)
        elif job.state in (JobState.FAILED, JobState.CANCELLED):
            reason = f"QEMU reports migration {job.state.value}: {job.error or 'no detail'}"
            self._fail(m, Phase.ABORTING, reason + await self._destination_says(m))

    async def _destination_says(self, m: Migration) -> str:
        """What the destination's QEMU logged about the failed stream (e.g. a TLS refusal), if anything."""
        try:
            observed = await self.host(m.destination).observe(m.vm)
        except LivemigError:
            return ""
        if observed is None or not observed.qemu_errors:
            return ""
        return f"; destination {m.destination}'s QEMU: {observed.qemu_errors[-1]}"

    @staticmethod
    def _note_throttle(m: Migration, job: SourceMigrationStatus, why: str) -> None:
        """Per pre-copy round, the throttle auto-converge holds the vCPUs at, once QEMU throttles
        or the judgement would otherwise abort: the timeline shows how the guest was slowed."""
        if not job.samples:
            return
        last = job.samples[-1]
        noted = [e.data for e in m.timeline if e.phase is Phase.PRECOPY and "throttle_pct" in e.data]
        if (last.cpu_throttle_pct == 0 and not why) or (noted and noted[-1]["round"] >= last.dirty_sync_count):
            return
        message = f"round {last.dirty_sync_count}: vCPUs throttled {last.cpu_throttle_pct}%"
        m.note(f"{message}; {why}" if why else message, round=last.dirty_sync_count,
               throttle_pct=last.cpu_throttle_pct, dirty_mib_s=round(last.dirty_rate_mib_s, 1),
               remaining_mib=round(last.remaining_bytes / (1024 * 1024), 1))  # fmt: skip

    async def _sync_flow_deltas(self, m: Migration, spec: VmSpec) -> None:
        """About once a second of pre-copy, copy the flows changed since the destination's version
        and tell the source hostd, so the delta inside the pause holds only the last changes.

        Best effort: a vswitch that does not answer now only makes the pause's delta larger."""
        vnics = vm_vnics(spec)
        now = time.monotonic()
        if not vnics or now - self._flows_synced_at.get(m.id, 0.0) < FLOW_DELTA_INTERVAL_S:
            return
        self._flows_synced_at[m.id] = now
        before = dict(m.flow_versions)
        try:
            await self._copy_flow_changes(m, vnics)
            if m.flow_versions != before:
                await self.host(m.source).run(hostd.advance_flow_versions(m.vm, dict(m.flow_versions)))
                m.set_condition(ConditionType.FLOWS_SYNCED, True, f"destination holds the source's flow versions "
                                                     f"{m.flow_versions}; the pause sends later changes")  # fmt: skip
        except LivemigError as exc:
            log.warning("migration %s: flow delta skipped (%s); the pause sends more", m.id, exc.message)

    async def _copy_flow_changes(self, m: Migration, vnics: list[str]) -> dict[str, int]:
        """Copy each VNIC's flows changed after the version the destination holds (all, the first
        time) and record the new versions; returns how many flows each import took."""
        source, destination = self.services.registration(m.source), self.services.registration(m.destination)
        copied: dict[str, int] = {}
        for vnic in vnics:
            copied[vnic], m.flow_versions[vnic] = await self.network.copy_flows(
                vnic, source, destination, m.flow_versions.get(vnic, 0)
            )
        return copied

    async def _job_lost(self, m: Migration, source: HostdClient) -> None:
        """The source hostd restarted and lost its job: QEMU's runstate says what happened."""
        observed = await source.observe(m.vm)
        if observed is not None and observed.state is RunState.POSTMIGRATE:
            m.transition(Phase.CUTTING_OVER, "source hostd restarted; QEMU says migration completed")
        else:
            self._fail(m, Phase.ABORTING, "source hostd restarted during the migration; QEMU did not complete")

    def _absorb(self, m: Migration, job: SourceMigrationStatus) -> None:
        m.record_samples(job.samples)  # the history the dashboard and `migrations plot` draw
        if job.stats is not None:
            m.stats = job.stats

    async def _cutting_over(self, m: Migration) -> None:
        destination, source = self.host(m.destination), self.host(m.source)
        observed = await destination.observe(m.vm)
        _, owner = self._vm(m.vm)
        if owner == m.destination:  # already cut over before a restart
            m.transition(Phase.CLEANUP, "ownership already moved")
            return
        if observed is not None and observed.state is RunState.INMIGRATE and self._loading_too_long(m):
            await self._hold_destination(m)
            return
        if observed is not None and observed.state in (RunState.UNREACHABLE, RunState.INMIGRATE):
            return  # does not answer now, or still loading the last state: observe again, never guess
        if observed is None or not _has_guest(observed):
            self._fail(m, Phase.ABORTING, f"destination VM is {observed.state.value if observed else 'absent'} "
                                          "after QEMU reported completion")  # fmt: skip
            return
        if m.stats.stopped_at is not None and observed.resumed_at is not None:
            m.stats.guest_pause_ms = round((observed.resumed_at - m.stats.stopped_at) * 1000, 1)
        spec, _ = self._vm(m.vm)
        if _has_volumes(spec):
            await self.volumes.fence(m.vm, m.source)  # a late write from the source can never land now
        await source.run(hostd.destroy_vm(m.vm))
        # the reservation there becomes the VM's placement; on a worker thread, so that the other
        # steps of the pass go on while the store's round trips run
        await asyncio.to_thread(self.store.move_vm, m.vm, m.destination)
        self._vms[m.vm] = (spec, m.destination)
        self.network.place(vm_vnics(spec), m.destination)
        assert observed is not None
        m.transition(
            Phase.CLEANUP, f"destination {observed.state.value}; source QEMU stopped; owner is {m.destination}"
        )
        if vm_vnics(spec):
            await self.network.push(self._in_flight(m))  # ingress only to the destination from now on

    @staticmethod
    def _loading_too_long(m: Migration) -> bool:
        entered = m.phase_started(Phase.CUTTING_OVER)
        return entered is not None and (utcnow() - entered).total_seconds() > LOAD_GRACE_S

    async def _hold_destination(self, m: Migration) -> None:
        """The source's QEMU completed, and the destination's has not finished loading the last
        state for ``LOAD_GRACE_S``: without this the migration would wait for ever, the guest
        paused on both hosts. Hold the destination first (it can no longer start the guest by
        itself, so resuming the source can never race it), then: if it ran the guest before the
        hold, it *is* the VM and the migration goes on; if not, roll back to the source."""
        held = await self.host(m.destination).run(hostd.hold_incoming(m.vm))
        if held.resumed_at is not None:
            m.note(f"the destination resumed the guest before it was held ({held.state.value}): going forward")
            return
        waited = f"the destination QEMU did not finish loading the last state within {LOAD_GRACE_S:g} s"
        m.set_condition(ConditionType.DESTINATION_HELD, True, f"{waited}; held before it ran the guest")
        self._fail(m, Phase.ABORTING, f"{waited} of the source's completion (it is {held.state.value}); it was "
                                      "held before it ran the guest, so the source resumes")  # fmt: skip

    async def _resume_paused(self, m: Migration, state: RunState) -> None:
        """A destination that has the guest but is paused (QEMU pauses a guest whose write met a
        full disk): try to continue it every few seconds; never give it up, it *is* the VM."""
        now = time.monotonic()
        if now - self._resumed.get(m.id, 0.0) < RESUME_RETRY_S:
            return
        self._resumed[m.id] = now
        log.warning("migration %s: the guest is %s on %s; continuing it", m.id, state.value, m.destination)
        await self.host(m.destination).run(hostd.resume(m.vm))

    async def _cleanup(self, m: Migration) -> None:
        spec, _ = self._vm(m.vm)
        if vm_vnics(spec):  # again: a push that failed in CuttingOver is not retried there
            await self.network.push(self._in_flight(m))
        if _has_volumes(spec):
            await self.volumes.detach(m.vm, m.source)
        # any guest, with or without livemig's workload: QEMU's own word that it reset or panicked
        observed = await self.host(m.destination).observe(m.vm)
        if observed is None or observed.state is RunState.ABSENT:
            m.reason = f"the VM is lost: its QEMU on {m.destination} is gone after the guest moved there"
            m.transition(Phase.FAILED, m.reason)
            return
        if observed.state in (RunState.IO_ERROR, RunState.PAUSED):
            await self._resume_paused(m, observed.state)
            return  # paused by its storage (a full disk): it runs on once the storage takes writes again
        if observed is not None and observed.guest_resets:
            detail = "; ".join(observed.guest_resets)
            if spec.workload is not None and m.verify_guest:
                m.guest_check = f"fail: the guest crashed or rebooted: {detail}"
            m.reason = f"the guest crashed or rebooted on {m.destination} after the migration: {detail}"
            m.transition(Phase.FAILED, m.reason)
            return
        checks = []
        if m.verify_guest and _runs_disk_workload(spec) and m.disk_check is None:
            checks.append(("disk", hostd.disk_check(m.vm)))
        if m.verify_guest and spec.workload is not None and m.guest_check is None:
            checks.append(("memory", hostd.guest_check(m.vm)))
        for what, check in checks:
            try:
                reply = await self.host(m.destination).run(check)
                ok, detail = reply.ok, reply.detail
            except GuestError as exc:
                ok, detail = False, exc.message
            verdict = "ok" if ok else f"fail: {detail}"
            if what == "disk":
                m.disk_check = verdict
            else:
                m.guest_check = verdict
            if not ok:
                m.reason = f"guest {what} check failed on {m.destination}: {detail}"
                m.transition(Phase.FAILED, m.reason)
                return
        total = (utcnow() - m.created_at).total_seconds() * 1000
        m.reason = "migrated"
        m.transition(Phase.SUCCEEDED, f"VM runs on {m.destination}", orchestration_ms=round(total))

    # ------------------------------------------------------------------ rollback path

    async def _begin_rollback(self, m: Migration) -> None:
        if m.phase is Phase.CANCELLING:
            m.rollback_to = Phase.CANCELLED
            m.reason = m.reason or "cancelled by request"
        elif m.rollback_to is None:
            m.rollback_to = Phase.ABORTED
        m.transition(Phase.ROLLING_BACK, "keeping the VM on the source; tearing down the destination")

    async def _rolling_back(self, m: Migration) -> None:
        source, destination = self.host(m.source), self.host(m.destination)
        _, owner = self._vm(m.vm)
        if owner != m.source:
            raise LivemigError(f"cannot roll back: VM {m.vm} already belongs to {owner}")
        job = await source.observe_migration(m.vm)
        if job is not None and job.state is JobState.RUNNING:
            await source.run(hostd.cancel_migration(m.vm))
            return  # observe the cancellation land next pass
        src, dst = await source.observe(m.vm), await destination.observe(m.vm)
        src_state = src.state if src is not None else RunState.ABSENT
        dst_state = dst.state if dst is not None else RunState.ABSENT
        if RunState.UNREACHABLE in (src_state, dst_state):
            raise LivemigError(f"VM {m.vm}: a QEMU does not answer (source {src_state}, destination {dst_state})")
        if _has_guest(dst) and src_state is not RunState.RUNNING:
            # QEMU completed the migration after all: the destination *is* the VM now, and the source
            # holds a stale copy that must never run again. The only way is forward.
            m.reason, m.rollback_to = "", None
            m.transition(Phase.CUTTING_OVER, "the destination already runs the guest (QEMU completed the "
                                             "migration): going forward, not back")  # fmt: skip
            return
        lost = self._why_lost(src_state, dst, held=_condition(m, ConditionType.DESTINATION_HELD))
        if lost is None and src_state is not RunState.RUNNING:
            await source.run(hostd.resume(m.vm))
        await destination.run(hostd.destroy_vm(m.vm))
        spec, _ = self._vm(m.vm)
        if _has_volumes(spec):
            await self.volumes.detach(m.vm, m.destination)
        if lost is not None:
            await source.run(hostd.destroy_vm(m.vm))  # a stale copy, or nothing: it must never run
        if vm_vnics(spec):
            # dual ingress off: only the source again (before the end: a push that fails is retried
            # with the step, never reopens an ended migration)
            await self.network.push(self._in_flight(m))  # m is RollingBack: no dual ingress for it
        if lost is not None:
            m.reason = f"the VM is lost: {lost} ({m.reason or 'rolling back'})"
            m.transition(Phase.FAILED, m.reason)
        else:
            m.transition(m.rollback_to or Phase.FAILED, m.reason or "rolled back")

    @staticmethod
    def _why_lost(src_state: RunState, dst: VmStatus | None, held: bool = False) -> str | None:
        """Why the source cannot run the guest again (None: it can). A source whose QEMU completed
        the migration (postmigrate) may resume only if the destination provably never ran: resuming
        it after the destination ran (and perhaps wrote the volume, answered connections) would fork
        the guest's history. A destination the LMO ``held`` that then finished loading is paused,
        never having run."""
        if src_state is RunState.ABSENT:
            return "its source QEMU is gone"
        if src_state is not RunState.POSTMIGRATE:
            return None
        waiting = (RunState.INMIGRATE, RunState.PRELAUNCH, *((RunState.PAUSED,) if held else ()))
        never_ran = dst is not None and dst.resumed_at is None and dst.state in waiting
        return None if never_ran else "the destination received the guest and is gone; the source's copy is stale"


def _acts(m: Migration) -> bool:
    """Whether the migration's next step acts (due every pass, taken before any observation)
    rather than only observes (due in turn): a cancel, a phase outside ``OBSERVING``, a job to start."""
    if m.cancel_requested or m.phase not in OBSERVING:
        return True
    return m.phase is Phase.PRECOPY and not _condition(m, ConditionType.MIGRATION_STARTED)


def _moved_guests_rates(saved: list[Migration]) -> list[DirtyRate]:
    """What the guests of the ended migrations among ``saved`` did while they moved: the wave
    planner's estimate for their next move (written in one statement with the pass's saves)."""
    return [DirtyRate(m.vm, m.last_sample.dirty_rate_mib_s, m.last_sample.at, "migration")
            for m in saved if m.terminal and m.last_sample is not None and m.last_sample.dirty_pages_rate]  # fmt: skip


def _has_guest(observed: VmStatus | None) -> bool:
    """Does this destination QEMU hold the guest (it ran there, even if it is paused now)? A
    guest paused on an I/O error ran: that is how it met the error."""
    if observed is None or observed.state is RunState.ABSENT:
        return False
    return (observed.state in (RunState.RUNNING, RunState.IO_ERROR)
            or (observed.resumed_at is not None and observed.state is not RunState.INMIGRATE))  # fmt: skip


def _settings_line(settings: dict[str, object]) -> str:
    """QEMU's read-back settings in one line: the capabilities on, then the parameters."""
    on = [k for k, v in settings.items() if v is True]
    values = [f"{k}={v}" for k, v in settings.items() if not isinstance(v, bool)]
    return f"capabilities on: {', '.join(on) or 'none'}; {', '.join(values)}"


def _fingerprint(m: Migration) -> tuple[object, ...]:
    """What a step may change besides QEMU's latest numbers (last sample, running stats)."""
    return (m.phase, len(m.timeline), tuple((c.type, c.status, c.reason) for c in m.conditions), m.reason,
            m.incoming_uri, m.reserved_mib_s, m.rollback_to, tuple(sorted(m.flow_versions.items())),
            m.guest_check, m.disk_check, m.params.max_bandwidth_mib_s)  # fmt: skip


def _has_volumes(spec: VmSpec) -> bool:
    """Only a VM with volume devices has attachments to fence or detach (saves a store read)."""
    return any(isinstance(d, VolumeDevice) for d in spec.devices)


def _runs_disk_workload(spec: VmSpec) -> bool:
    return (spec.workload is not None and spec.workload.disk_rate > 0
            and any(isinstance(d, VolumeDevice) for d in spec.devices))  # fmt: skip


def _condition(m: Migration, type_: ConditionType) -> bool:
    condition = m.condition(type_)
    return condition is not None and condition.status
