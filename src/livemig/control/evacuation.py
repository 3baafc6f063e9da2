"""Host evacuation: move every VM off a host (for a kernel patch) under concurrency limits.

The host is put in maintenance first (no new placements, no migrations to it). Each VM is placed
on the in-service host with the most free memory that can hold it, counting what this evacuation
already placed there; the migrations are created at once and the controller's admission control
(``admission.py``) runs them within the limits and the hosts' bandwidth budgets. VMs that cannot
move are listed with the reason; nothing about them changes.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from livemig.control.services import Services
from livemig.errors import Conflict, LivemigError
from livemig.model.migration import Migration, Phase, utcnow
from livemig.wire import hostd
from livemig.wire.lmo import Evacuation, EvacuationItem, EvacuationRequest


async def evacuate(services: Services, host: str, request: EvacuationRequest) -> Evacuation:
    """Plan and start the evacuation of ``host``; raises before changing anything if it cannot."""
    store, hosts = services.store, services.hosts()
    store.host(host)  # 404 for an unknown host
    candidates = [h for h in store.hosts() if h.name != host and not h.maintenance]
    if not candidates:
        raise Conflict(f"cannot evacuate {host}: no other host in service to move its VMs to")
    free: dict[str, int] = {}
    for registration in candidates:
        try:
            free[registration.name] = (await hosts[registration.name].run(hostd.info())).memory_free_mib
        except LivemigError:
            continue  # an unreachable host gets no VMs
    if not free:
        raise Conflict(f"cannot evacuate {host}: no other host answers")
    evacuation = Evacuation(id=f"e-{uuid.uuid4().hex[:10]}", host=host, limits=request.limits)
    store.set_maintenance(host, True)
    vms = sorted((spec for spec, owner in store.vms() if owner == host), key=lambda s: -s.memory_mib)
    for spec in vms:
        item = EvacuationItem(vm=spec.name)
        if store.migrations(active_only=True, vm=spec.name):
            item.reason = "already migrating"
        else:
            fitting = [name for name, mib in free.items() if mib >= spec.memory_mib]
            if not fitting:
                item.reason = (f"needs {spec.memory_mib} MiB; most free on another host is "
                               f"{max(free.values())} MiB")  # fmt: skip
            else:
                target = max(fitting, key=lambda name: free[name])
                free[target] -= spec.memory_mib
                params = request.params.model_copy(update={"limits": request.limits})
                migration = Migration(id=f"m-{uuid.uuid4().hex[:10]}", vm=spec.name, source=host,
                                      destination=target, params=params, evacuation=evacuation.id)  # fmt: skip
                migration.transition(Phase.PENDING, f"evacuation {evacuation.id} of {host}: {spec.name} -> {target}")
                store.add_migration(migration)
                item.destination, item.migration = target, migration.id
        evacuation.items.append(item)
    store.add_evacuation(evacuation.id, evacuation.model_dump_json())
    return evacuation


def peak_concurrency(migrations: list[Migration], key: str) -> dict[str, int]:
    """From the timelines: the most migrations that ran at once per ``source`` or ``destination``.

    A migration runs from its admission (entering Validating) to its terminal phase; the
    evacuation report shows this so the limits can be checked after the fact.
    """
    events: list[tuple[datetime, int, str]] = []
    for m in migrations:
        start = next((e.at for e in m.timeline if e.phase is Phase.VALIDATING), None)
        end = next((e.at for e in m.timeline if e.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.ABORTED,
                                                             Phase.CANCELLED)), None)  # fmt: skip
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
