"""Admission control for the dedicated migration network.

Every host declares a migration bandwidth budget (each way). A migration reserves a share on
its source's outbound and its destination's inbound budget before it may start, and QEMU's
``max-bandwidth`` is set to that share, so migrations never exceed what the network reserved for
them and never steal from guests' traffic. A migration whose minimum share is not free waits in
``Pending`` (with a condition that says why) instead of starting slow; concurrency limits
(per host outbound/inbound, region total) bound evacuations the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from livemig.model.host import HostRegistration
from livemig.model.migration import Migration, Phase


@dataclass(frozen=True)
class Admission:
    reserved_mib_s: int | None  # None: not admitted now
    reason: str


def admit(m: Migration, running: list[Migration], hosts: dict[str, HostRegistration]) -> Admission:
    """Decide whether ``m`` may start now, given the migrations already admitted (``running``)."""
    others = [r for r in running if r.id != m.id and r.reserved_mib_s is not None and r.phase is not Phase.PENDING]
    limits = m.params.limits
    outbound = [r for r in others if r.source == m.source]
    inbound = [r for r in others if r.destination == m.destination]
    if limits.region_total and len(others) >= limits.region_total:
        return Admission(None, f"region limit: {len(others)} of {limits.region_total} migrations running")
    if limits.per_host_outbound and len(outbound) >= limits.per_host_outbound:
        return Admission(None, f"host {m.source} outbound limit: {len(outbound)} of {limits.per_host_outbound} running")
    if limits.per_host_inbound and len(inbound) >= limits.per_host_inbound:
        return Admission(None, f"host {m.destination} inbound limit: {len(inbound)} of "
                               f"{limits.per_host_inbound} running")  # fmt: skip
    free_out = hosts[m.source].migration_bandwidth_mib_s - sum(r.reserved_mib_s or 0 for r in outbound)
    free_in = hosts[m.destination].migration_bandwidth_mib_s - sum(r.reserved_mib_s or 0 for r in inbound)
    free = min(free_out, free_in)
    if free < m.params.min_bandwidth_mib_s:
        side = f"{m.source} outbound" if free_out <= free_in else f"{m.destination} inbound"
        return Admission(None, f"{side} has {free} MiB/s of migration bandwidth free, the policy needs "
                               f"{m.params.min_bandwidth_mib_s} MiB/s")  # fmt: skip
    share = min(m.params.max_bandwidth_mib_s, free)
    return Admission(share, f"reserved {share} MiB/s ({m.source} out {free_out}, {m.destination} in {free_in} free)")
