"""hostd's Prometheus series, labelled by host.

Why plain counts on each agent and a collector per scrape, rather than module-level
``prometheus_client`` counters: hostd's routes serve many simulated hosts from one process (the
fleet simulator, ``create_fleet_app``), and each host's ``/metrics`` must report that host's
numbers. The agent counts what happened (a few integers, touched on rare events: a guest reset, a
migration's end); :class:`HostCollector` reads them, and the QEMU processes it finds alive, when
``/metrics`` is scraped.

Series (every one labelled ``host``):

* ``livemig_host_vms``: VMs this hostd manages.
* ``livemig_host_qemu_processes``: of those, the ones whose QEMU process is alive.
* ``livemig_host_guest_resets_total{event}``: guests that reset, shut down or panicked on their
  own (QMP ``RESET``, ``SHUTDOWN`` by the guest, ``GUEST_PANICKED``): after a migration, a crashed guest.
* ``livemig_host_source_migrations_total{outcome}``: migrations this host sent, by how QEMU's job
  ended (``completed``, ``failed``, ``cancelled``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livemig.wire.hostd import JobState

if TYPE_CHECKING:
    from livemig.host.agent import HostAgent

#: the QMP events counted as guest resets (``agent.GUEST_FAILURE_EVENTS``), reported at 0 until seen
GUEST_EVENTS = ("RESET", "SHUTDOWN", "GUEST_PANICKED")
#: how a source's migration job can end, reported at 0 until seen
OUTCOMES = tuple(s.value for s in JobState if s is not JobState.RUNNING)


@dataclass
class HostCounters:
    """What one host's hostd counted since it started."""

    guest_resets: Counter[str] = field(default_factory=Counter)  # QMP event -> guests
    source_migrations: Counter[str] = field(default_factory=Counter)  # job outcome -> migrations

    def migration_ended(self, state: JobState) -> None:
        self.source_migrations[state.value] += 1

    def guest_reset(self, event: str) -> None:
        self.guest_resets[event] += 1


class HostCollector(Collector):
    """One host's series, read from its agent at scrape time."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        host = agent.name
        vms = list(agent.vms.values())
        managed = GaugeMetricFamily("livemig_host_vms", "VMs managed by this hostd", labels=["host"])
        managed.add_metric([host], len(vms))
        alive = GaugeMetricFamily("livemig_host_qemu_processes", "QEMU processes of this host's VMs that are alive",
                                  labels=["host"])  # fmt: skip
        alive.add_metric([host], sum(1 for vm in vms if agent.runtime.owns(vm.pid, vm.paths)))
        counts = agent.counters
        resets = CounterMetricFamily("livemig_host_guest_resets",
                                     "guests that reset, shut down or panicked on their own, by QMP event",
                                     labels=["host", "event"])  # fmt: skip
        for event in sorted({*GUEST_EVENTS, *counts.guest_resets}):
            resets.add_metric([host, event], counts.guest_resets[event])
        migrations = CounterMetricFamily("livemig_host_source_migrations",
                                         "migrations this host sent as the source, by how QEMU's job ended",
                                         labels=["host", "outcome"])  # fmt: skip
        for outcome in sorted({*OUTCOMES, *counts.source_migrations}):
            migrations.add_metric([host, outcome], counts.source_migrations[outcome])
        yield from (managed, alive, resets, migrations)


def host_registry(agent: HostAgent) -> CollectorRegistry:
    """A registry holding only ``agent``'s series (one per scrape: the fleet serves many agents)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(agent))
    return registry
