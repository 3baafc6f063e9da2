"""The vswitch's fast path: a bounded per-flow cache of the forwarding and security decision.

Why: the full path parses every frame into records, looks the destination up, evaluates the
security lists through conntrack, and only then forwards. For an established flow every packet
reaches the same decision, so (like Open vSwitch's flow cache) the first packets of a flow take
the full path in ``vswitch.py`` and leave a :class:`EgressFlow` or :class:`OverlayFlow` here; the
next ones are looked up by key and only re-check what can differ from one packet to the next.

The key is everything the decision depends on, taken from the frame without parsing it:
the port it came in on (the VNIC, or the overlay sender's address plus the VXLAN flags and VNI),
the Ethernet header (both MACs, so anti-spoofing is part of the key), the IPv4 version/header
length byte, flags/fragment offset, TTL and protocol, both addresses, and the L4 ports (for ICMP:
type, code and echo identifier). Whatever is not in the key (lengths, checksums, ident, TCP flags,
sequence stamps) is checked per packet: :func:`intact` repeats, byte for byte, the checks that
make the full path drop a frame as malformed, and a TCP segment with SYN, FIN or RST always takes
the full path because it moves the connection's state.

An entry holds the resolved actions: the target VNIC, the rewrite of a routed frame, whether to
stamp a sequence number (dual ingress), the hosts to deliver to (local port or overlay endpoint),
and a :class:`Verdict` per security decision: the conntrack entry to touch, or, for a flow allowed
by a stateless rule, the fact that no entry existed. It goes stale when:

* the vswitch flushes the cache: a mapping, security list, attach, detach, hold, import or resume
  (``Vswitch._flows_changed``): all rare control-plane events, so a flush is simpler than tracking
  which entries they touch;
* its conntrack entry left the table, changed state, or expired (``Entry.live``, ``state``,
  ``deadline``: checked on every hit), or a stateless verdict's table gained an entry
  (``ConntrackTable.inserts``). Such a packet takes the full path, which re-decides and re-caches.

What a hit still does, exactly as the full path: every counter, the conntrack deadline refresh (flow
export and expiry depend on it), the sequence stamp and the ingress gate (hold, duplicates, the
pause marker), and the record of recent deliveries. Denied frames are never cached: they take the
full path, which counts them. The cache is bounded; when full, the oldest entry makes room.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from livemig.network.conntrack import ConntrackTable, Entry, FlowState
from livemig.network.packets import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN, FlowInfo
from livemig.network.seclist import Decision

if TYPE_CHECKING:
    from livemig.network.vswitch import LocalVnic, VnicView

DEFAULT_SIZE = 16384
TCP_STATE_FLAGS = TCP_SYN | TCP_FIN | TCP_RST  # a segment with one of these may move the state

# The key's byte fields, straight from the frame (offsets for an Ethernet frame, IPv4 header of 20
# bytes): Ethernet header + version/IHL (0-14), flags/fragment offset/TTL/protocol (20-23),
# addresses (26-33), then per protocol the L4 ports (34-37), or ICMP type/code (34-35) and the echo
# identifier (38-39), or nothing. Skipped: TOS, total length, ident, header checksum, L4 checksum.
_L3 = "15s5x4s2x"
_KEYS = {IPPROTO_TCP: _L3 + "12s", IPPROTO_UDP: _L3 + "12s", IPPROTO_ICMP: _L3 + "10s2x2s"}
_BARE = _L3 + "8s"
_VXLAN = "1s3x3sx"  # flags, VNI (the sequence stamp in bytes 1-3 and 7 is not part of the key)
_FRAME_KEYS = {proto: struct.Struct(fmt) for proto, fmt in _KEYS.items()}
_FRAME_BARE = struct.Struct(_BARE)
_OVERLAY_KEYS = {proto: struct.Struct(_VXLAN + fmt) for proto, fmt in _KEYS.items()}
_OVERLAY_BARE = struct.Struct(_VXLAN + _BARE)
MIN_FRAME = 42  # shorter frames always take the full path (no TCP, UDP or ICMP packet fits)

FrameKey = tuple[str, tuple[bytes, ...]]
OverlayKey = tuple[tuple[str, int], tuple[bytes, ...]]


def frame_key(vnic_id: str, frame: bytes) -> FrameKey | None:
    """The cache key of a frame a local VM sent (None: too short to be cached)."""
    if len(frame) < MIN_FRAME:
        return None
    return vnic_id, _FRAME_KEYS.get(frame[23], _FRAME_BARE).unpack_from(frame)


def overlay_key(addr: tuple[str, int], datagram: bytes) -> OverlayKey | None:
    """The cache key of a VXLAN datagram from the overlay endpoint ``addr``."""
    if len(datagram) < MIN_FRAME + 8:
        return None
    return addr, _OVERLAY_KEYS.get(datagram[31], _OVERLAY_BARE).unpack_from(datagram)


def cacheable_ipv4(frame: bytes, at: int) -> bool:
    """An IPv4 header of 20 bytes at ``at``, not a fragment: the only packets the cache keys."""
    return frame[at] == 0x45 and not (frame[at + 6] & 0x3F or frame[at + 7])


def intact(frame: bytes, at: int, proto: int) -> bool:
    """Whether the full path would parse the IPv4 packet at ``at`` (20-byte header) without finding
    it malformed: total length within the frame, header checksum, and the L4 header's own length."""
    total = frame[at + 2] << 8 | frame[at + 3]
    l4 = total - 20
    # the header checksum: 2**16 = 1 (mod 0xFFFF), so the header read as one number is congruent to
    # the one's-complement sum of its 16-bit words, which is 0xFFFF (= 0) when the checksum is right
    if l4 < 0 or at + total > len(frame) or int.from_bytes(frame[at : at + 20]) % 0xFFFF:
        return False
    if proto == IPPROTO_TCP:
        return l4 >= 20 and 20 <= (frame[at + 32] >> 4) * 4 <= l4
    if proto == IPPROTO_UDP:
        return l4 >= 8 and 8 <= (frame[at + 24] << 8 | frame[at + 25]) <= l4
    if proto == IPPROTO_ICMP:
        return l4 >= 8
    return True


