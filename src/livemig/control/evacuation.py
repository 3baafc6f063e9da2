"""Host evacuation: move every VM off one host or a wave of hosts (for a kernel patch), under
concurrency limits, with a plan made before anything moves.

The hosts go into maintenance first (no new placements, no migrations to them). Each VM, largest
first, is placed on the in-service host with the most free memory in the LMO's inventory, counting
what this wave already placed there; the migrations are created at once (reserving that memory) and
the controller's admission control (``admission.py``) runs them within the limits and the hosts'
bandwidth budgets. VMs that cannot move are listed with the reason; nothing about them changes.

The plan (``planner.py``) predicts each migration and the wave's length from each VM's size and
last known dirty rate; it is kept beside the evacuation, and its report shows the prediction next
to what happened.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import uuid
from datetime import datetime, timedelta

from livemig.control.planner import calibrate, median_rate, schedule
from livemig.control.services import Services
from livemig.control.store import DirtyRate, Store, VmFacts
from livemig.errors import CapacityError, Conflict, LivemigError
from livemig.model.migration import TERMINAL_PHASES, Migration, Phase, utcnow
from livemig.wire import hostd
from livemig.wire.lmo import (
    ComparedMigration,
    Evacuation,
    EvacuationItem,
    EvacuationReport,
    PlannedMigration,
    WaveComparison,
    WavePlan,
    WaveRequest,
)

#: finished migrations the planner learns overheads and bandwidth from
CALIBRATION_WINDOW = 200
#: the oldest measurement of the LMO's pace the planner still bounds a wave by
PACE_MAX_AGE_S = 3600.0
#: a plan the LMO's pace lengthens by less than this fraction is the hosts' (no ``hosts_bound_s``)
PACE_NEGLIGIBLE = 0.01
#: hosts asked for dirty rates at once (each measures its VMs together, in about a second)
MEASURE_CONCURRENCY = 256


async def plan_wave(services: Services, request: WaveRequest) -> WavePlan:
    """What evacuating ``request.hosts`` would do, and how long it would take; changes nothing
    (with ``measure``, hosts are asked for dirty rates first, and those are remembered)."""
    started = time.perf_counter()
    store = services.store
    _check(store, request.hosts)
    measured = await _measure(services, request) if request.measure else 0
    vms = store.vm_facts(request.hosts)
    items = _assign(store, request.hosts, vms)
    known = [v.dirty_rate_mib_s for v in vms if v.dirty_rate_mib_s is not None]
    default_rate = median_rate(known)
    by_name = {v.name: v for v in vms}
    for item in items:
        facts = by_name[item.vm]
        if facts.dirty_rate_mib_s is None:
            item.dirty_rate_mib_s, item.dirty_rate_source = default_rate, "assumed"
        else:
            item.dirty_rate_mib_s, item.dirty_rate_source = (
                facts.dirty_rate_mib_s,
                facts.dirty_rate_source or "measured",
            )
    calibration = calibrate(store.finished(CALIBRATION_WINDOW), default_rate)
    movable = [i for i in items if i.destination is not None]
    budgets = store.budgets({i.source for i in movable} | {i.destination or "" for i in movable})
    driven_at_once = store.driving_capacity()
    pace = store.lmo_pace(PACE_MAX_AGE_S)
    # the same wave with the LMO keeping up with QEMU: what more replicas could bring it down to
    hosts_bound = None if pace is None else schedule([i.model_copy() for i in items], request.params, request.limits,
                                                      budgets, calibration, driven_at_once=driven_at_once)  # fmt: skip
    total = schedule(items, request.params, request.limits, budgets, calibration, driven_at_once=driven_at_once,
                     pace=pace)  # fmt: skip
    if hosts_bound is not None and total <= hosts_bound * (1 + PACE_NEGLIGIBLE):
        hosts_bound = None  # the pace did not lengthen it: the hosts and the limits set its length
    verdicts: dict[str, int] = {}
    for item in items:
        verdicts[item.verdict] = verdicts.get(item.verdict, 0) + 1
    return WavePlan(hosts=list(request.hosts), limits=request.limits, vms=len(items), total_s=total,
                    verdicts=verdicts, measured=measured, calibration=calibration, items=items,
                    driven_at_once=driven_at_once or None, lmo_pace=pace, hosts_bound_s=hosts_bound,
                    planning_ms=round((time.perf_counter() - started) * 1000, 1))  # fmt: skip


def _check(store: Store, hosts: list[str]) -> None:
    """NotFound for an unknown host; Conflict when no other host could take the VMs."""
    if len(set(hosts)) != len(hosts):
        raise Conflict(f"a host is named twice: {', '.join(sorted(h for h in set(hosts) if hosts.count(h) > 1))}")
    for name in hosts:
        store.host(name)
    leaving = set(hosts)
    others = [c for c in store.capacities(in_service=True) if c.name not in leaving]
    label = hosts[0] if len(hosts) == 1 else f"{len(hosts)} hosts"
    if not others:
        raise Conflict(f"cannot evacuate {label}: no other host in service to move its VMs to")
    if all(c.free_mib is None for c in others):
        raise Conflict(f"cannot evacuate {label}: no other host in service has reported its capacity")


def _assign(store: Store, hosts: list[str], vms: list[VmFacts]) -> list[PlannedMigration]:
    """Each VM, largest first, to the in-service host with the most free memory (heap: V log H)."""
    leaving = set(hosts)
    free = [(-c.free_mib, c.name) for c in store.capacities(in_service=True)
            if c.name not in leaving and c.free_mib is not None]  # fmt: skip
    heapq.heapify(free)
    busy = store.active_vms(v.name for v in vms)
    items: list[PlannedMigration] = []
    for vm in sorted(vms, key=lambda v: (-v.memory_mib, v.name)):
        item = PlannedMigration(vm=vm.name, source=vm.host, memory_mib=vm.memory_mib)
        items.append(item)
        if vm.name in busy:
            item.verdict, item.reason = "cannot-move", "already migrating"
            continue
        if not free or -free[0][0] < vm.memory_mib:
            most = -free[0][0] if free else 0
            item.verdict, item.reason = (
                "cannot-move",
                f"needs {vm.memory_mib} MiB; most free on another host is {most} MiB",
            )
            continue
        room, name = heapq.heappop(free)
        item.destination = name
        heapq.heappush(free, (room + vm.memory_mib, name))
    return items


async def _measure(services: Services, request: WaveRequest) -> int:
    """Ask each host once for the dirty rates of its VMs whose rate is unknown or stale (hostd
    measures them at the same time); remember them. A host that does not answer leaves its VMs
    planned with the fleet's median, and the plan says so."""
    cutoff = utcnow() - timedelta(seconds=request.max_rate_age_s)
    stale: dict[str, list[str]] = {}
    for vm in services.store.vm_facts(request.hosts):
        if vm.dirty_rate_at is None or _aware(vm.dirty_rate_at) < cutoff:
            stale.setdefault(vm.host, []).append(vm.name)
    gate = asyncio.Semaphore(MEASURE_CONCURRENCY)

    async def one(host: str, names: list[str]) -> int:
        async with gate:
            try:
                replies = await services.host(host).run(hostd.dirty_rates(names))
            except LivemigError:
                return 0
            services.store.record_dirty_rates([DirtyRate(r.vm, r.dirty_rate_mib_s, r.measured_at, "measured")
                                               for r in replies])  # fmt: skip
            return len(replies)

    return sum(await asyncio.gather(*(one(host, names) for host, names in stale.items())))


