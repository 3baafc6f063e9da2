"""Admission control for the dedicated migration network.

Every host declares a migration bandwidth budget (each way). A migration reserves a share on
its source's outbound and its destination's inbound budget before it may start, and QEMU's
``max-bandwidth`` is set to that share, so migrations never exceed what the network reserved for
them and never steal from guests' traffic. A migration whose minimum share is not free waits in
``Pending`` (with a condition that says why) instead of starting slow; concurrency limits
(per host outbound/inbound, region total) bound evacuations the same way.

A :class:`Ledger` keeps what admitted migrations hold per host and in the region, so each decision
costs the same with ten migrations running or ten thousand. The controller fills it from the store
inside one admission transaction; the wave planner replays the same decisions ahead of time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from livemig.control.store import Reservation
from livemig.model.migration import MigrationParams


class Candidate(Protocol):
    """What admission reads of a migration (a ``Migration``, or one the wave planner imagines)."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def destination(self) -> str: ...
    @property
    def params(self) -> MigrationParams: ...


@dataclass(frozen=True)
class Admission:
    reserved_mib_s: int | None  # None: not admitted now
    reason: str


class Ledger:
    """The bandwidth shares and slots that admitted migrations hold."""

    def __init__(self, reservations: Iterable[Reservation] = (), budgets: Mapping[str, int] | None = None) -> None:
        self.budgets: dict[str, int] = dict(budgets or {})
        self.held: dict[str, Reservation] = {}
        self._out_count: dict[str, int] = defaultdict(int)
        self._in_count: dict[str, int] = defaultdict(int)
        self._out_mib: dict[str, int] = defaultdict(int)
        self._in_mib: dict[str, int] = defaultdict(int)
        for reservation in reservations:
            self.add(reservation)

    def add(self, r: Reservation) -> None:
        if r.id in self.held:
            self.remove(r.id)
        self.held[r.id] = r
        self._out_count[r.source] += 1
        self._in_count[r.destination] += 1
        self._out_mib[r.source] += r.reserved_mib_s
        self._in_mib[r.destination] += r.reserved_mib_s

    def remove(self, migration_id: str) -> None:
        r = self.held.pop(migration_id, None)
        if r is None:
            return
        self._out_count[r.source] -= 1
        self._in_count[r.destination] -= 1
        self._out_mib[r.source] -= r.reserved_mib_s
        self._in_mib[r.destination] -= r.reserved_mib_s

    def admit(self, m: Candidate) -> Admission:
        """Whether ``m`` may start now, and with which share (nothing is recorded: see :meth:`add`)."""
        own = self.held.get(m.id)
        mine = 1 if own is not None else 0
        own_mib = own.reserved_mib_s if own is not None else 0
        running = len(self.held) - mine
        outbound = self._out_count[m.source] - (mine if own is not None and own.source == m.source else 0)
        inbound = self._in_count[m.destination] - (mine if own is not None and own.destination == m.destination else 0)
        limits = m.params.limits
        if limits.region_total and running >= limits.region_total:
            return Admission(None, f"region limit: {running} of {limits.region_total} migrations running")
        if limits.per_host_outbound and outbound >= limits.per_host_outbound:
            return Admission(None, f"host {m.source} outbound limit: {outbound} of {limits.per_host_outbound} running")
        if limits.per_host_inbound and inbound >= limits.per_host_inbound:
            return Admission(None, f"host {m.destination} inbound limit: {inbound} of "
                                   f"{limits.per_host_inbound} running")  # fmt: skip
        out_used = self._out_mib[m.source] - (own_mib if own is not None and own.source == m.source else 0)
        in_used = self._in_mib[m.destination] - (own_mib if own is not None and own.destination == m.destination else 0)
        free_out = self.budgets.get(m.source, 0) - out_used
        free_in = self.budgets.get(m.destination, 0) - in_used
        free = min(free_out, free_in)
        if free < m.params.min_bandwidth_mib_s:
            side = f"{m.source} outbound" if free_out <= free_in else f"{m.destination} inbound"
            return Admission(None, f"{side} has {free} MiB/s of migration bandwidth free, the policy needs "
                                   f"{m.params.min_bandwidth_mib_s} MiB/s")  # fmt: skip
        share = min(m.params.max_bandwidth_mib_s, free)
        return Admission(
            share, f"reserved {share} MiB/s ({m.source} out {free_out}, {m.destination} in {free_in} free)"
        )
