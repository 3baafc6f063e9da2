"""Connection tracking per VNIC: what makes stateful security lists (and their migration) work.

Why our own: the flow table must *move with the VM*. Each VNIC has a :class:`ConntrackTable`
keyed by the originating 5-tuple (and, for O(1) lookups of return traffic, the reply 5-tuple).
Every change that matters to a peer host — a new flow, a state change, a deadline pushed out by
more than a quarter of its timeout, a removal — bumps the table's ``version``, so a migration
copies the table in bulk (``export``) and then only what changed (``export_delta(since)``), the
last delta inside the VM's pause. Removals leave tombstones so deltas carry them; when too many
tombstones pile up the oldest are forgotten and a delta from before them becomes a full export.

The TCP machine is deliberately Linux-like and window-agnostic (a switch cannot see retransmit
decisions)::

    SYN ──▶ SYN_SENT ──SYN/ACK(reply)──▶ SYN_RECV ──ACK(orig)──▶ ESTABLISHED
    ESTABLISHED ──FIN──▶ FIN_WAIT ──FIN(other side)──▶ LAST_ACK ──ACK(other side)──▶ TIME_WAIT
    any ──RST──▶ CLOSE;   SYN(orig) in TIME_WAIT/CLOSE re-opens as SYN_SENT

A non-SYN segment allowed by a stateful rule starts as ESTABLISHED ("loose pickup", Linux's
default), so a VM that sends on a connection the table lost recovers it. UDP and ICMP echo are
UNREPLIED until the first reply, then REPLIED (longer timeout for UDP). ICMP errors are not tracked
("related" traffic needs a rule). Time comes from an injected clock so tests can jump it.

The vswitch's flow cache (``flowcache.py``) holds on to :class:`Entry` objects so an established
flow's packets skip the lookup. Two things here keep that honest: an entry that a lookup may no
longer find (expired, removed by an import, replaced by an imported copy or by a flow filed under
its key the other way round, dropped with its VNIC) is marked ``live = False``, and a table
counts its ``inserts``, so a cached "this flow is not tracked" can
tell that a flow has since been created. :meth:`ConntrackTable.touch` is the cached path's half
of :meth:`ConntrackTable.track`: the deadline refresh, for a packet that changes no state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from livemig.errors import Conflict, InvalidRequest
from livemig.network.model import FlowBatch, FlowRecord
from livemig.network.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    FlowInfo,
    MalformedPacket,
    int_to_ip,
    ip_to_int,
)

Key = tuple[int, int, int, int, int]  # proto, src, sport, dst, dport
Clock = Callable[[], float]


class TableFull(Conflict):
    """A VNIC's flow table holds ``max_entries`` live flows; a new one cannot be tracked."""


class FlowState(StrEnum):
    SYN_SENT = "SYN_SENT"
    SYN_RECV = "SYN_RECV"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT = "FIN_WAIT"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"
    CLOSE = "CLOSE"
    UDP_UNREPLIED = "UDP_UNREPLIED"
    UDP_REPLIED = "UDP_REPLIED"
    ICMP_UNREPLIED = "ICMP_UNREPLIED"
    ICMP_REPLIED = "ICMP_REPLIED"
    OTHER_UNREPLIED = "OTHER_UNREPLIED"
    OTHER_REPLIED = "OTHER_REPLIED"


DEFAULT_TIMEOUTS: dict[FlowState, float] = {  # seconds; Linux nf_conntrack defaults
    FlowState.SYN_SENT: 120,
    FlowState.SYN_RECV: 60,
    FlowState.ESTABLISHED: 432000,
    FlowState.FIN_WAIT: 120,
    FlowState.LAST_ACK: 30,
    FlowState.TIME_WAIT: 120,
    FlowState.CLOSE: 10,
    FlowState.UDP_UNREPLIED: 30,
    FlowState.UDP_REPLIED: 120,
    FlowState.ICMP_UNREPLIED: 30,
    FlowState.ICMP_REPLIED: 30,
    FlowState.OTHER_UNREPLIED: 60,
    FlowState.OTHER_REPLIED: 600,
}

_REPLIED = {
    FlowState.UDP_UNREPLIED: FlowState.UDP_REPLIED,
    FlowState.ICMP_UNREPLIED: FlowState.ICMP_REPLIED,
    FlowState.OTHER_UNREPLIED: FlowState.OTHER_REPLIED,
}