class Verdict:
    """One security decision the cache may reuse, and what makes it stale.

    ``entry`` set: the packet is part of a tracked flow (in ``state``, which the packet does not
    change); still valid while the entry is live, unexpired and in that state. ``entry`` None: a
    stateless rule allowed it and no flow was filed under its 5-tuple; still valid while the table
    has had no insert since (``inserts``) and the rules are unchanged (the vswitch flushes then).
    """

    __slots__ = ("entry", "inserts", "state", "table")

    def __init__(self, table: ConntrackTable, entry: Entry | None, state: FlowState | None, inserts: int) -> None:
        self.table = table
        self.entry = entry
        self.state = state
        self.inserts = inserts

    @classmethod
    def of(cls, table: ConntrackTable, decision: Decision, entry: Entry | None, info: FlowInfo) -> Verdict | None:
        """The reusable form of a full-path decision, or None when the next packet must be decided again.

        Cached: a packet of a tracked flow (TCP only once ESTABLISHED: there a segment without SYN,
        FIN or RST changes nothing, while in the closing states even a bare ACK can), and a packet a
        stateless rule allowed. Not cached: denials, and a packet that just created its flow (the
        next one is decided as tracked, and cached then)."""
        if decision is Decision.TRACKED and entry is not None:
            if info.proto == IPPROTO_TCP and entry.state is not FlowState.ESTABLISHED:
                return None
            return cls(table, entry, entry.state, 0)
        if decision is Decision.STATELESS and not table.indexes(info):
            return cls(table, None, None, table.inserts)
        return None

    def renew(self, now: float) -> bool:
        """Whether the decision holds for one more packet at ``now``; if so, the packet's conntrack
        side effect (a deadline refresh) is done, as the full path would."""
        entry = self.entry
        if entry is None:
            return self.table.inserts == self.inserts
        if entry.live and entry.state is self.state and entry.deadline > now:
            self.table.touch(entry, now)
            return True
        return False


@dataclass(slots=True)
class CachedFlow:
    """What both kinds of cached flow share: where the frame is delivered locally, and through which gate."""

    target: VnicView
    local: LocalVnic | None  # the target's port on this host (None: not attached here)
    proto: int
    ingress: Verdict | None  # the target's ingress decision: filled (again) when a frame passes the gate


@dataclass(slots=True)
class EgressFlow(CachedFlow):
    """A flow leaving a local VM: its egress decision and where its frames go."""

    source: LocalVnic
    egress: Verdict
    head: bytes  # routed: the rewritten Ethernet header (empty: switched, the frame goes on untouched)
    stamp: bool  # dual ingress: every frame gets the next sequence number for the target
    hops: tuple[tuple[bool, tuple[str, int] | None], ...]  # per ingress host: (this host?, overlay address)
    vxlan: bytes  # the VXLAN header of an unstamped frame


@dataclass(slots=True)
class OverlayFlow(CachedFlow):
    """A flow arriving over the overlay for a local VNIC."""

    sender: str


FlowT = TypeVar("FlowT", EgressFlow, OverlayFlow)
KeyT = TypeVar("KeyT", FrameKey, OverlayKey)


class FlowCache(Generic[KeyT, FlowT]):
    """A bounded map key -> cached flow; the oldest entry is evicted when full.

    ``flows`` is read directly by the data path (one dict lookup per frame); everything that
    writes goes through :meth:`put`, :meth:`clear`, so the bound and the statistics hold.
    """

    def __init__(self, name: str, max_entries: int = DEFAULT_SIZE) -> None:
        if max_entries < 0:
            raise ValueError(f"flow cache size {max_entries} is negative")
        self.name = name
        self.max_entries = max_entries
        self.flows: OrderedDict[KeyT, FlowT] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self.flows)

    def put(self, key: KeyT, flow: FlowT) -> None:
        if not self.max_entries:
            return
        flows = self.flows
        flows.pop(key, None)
        while len(flows) >= self.max_entries:
            flows.popitem(last=False)
            self.evictions += 1
        flows[key] = flow

    def discard(self, key: KeyT) -> None:
        self.flows.pop(key, None)

    def clear(self) -> None:
        if self.flows:
            self.flows.clear()
            self.flushes += 1

    def stats(self) -> dict[str, int]:
        prefix = f"flowcache_{self.name}_"
        return {
            prefix + "entries": len(self.flows),
            prefix + "hits": self.hits,
            prefix + "misses": self.misses,
            prefix + "evictions": self.evictions,
            prefix + "flushes": self.flushes,
        }
