"""The LMO's Prometheus series about migrations (the controller's own are in ``controller.py``).

Counted once, by the replica that ended it: the controller calls :func:`migration_ended` after it
saved a migration's terminal phase, and only the replica holding the lease can save that (the
store refuses the others), so across replicas each migration is counted exactly once and
``sum`` over the replicas' series is the region's.

Series about ended migrations:

* ``livemig_migrations_total{result}``: ``succeeded``, ``failed``, ``aborted``, ``cancelled``.
* ``livemig_migration_pause_seconds``: QEMU's downtime (``stats.pause_ms``).
* ``livemig_migration_guest_pause_seconds``: the pause the guest saw, the source's STOP to the
  destination's RESUME (``stats.guest_pause_ms``; longer than QEMU's by the destination's load).
* ``livemig_migration_transfer_seconds``: QEMU's total time, ``migrate`` to completed (``stats.total_ms``).
* ``livemig_migration_duration_seconds{result}``: created to ended, the wait an operator sees.
* ``livemig_migration_sent_bytes_total``: what QEMU sent (``stats.transferred_bytes``).
* ``livemig_migration_precopy_rounds``: QEMU's dirty-sync count (``stats.rounds``).

A histogram observes a migration only when the number exists (a migration that failed before
QEMU paused its guest has no pause), so ``livemig_migration_pause_seconds_count`` grows by one per
migration that went through a switchover.

Series about the migrations this replica holds now, read at scrape time (:class:`BandwidthCollector`):
``livemig_migration_bandwidth_reserved_bytes_per_second{host,direction}`` (the admitted shares,
``direction`` ``out`` on the source and ``in`` on the destination), ``..._used_bytes_per_second``
(QEMU's latest throughput of those in pre-copy) and ``livemig_host_migration_bandwidth_budget_bytes_per_second{host}``
(each such host's declared budget, each way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livemig.model.migration import TERMINAL_PHASES, Migration, Phase

MIB = 1024 * 1024
#: pauses: tens of milliseconds is livemig's target, seconds is QEMU's default-tuned worst
PAUSE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
#: whole migrations: seconds for a small idle guest, many minutes for a busy large one
DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
RESULTS = tuple(p.value.lower() for p in sorted(TERMINAL_PHASES))
#: the phases in which pre-copy streams (QEMU's throughput is the bandwidth used)
STREAMING = frozenset({Phase.PRECOPY, Phase.SWITCHOVER})

MIGRATIONS = Counter("livemig_migrations", "migrations ended, by result", ["result"])
PAUSE = Histogram("livemig_migration_pause_seconds", "QEMU's downtime of each ended migration",
                  buckets=PAUSE_BUCKETS)  # fmt: skip
GUEST_PAUSE = Histogram("livemig_migration_guest_pause_seconds", "the pause the guest saw: source STOP to "
                        "destination RESUME", buckets=PAUSE_BUCKETS)  # fmt: skip
TRANSFER = Histogram("livemig_migration_transfer_seconds", "QEMU's total time: migrate to completed",
                     buckets=DURATION_BUCKETS)  # fmt: skip
DURATION = Histogram("livemig_migration_duration_seconds", "each migration from its creation to its end, by result",
                     ["result"], buckets=DURATION_BUCKETS)  # fmt: skip
SENT = Counter("livemig_migration_sent_bytes", "bytes QEMU sent for ended migrations")
ROUNDS = Histogram("livemig_migration_precopy_rounds", "pre-copy rounds (QEMU's dirty-sync count) of each ended "
                   "migration", buckets=ROUND_BUCKETS)  # fmt: skip
for _result in RESULTS:  # every result reported from the start (0), so rate() and the dashboard see it
    MIGRATIONS.labels(_result)
    DURATION.labels(_result)


def result_of(m: Migration) -> str:
    """``succeeded``, ``failed``, ``aborted`` or ``cancelled``."""
    if not m.terminal:
        raise ValueError(f"migration {m.id} has not ended (it is {m.phase.value})")
    return m.phase.value.lower()


def migration_ended(m: Migration) -> None:
    """Count ``m``, which just ended (its terminal phase is saved): once, by the replica that ended it."""
    result = result_of(m)
    MIGRATIONS.labels(result).inc()
    ended = m.phase_started(m.phase) or m.updated_at
    DURATION.labels(result).observe(max(0.0, (ended - m.created_at).total_seconds()))
    stats = m.stats
    if stats.pause_ms is not None:
        PAUSE.observe(stats.pause_ms / 1000)
    if stats.guest_pause_ms is not None:
        GUEST_PAUSE.observe(stats.guest_pause_ms / 1000)
    if stats.total_ms:
        TRANSFER.observe(stats.total_ms / 1000)
    if stats.rounds:
        ROUNDS.observe(stats.rounds)
    if stats.transferred_bytes:
        SENT.inc(stats.transferred_bytes)


class BandwidthCollector(Collector):
    """Reserved and used migration bandwidth per host, from the migrations ``held()`` returns (this
    replica's; summed over replicas, the region's), and the budgets of their hosts."""

    def __init__(self, held: Callable[[], list[Migration]],
                 budgets: Callable[[set[str]], dict[str, int]]) -> None:  # fmt: skip
        self.held = held
        self.budgets = budgets

    def collect(self) -> Iterator[Metric]:
        reserved: dict[tuple[str, str], float] = defaultdict(float)
        used: dict[tuple[str, str], float] = defaultdict(float)
        for m in self.held():
            if m.terminal or m.reserved_mib_s is None:
                continue  # queued (no share yet) or ended
            reserved[(m.source, "out")] += m.reserved_mib_s * MIB
            reserved[(m.destination, "in")] += m.reserved_mib_s * MIB
            sample = m.last_sample
            if m.phase in STREAMING and sample is not None:
                rate = sample.mbps * 1_000_000 / 8  # QEMU's mbps: megabits per second
                used[(m.source, "out")] += rate
                used[(m.destination, "in")] += rate
        labels = ["host", "direction"]
        reserved_family = GaugeMetricFamily("livemig_migration_bandwidth_reserved_bytes_per_second",
                                            "migration bandwidth admitted to the migrations this replica drives",
                                            labels=labels)  # fmt: skip
        used_family = GaugeMetricFamily("livemig_migration_bandwidth_used_bytes_per_second",
                                        "QEMU's latest throughput of the pre-copies this replica drives",
                                        labels=labels)  # fmt: skip
        for (host, direction), value in sorted(reserved.items()):
            reserved_family.add_metric([host, direction], value)
            used_family.add_metric([host, direction], used.get((host, direction), 0.0))
        budget_family = GaugeMetricFamily("livemig_host_migration_bandwidth_budget_bytes_per_second",
                                          "a host's migration bandwidth budget, each way (hosts with a migration "
                                          "this replica drives)", labels=["host"])  # fmt: skip
        hosts = {host for host, _ in reserved}
        for host, mib in sorted(self.budgets(hosts).items() if hosts else ()):
            budget_family.add_metric([host], mib * MIB)
        yield from (reserved_family, used_family, budget_family)


def bandwidth_registry(held: Callable[[], list[Migration]],
                       budgets: Callable[[set[str]], dict[str, int]]) -> CollectorRegistry:  # fmt: skip
    """A registry of one :class:`BandwidthCollector` (per app: tests run several LMOs in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BandwidthCollector(held, budgets))
    return registry