def _aware(at: datetime) -> datetime:
    """SQLite returns naive datetimes (stored in UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=utcnow().tzinfo)


async def evacuate(services: Services, request: WaveRequest) -> Evacuation:
    """Plan and start the evacuation of ``request.hosts``; raises before changing anything if it
    cannot (unknown host, nowhere to go)."""
    store = services.store
    _check(store, request.hosts)
    for name in request.hosts:
        store.set_maintenance(name, True)
        services.forget(name)
    evacuation_id = f"e-{uuid.uuid4().hex[:10]}"
    for attempt in range(2):
        plan = await plan_wave(services, request)
        migrations: list[Migration] = []
        items: list[EvacuationItem] = []
        params = request.params.model_copy(update={"limits": request.limits})
        for planned in plan.items:
            item = EvacuationItem(vm=planned.vm, reason=planned.reason if planned.destination is None else "")
            if planned.destination is not None:
                migration = Migration(id=f"m-{uuid.uuid4().hex[:10]}", vm=planned.vm, source=planned.source,
                                      destination=planned.destination, params=params.model_copy(deep=True),
                                      evacuation=evacuation_id)  # fmt: skip
                migration.transition(Phase.PENDING, f"evacuation {evacuation_id} of {planned.source}: "
                                                    f"{planned.vm} -> {planned.destination}")  # fmt: skip
                migrations.append(migration)
                item.destination, item.migration = planned.destination, migration.id
            items.append(item)
        try:
            if migrations:
                store.add_migrations(migrations)
            break
        except (CapacityError, Conflict):
            if attempt == 1:
                raise  # VMs were placed or moved meanwhile twice over: the caller may try again
    evacuation = Evacuation(id=evacuation_id, host=request.hosts[0], hosts=list(request.hosts), limits=request.limits,
                            items=items, plan=plan)  # fmt: skip
    store.add_evacuation(evacuation.id, evacuation.model_dump_json())
    return evacuation


def report(services: Services, evacuation_id: str) -> EvacuationReport:
    store = services.store
    evacuation = Evacuation.model_validate_json(store.evacuation(evacuation_id))
    by_id = {m.id: m for m in store.migrations(evacuation=evacuation_id)}
    migrations = [by_id[i.migration] for i in evacuation.items if i.migration and i.migration in by_id]
    done = all(m.terminal for m in migrations)
    comparison = compare(evacuation, migrations) if evacuation.plan is not None else None
    return EvacuationReport(evacuation=evacuation, migrations=migrations, done=done, comparison=comparison)


def compare(evacuation: Evacuation, migrations: list[Migration]) -> WaveComparison:
    """The plan beside what happened: the wave's length and each migration's, verdicts and outcomes."""
    assert evacuation.plan is not None
    plan = evacuation.plan
    by_vm = {m.vm: m for m in migrations}
    rows: list[ComparedMigration] = []
    outcomes: dict[str, int] = {}
    ends: list[datetime] = []
    for item in plan.items:
        m = by_vm.get(item.vm)
        actual = None
        outcome = "not moved" if m is None else m.phase.value
        if m is not None and m.terminal:
            admitted = next((e.at for e in m.timeline if e.phase is Phase.VALIDATING), None)
            ended = next(e.at for e in m.timeline if e.phase in TERMINAL_PHASES)
            ends.append(ended)
            if admitted is not None:
                actual = round((ended - admitted).total_seconds(), 3)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        rows.append(ComparedMigration(vm=item.vm, predicted_s=item.duration_s, actual_s=actual,
                                      predicted=item.verdict, outcome=outcome))  # fmt: skip
    done = bool(migrations) and all(m.terminal for m in migrations)
    actual_s = round((max(ends) - evacuation.created_at).total_seconds(), 3) if done and ends else None
    error = None if actual_s is None or actual_s <= 0 else round((actual_s - plan.total_s) / actual_s, 3)
    return WaveComparison(predicted_s=plan.total_s, actual_s=actual_s, error=error,
                          verdicts_predicted=dict(plan.verdicts), outcomes=outcomes, items=rows)  # fmt: skip


def peak_concurrency(migrations: list[Migration], key: str) -> dict[str, int]:
    """From the timelines: the most migrations that ran at once per ``source`` or ``destination``.

    A migration runs from its admission (entering Validating) to its terminal phase; the
    evacuation report shows this so the limits can be checked after the fact.
    """
    events: list[tuple[datetime, int, str]] = []
    for m in migrations:
        start = next((e.at for e in m.timeline if e.phase is Phase.VALIDATING), None)
        end = next((e.at for e in m.timeline if e.phase in TERMINAL_PHASES), None)
        if start is None:
            continue
        group = str(getattr(m, key))
        events += [(start, 1, group), (end or utcnow(), -1, group)]
    peak: dict[str, int] = {}
    current: dict[str, int] = {}
    for _at, delta, group in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts at a tie
        current[group] = current.get(group, 0) + delta
        peak[group] = max(peak.get(group, 0), current[group])
    return peak
