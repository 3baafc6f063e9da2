"""What the dashboard's pages show, computed from the store and the hosts' own reports.

Pure functions over records, so the pages' numbers are tested without a browser and stay the
same numbers the REST API returns (a page formats them; it never recomputes them differently).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import Migration, Phase, utcnow
from livemig.model.vm import VmSpec
from livemig.plots import MIB, pause_parts, throughput_mib_s

# phases after which the memory has been sent: progress is complete even without a last sample
SENT = frozenset({Phase.SWITCHOVER, Phase.CUTTING_OVER, Phase.CLEANUP, Phase.SUCCEEDED})


@dataclass(frozen=True)
class HostRow:
    name: str
    api_url: str
    migration_address: str
    maintenance: bool
    draining: bool  # in maintenance with migrations still leaving it
    budget_mib_s: int
    reserved_out_mib_s: int
    reserved_in_mib_s: int
    info: HostInfo | None
    error: str | None

    @property
    def memory_fraction(self) -> float:
        return self.info.memory_used_mib / self.info.memory_mib if self.info and self.info.memory_mib else 0.0

    @property
    def reserved_fraction(self) -> float:
        return max(self.reserved_out_mib_s, self.reserved_in_mib_s) / self.budget_mib_s if self.budget_mib_s else 0.0

    @property
    def state(self) -> str:
        if self.info is None:
            return "unreachable"
        if self.draining:
            return "draining"
        return "maintenance" if self.maintenance else "in service"


@dataclass(frozen=True)
class Progress:
    """Where a migration stands, from its newest pre-copy reading."""

    fraction: float
    remaining_mib: float | None
    dirty_mib_s: float | None
    throughput_mib_s: float | None
    round: int | None
    waiting: str  # why a queued migration waits (its false condition), else ""


@dataclass(frozen=True)
class VmRow:
    name: str
    host: str
    memory_mib: int
    vcpus: int
    reported: bool  # the owning host lists it
    migration: Migration | None


@dataclass
class Region:
    hosts: list[HostRow]
    vms: list[VmRow]
    active: list[Migration]
    recent: list[Migration]
    evacuations: list[tuple[str, str, int, bool]] = field(default_factory=list)  # id, host, migrations, done


def reserved(active: list[Migration], host: str) -> tuple[int, int]:
    """The bandwidth admitted migrations hold on ``host`` now (out, in), as admission counts it."""
    admitted = [m for m in active if m.reserved_mib_s is not None and m.phase is not Phase.PENDING]
    return (sum(m.reserved_mib_s or 0 for m in admitted if m.source == host),
            sum(m.reserved_mib_s or 0 for m in admitted if m.destination == host))  # fmt: skip


def host_row(reg: HostRegistration, info: HostInfo | None, error: str | None, active: list[Migration]) -> HostRow:
    out, into = reserved(active, reg.name)
    return HostRow(name=reg.name, api_url=reg.api_url, migration_address=reg.migration_address,
                   maintenance=reg.maintenance, draining=reg.maintenance and any(m.source == reg.name for m in active),
                   budget_mib_s=reg.migration_bandwidth_mib_s, reserved_out_mib_s=out, reserved_in_mib_s=into,
                   info=info, error=error)  # fmt: skip


def region(
    hosts: list[tuple[HostRegistration, HostInfo | None, str | None]],
    vms: list[tuple[VmSpec, str]],
    migrations: list[Migration],
    recent: int = 15,
) -> Region:
    active = [m for m in migrations if not m.terminal]
    moving = {m.vm: m for m in active}
    listed: dict[str, set[str]] = {reg.name: set(info.vms) for reg, info, _ in hosts if info is not None}
    evacuations: dict[str, list[Migration]] = {}
    for m in migrations:
        if m.evacuation:
            evacuations.setdefault(m.evacuation, []).append(m)
    return Region(
        hosts=[host_row(reg, info, error, active) for reg, info, error in hosts],
        vms=[_vm_row(spec, host, spec.name in listed.get(host, set()), moving) for spec, host in sorted(vms, key=_by)],
        active=active,
        recent=[m for m in reversed(migrations) if m.terminal][:recent],
        evacuations=[(eid, ms[0].source, len(ms), all(m.terminal for m in ms)) for eid, ms in evacuations.items()],
    )


def _vm_row(spec: VmSpec, host: str, reported: bool, moving: dict[str, Migration]) -> VmRow:
    return VmRow(spec.name, host, spec.memory_mib, spec.vcpus, reported, moving.get(spec.name))


def progress(m: Migration) -> Progress:
    sample = m.last_sample
    waiting = next((c.reason for c in m.conditions if not c.status), "") if m.phase is Phase.PENDING else ""
    if sample is None:
        return Progress(1.0 if m.phase in SENT else 0.0, None, None, None, None, waiting)
    fraction = 1.0 - sample.remaining_bytes / sample.total_bytes if sample.total_bytes else 0.0
    if m.phase in SENT:
        fraction = 1.0
    return Progress(max(0.0, min(fraction, 1.0)), sample.remaining_bytes / MIB, sample.dirty_rate_mib_s,
                    throughput_mib_s(sample), sample.dirty_sync_count, waiting)  # fmt: skip


def version(*parts: object) -> str:
    """A short tag that changes when what a chart draws changes (its URL's cache key)."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def chart_versions(m: Migration, now: datetime | None = None) -> dict[str, str]:
    """Per chart, the tag of its current content: a running migration's timeline at each
    transition and every few seconds (its current bar grows), its pre-copy chart with each
    sample, the pause once the numbers arrive. Drawing costs a few hundred ms of CPU, so a tag
    changes no more often than the picture does."""
    now = now or utcnow()
    last = m.last_sample.at.isoformat() if m.last_sample else ""
    return {
        "timeline": version(m.phase, len(m.timeline), None if m.terminal else int(now.timestamp() / 5)),
        "precopy": version(m.phase, len(m.samples), last, m.reserved_mib_s),
        "pause": version(*(p.ms for p in pause_parts(m))),
    }


def _by(vm: tuple[VmSpec, str]) -> str:
    return vm[0].name
