"""Dual ingress: the per-VNIC gate that makes the ingress handoff exactly-once across a migration.

While a VNIC migrates, every sender duplicates its ingress to the source and the destination host
and stamps both copies with the same per-(sender, VNIC) sequence number (see ``vswitch.py``). Each
host passes the VNIC's ingress through an :class:`IngressGate`:

* **open** — frames go on to the security lists and the VM; the gate remembers, per sender, the
  highest sequence it *processed* (delivered or denied: either way the source's VM has had its
  chance to see it).
* **holding** — frames are kept in a bounded FIFO (count and bytes) owned by the vswitch, not in a
  kernel socket buffer that QEMU would drain or lose. When full, the *oldest* frame is evicted:
  during a long pre-copy the destination's buffer fills with frames the source already delivered,
  and the ones that matter are the newest (those after the pause).

A destination gate starts holding. At the pause, the source gate switches to holding and returns
its ``processed`` map: the **pause marker**. When the VM runs on the destination, its gate is
resumed with that marker and releases, in arrival order, exactly the held frames the source did
not process (``seq > marker[sender]``) plus unstamped frames (only ever sent to this host); the
rest are duplicates. The marker then stays as a *floor* for a grace period so a straggling stamped
copy is still recognised as a duplicate. On cancel the source gate is resumed with its own marker,
which releases everything it held. Frames lost to eviction after the marker are counted.

The seam inside the source host: the vswitch stops writing to QEMU's socket only when it is asked
for the marker, a few milliseconds after QEMU stopped the VM. Frames written in between sit in
QEMU's socket buffer, plus at most one that QEMU read after the stop and queued internally (a
stopped virtio-net accepts nothing, so QEMU's dgram backend parks that frame and stops reading).
None of these reach the guest, yet the marker counts them as processed. hostd created that socket
and kept a duplicate, so it drains what QEMU never read and :func:`replay_marker` lowers the
marker below those frames: the destination then delivers them. Whether QEMU parked a frame is
told by a probe: right after it starts holding, the vswitch writes :data:`PAUSE_PROBE` to the
socket. A stopped QEMU reads at most one frame, so the probe is still there exactly when QEMU
had already parked a real frame (or had one unread before it). A probe QEMU did read is parked in
its place, harmless: it is addressed to no one, and is dropped if the source ever runs again.
Nothing lost, nothing twice.

Sequence numbers are plain integers compared per sender: a sender's counter for a VNIC never
resets while the sender runs, so markers and sequences always come from the same series.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from livemig.wire.vswitch import Delivery

FLOOR_GRACE_S = 30.0
# an Ethernet frame for nobody (locally administered unicast, IEEE local-experimental ethertype)
PAUSE_PROBE = (bytes.fromhex("026c6d000000026c6d00000188b5") + b"livemig pause probe").ljust(60, b"\x00")
RECENT_DELIVERIES = 256  # frames remembered per VNIC for the marker; far more than a pause leaves behind


class Admission(Enum):
    DELIVER = "deliver"
    HELD = "held"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class HeldFrame:
    sender: str
    seq: int  # 0: unstamped
    frame: bytes


@dataclass(slots=True)
class Release:
    """What a resume lets through, and the accounting of what it did not."""

    frames: list[HeldFrame] = field(default_factory=list)
    duplicates_skipped: int = 0
    lost_to_overflow: int = 0


class IngressGate:
    """One VNIC's ingress gate on one host (pure logic: no sockets, injected clock)."""

    def __init__(
        self,
        holding: bool = False,
        max_frames: int = 8192,
        max_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holding = holding
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.clock = clock
        self.processed: dict[str, int] = {}
        self._floor: dict[str, int] = {}
        self._floor_until = 0.0
        self._buffer: deque[HeldFrame] = deque()
        self._bytes = 0
        self._evicted: dict[str, tuple[int, int]] = {}  # sender -> (count, highest seq) since holding began
        self.overflowed = 0
        self.duplicates = 0

    @property
    def held(self) -> int:
        return len(self._buffer)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def _is_duplicate(self, sender: str, seq: int) -> bool:
        if not seq or not self._floor:
            return False
        if self.clock() > self._floor_until:
            self._floor.clear()
            return False
        return seq <= self._floor.get(sender, 0)

    def admit(self, sender: str, seq: int, frame: bytes) -> Admission:
        """Decide the fate of one ingress frame (``seq`` 0 when the sender did not stamp it)."""
        if self._is_duplicate(sender, seq):
            self.duplicates += 1
            return Admission.DUPLICATE
        if self.holding:
            self._buffer.append(HeldFrame(sender, seq, frame))
            self._bytes += len(frame)
            while len(self._buffer) > self.max_frames or self._bytes > self.max_bytes:
                self._evict()
            return Admission.HELD
        if seq and seq > self.processed.get(sender, 0):
            self.processed[sender] = seq
        return Admission.DELIVER

    def _evict(self) -> None:
        old = self._buffer.popleft()
        self._bytes -= len(old.frame)
        self.overflowed += 1
        count, top = self._evicted.get(old.sender, (0, 0))
        self._evicted[old.sender] = (count + 1, max(top, old.seq))

    def hold(self) -> dict[str, int]:
        """Start holding (the VM is pausing here); returns the pause marker."""
        self.holding = True
        return dict(self.processed)

    def resume(self, marker: dict[str, int]) -> Release:
        """Stop holding; release held frames the marker's owner did not process, in arrival order."""
        release = Release()
        for held in self._buffer:
            if held.seq and held.seq <= marker.get(held.sender, 0):
                release.duplicates_skipped += 1
                continue
            release.frames.append(held)
            if held.seq and held.seq > self.processed.get(held.sender, 0):
                self.processed[held.sender] = held.seq
        for sender, (count, top) in self._evicted.items():
            release.lost_to_overflow += min(count, max(0, top - marker.get(sender, 0)))
        self.duplicates += release.duplicates_skipped
        self._buffer.clear()
        self._bytes = 0
        self._evicted.clear()
        self.holding = False
        if marker:
            self._floor = {s: max(v, self._floor.get(s, 0)) for s, v in marker.items()}
            self._floor_until = self.clock() + FLOOR_GRACE_S
        return release


class Sequencer:
    """A sender's per-VNIC sequence numbers for stamped (duplicated) ingress: 1, 2, 3, ... (32 bits)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def next(self, vnic: str) -> int:
        seq = self._next.get(vnic, 1)
        self._next[vnic] = seq + 1 if seq < 0xFFFFFFFF else 1
        return seq


@dataclass(frozen=True, slots=True)
class Replay:
    """The marker the destination should resume with, and what went into it."""

    marker: dict[str, int]
    unconsumed: int  # frames written to the source QEMU that its guest never received
    unrecoverable: int  # of those, frames without a sequence number (only ever sent to the source)


class Drain(NamedTuple):
    """What hostd read back out of a paused QEMU's NIC socket through its duplicate."""

    frames: int  # frames QEMU never read, the vswitch's pause probe not counted
    probe_left: bool  # the probe was still there: QEMU holds one more frame parked


def replay_marker(
    marker: dict[str, int],
    recent: Sequence[Delivery],
    drain: Drain | None,
    stopped_at: float | None,
) -> Replay:
    """Lower ``marker`` below the frames the paused source QEMU never passed to its guest.

    ``recent``: the last frames the source vswitch wrote to QEMU's socket, oldest first (the socket
    is FIFO, so the unconsumed ones are its tail). ``drain``: what hostd read out of that socket
    after the vswitch stopped writing (None when hostd holds no duplicate of it, e.g. after a
    hostd restart re-adopted the VM); then ``stopped_at``, the wall-clock time of QEMU's STOP
    event, is the fallback: frames written after it cannot have reached the guest.
    """
    if drain is None:
        unconsumed = sum(1 for d in recent if stopped_at is not None and d.at > stopped_at)
    else:
        unconsumed = drain.frames + (1 if drain.probe_left else 0)
    unconsumed = min(unconsumed, len(recent))
    adjusted = dict(marker)
    unrecoverable = 0
    for delivery in recent[len(recent) - unconsumed :]:
        if not delivery.seq:
            unrecoverable += 1
            continue
        adjusted[delivery.sender] = min(adjusted.get(delivery.sender, delivery.seq), delivery.seq - 1)
    return Replay(marker=adjusted, unconsumed=unconsumed, unrecoverable=unrecoverable)