@dataclass(slots=True)
class Entry:
    """One tracked flow. ``key`` is the originating direction's 5-tuple."""

    key: Key
    state: FlowState
    deadline: float
    version: int
    exported_deadline: float
    fin_orig: bool = False
    fin_reply: bool = False
    last_fin_reply: bool = False
    live: bool = True  # False once a lookup may no longer find it: a cached reference to it is stale

    @property
    def reply_key(self) -> Key:
        proto, src, sport, dst, dport = self.key
        return proto, dst, dport, src, sport


def _key(info: FlowInfo) -> Key:
    return info.proto, info.src, info.sport, info.dst, info.dport


class ConntrackTable:
    """The tracked flows of one VNIC."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        timeouts: dict[FlowState, float] | None = None,
        max_entries: int = 65536,
        max_tombstones: int = 4096,
    ) -> None:
        self.clock = clock
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.max_entries = max_entries
        self.max_tombstones = max_tombstones
        self.version = 0
        self.floor = 0  # deltas from a version below this are no longer exact
        self._index: dict[Key, tuple[Entry, bool]] = {}  # orig and reply keys -> (entry, is_reply)
        self._entries: dict[Key, Entry] = {}
        self._tombstones: dict[Key, int] = {}
        self.refused = 0  # new flows refused because the table was full
        self.inserts = 0  # entries ever put in (created or imported): a cached "untracked" checks it

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    # -- the data path ----------------------------------------------------------------------

    def lookup(self, info: FlowInfo) -> tuple[Entry, bool] | None:
        """The live entry this packet belongs to and whether it travels in the reply direction."""
        hit = self._index.get(_key(info))
        if hit is None:
            return None
        entry, is_reply = hit
        if entry.deadline <= self.clock():
            self._remove(entry)
            return None
        if info.proto == IPPROTO_ICMP:
            wanted = ICMP_ECHO_REPLY if is_reply else ICMP_ECHO_REQUEST
            if info.icmp_type != wanted:
                return None
        return hit

    def track(self, info: FlowInfo) -> bool:
        """Advance the flow this packet belongs to; True if it is a valid packet of a tracked flow."""
        return self.advance(info) is not None

    def advance(self, info: FlowInfo) -> Entry | None:
        """:meth:`track`, returning the entry the packet advanced (None: not a valid tracked packet)."""
        hit = self.lookup(info)
        if hit is None:
            return None
        entry, is_reply = hit
        state = entry.state
        if info.proto == IPPROTO_TCP:
            if not self._tcp_step(entry, is_reply, info.tcp_flags):
                return None
        elif is_reply and state in _REPLIED:
            entry.state = _REPLIED[state]
        self._refresh(entry, changed=entry.state != state)
        return entry

    def indexes(self, info: FlowInfo) -> bool:
        """Whether any entry (live or expired) is filed under this packet's 5-tuple, either direction."""
        return _key(info) in self._index

    def touch(self, entry: Entry, now: float) -> None:
        """What :meth:`track` does for a packet that changes nothing but the deadline.

        The caller (the flow cache) has checked that ``entry`` is live, unexpired and in the
        state its packet leaves it in, so the version accounting stays exactly :meth:`track`'s.
        """
        timeout = self.timeouts[entry.state]
        entry.deadline = now + timeout
        if entry.deadline - entry.exported_deadline > timeout / 4:
            self.version += 1
            entry.version = self.version
            entry.exported_deadline = entry.deadline

    def create(self, info: FlowInfo) -> Entry | None:
        """Start tracking the flow this (rule-allowed) packet opens; None if it opens nothing.

        Raises :class:`TableFull` when the table is full even after removing expired entries.
        """
        if (hit := self.lookup(info)) is not None:
            return hit[0]
        if info.proto == IPPROTO_TCP:
            if info.tcp_flags & TCP_RST:
                return None
            syn_only = info.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            state = FlowState.SYN_SENT if syn_only else FlowState.ESTABLISHED
        elif info.proto == IPPROTO_UDP:
            state = FlowState.UDP_UNREPLIED
        elif info.proto == IPPROTO_ICMP:
            if info.icmp_type != ICMP_ECHO_REQUEST:
                return None
            state = FlowState.ICMP_UNREPLIED
        else:
            state = FlowState.OTHER_UNREPLIED
        if len(self._entries) >= self.max_entries:
            self.sweep()
            if len(self._entries) >= self.max_entries:
                self.refused += 1
                raise TableFull(f"flow table full ({self.max_entries} flows)")
        now = self.clock()
        entry = Entry(_key(info), state, now + self.timeouts[state], 0, 0.0)
        self._insert(entry)
        self._refresh(entry, changed=True)
        return entry

    def _tcp_step(self, entry: Entry, is_reply: bool, flags: int) -> bool:
        state = entry.state
        if flags & TCP_RST:
            entry.state = FlowState.CLOSE
            return True
        syn, ack, fin = flags & TCP_SYN, flags & TCP_ACK, flags & TCP_FIN
        if syn and not ack:
            if not is_reply and state in (FlowState.SYN_SENT, FlowState.TIME_WAIT, FlowState.CLOSE):
                entry.state = FlowState.SYN_SENT
                entry.fin_orig = entry.fin_reply = False
                return True
            if is_reply and state is FlowState.SYN_SENT:  # simultaneous open
                entry.state = FlowState.SYN_RECV
                return True
            return False
        if syn:  # SYN+ACK
            if is_reply and state in (FlowState.SYN_SENT, FlowState.SYN_RECV):
                entry.state = FlowState.SYN_RECV
                return True
            return is_reply and state is FlowState.ESTABLISHED  # a retransmitted SYN/ACK
        if state is FlowState.SYN_SENT:
            return False  # nothing but SYN, SYN/ACK or RST before the handshake answers
        if state is FlowState.SYN_RECV and ack and not is_reply:
            entry.state = state = FlowState.ESTABLISHED
        if fin:
            if is_reply:
                entry.fin_reply = True
            else:
                entry.fin_orig = True
            entry.last_fin_reply = is_reply
            if state in (FlowState.ESTABLISHED, FlowState.FIN_WAIT, FlowState.LAST_ACK, FlowState.SYN_RECV):
                entry.state = FlowState.LAST_ACK if entry.fin_orig and entry.fin_reply else FlowState.FIN_WAIT
        elif ack and state is FlowState.LAST_ACK and is_reply != entry.last_fin_reply:
            entry.state = FlowState.TIME_WAIT
        return True

    def _refresh(self, entry: Entry, changed: bool) -> None:
        timeout = self.timeouts[entry.state]
        entry.deadline = self.clock() + timeout
        if changed or entry.deadline - entry.exported_deadline > timeout / 4:
            self.version += 1
            entry.version = self.version
            entry.exported_deadline = entry.deadline

    # -- housekeeping -----------------------------------------------------------------------

    def _insert(self, entry: Entry) -> None:
        old = self._entries.get(entry.key)
        if old is not None:
            self._unindex(old)
            old.live = False
        for key in (entry.key, entry.reply_key):  # a flow filed under our key in its other direction
            if (displaced := self._index.get(key)) is not None:
                displaced[0].live = False  # is no longer reachable that way
        self.inserts += 1
        self._entries[entry.key] = entry
        self._index[entry.key] = (entry, False)
        self._index[entry.reply_key] = (entry, True)
        self._tombstones.pop(entry.key, None)

    def _unindex(self, entry: Entry) -> None:
        for key in (entry.key, entry.reply_key):
            if (hit := self._index.get(key)) is not None and hit[0] is entry:
                del self._index[key]

    def _remove(self, entry: Entry) -> None:
        entry.live = False
        self._unindex(entry)
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self.version += 1
        self._tombstones[entry.key] = self.version
        if len(self._tombstones) > self.max_tombstones:
            ordered = sorted(self._tombstones.items(), key=lambda kv: kv[1])
            for key, version in ordered[: len(ordered) // 2]:
                del self._tombstones[key]
                self.floor = max(self.floor, version)

    def sweep(self) -> int:
        """Remove expired entries (they become tombstones); returns how many."""
        now = self.clock()
        expired = [e for e in self._entries.values() if e.deadline <= now]
        for entry in expired:
            self._remove(entry)
        return len(expired)

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._remove(entry)

    # -- moving between hosts ---------------------------------------------------------------

    def _record(self, entry: Entry, now: float) -> FlowRecord:
        proto, src, sport, dst, dport = entry.key
        return FlowRecord(
            proto=proto,
            src=int_to_ip(src),
            sport=sport,
            dst=int_to_ip(dst),
            dport=dport,
            state=entry.state.value,
            expires_in=max(0.0, entry.deadline - now),
            version=entry.version,
        )

    def export(self) -> list[FlowRecord]:
        """Every live flow."""
        self.sweep()
        now = self.clock()
        return [self._record(e, now) for e in self._entries.values()]

    def export_delta(self, since: int) -> tuple[bool, list[FlowRecord]]:
        """``(full, records)``: what changed after version ``since`` (tombstones included), or all."""
        self.sweep()
        if since <= 0 or since < self.floor or since > self.version:  # > : a version of another table
            return True, self.export()
        now = self.clock()
        records = [self._record(e, now) for e in self._entries.values() if e.version > since]
        for key, version in self._tombstones.items():
            if version > since:
                proto, src, sport, dst, dport = key
                records.append(
                    FlowRecord(
                        proto=proto,
                        src=int_to_ip(src),
                        sport=sport,
                        dst=int_to_ip(dst),
                        dport=dport,
                        state=FlowState.CLOSE.value,
                        expires_in=0,
                        version=version,
                        deleted=True,
                    )
                )
        records.sort(key=lambda r: r.version)
        return False, records

    def import_records(self, records: Iterable[FlowRecord], full: bool) -> tuple[int, int]:
        """Apply exported records (``full``: they are the whole table). Returns (upserted, removed)."""
        parsed: list[tuple[Key, FlowRecord]] = []
        for record in records:
            try:
                key = (record.proto, ip_to_int(record.src), record.sport, ip_to_int(record.dst), record.dport)
                if not record.deleted:
                    FlowState(record.state)
            except (MalformedPacket, ValueError):
                raise InvalidRequest(f"flow record {record.model_dump()} is not importable") from None
            parsed.append((key, record))
        removed = 0
        if full:
            keep = {key for key, record in parsed if not record.deleted}
            for entry in [e for k, e in self._entries.items() if k not in keep]:
                self._remove(entry)
                removed += 1
        upserted = 0
        now = self.clock()
        for key, record in parsed:
            if record.deleted:
                if (old := self._entries.get(key)) is not None:
                    self._remove(old)
                    removed += 1
                continue
            state = FlowState(record.state)
            entry = Entry(key, state, now + record.expires_in, 0, 0.0)
            self._insert(entry)
            self.version += 1
            entry.version = self.version
            entry.exported_deadline = entry.deadline
            upserted += 1
        return upserted, removed


class Conntrack:
    """All VNICs' tables on one vswitch, with the export/import surface a migration uses."""

    def __init__(
        self, clock: Clock = time.monotonic, timeouts: dict[FlowState, float] | None = None, max_entries: int = 65536
    ) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self.max_entries = max_entries
        self._tables: dict[str, ConntrackTable] = {}

    def table(self, vnic: str) -> ConntrackTable:
        table = self._tables.get(vnic)
        if table is None:
            table = self._tables[vnic] = ConntrackTable(self.clock, self.timeouts, self.max_entries)
        return table

    def vnics(self) -> list[str]:
        return sorted(self._tables)

    def export(self, vnic: str) -> list[FlowRecord]:
        return self.table(vnic).export()

    def export_delta(self, vnic: str, since_version: int) -> FlowBatch:
        table = self.table(vnic)
        full, records = table.export_delta(since_version)
        return FlowBatch(vnic=vnic, version=table.version, since=since_version, full=full, records=records)

    def import_records(self, vnic: str, records: Iterable[FlowRecord], full: bool = False) -> tuple[int, int]:
        return self.table(vnic).import_records(records, full)

    def import_batch(self, batch: FlowBatch) -> tuple[int, int]:
        return self.import_records(batch.vnic, batch.records, batch.full)

    def remove_vnic(self, vnic: str) -> None:
        table = self._tables.pop(vnic, None)
        if table is not None:
            for entry in table.entries():
                entry.live = False

    def sweep(self) -> int:
        return sum(t.sweep() for t in self._tables.values())
