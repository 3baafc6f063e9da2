"""The dual-ingress gate: exactly-once across the pause marker, bounded buffer, overflow counted."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.network.handoff import Admission, Drain, IngressGate, Sequencer, replay_marker
from livemig.wire.vswitch import Delivery


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frame(sender: str, seq: int) -> bytes:
    return f"{sender}:{seq}".encode()


def test_exactly_once_across_the_marker_with_two_senders():
    source, destination = IngressGate(), IngressGate(holding=True)
    seqs = {"A": Sequencer(), "C": Sequencer()}
    delivered_at_source: list[bytes] = []
    sent: list[bytes] = []

    def send(sender: str) -> None:
        seq = seqs[sender].next("web")
        data = frame(sender, seq)
        sent.append(data)
        if source.admit(sender, seq, data) is Admission.DELIVER:
            delivered_at_source.append(data)
        destination.admit(sender, seq, data)

    for i in range(50):
        send("A" if i % 3 else "C")
    marker = source.hold()  # the VM pauses on the source
    assert marker == {"A": 33, "C": 17}
    for i in range(20):
        send("C" if i % 2 else "A")  # arrives at both, delivered at neither yet
    release = destination.resume(marker)
    assert release.duplicates_skipped == 50 and release.lost_to_overflow == 0
    resumed = [h.frame for h in release.frames]
    assert sorted(delivered_at_source + resumed) == sorted(sent)
    assert not set(delivered_at_source) & set(resumed)
    assert resumed == sent[50:]  # in arrival order


def test_unstamped_frames_only_reach_one_host_and_are_always_released():
    gate = IngressGate(holding=True)
    gate.admit("B", 0, b"only-here")
    gate.admit("A", 5, b"old")
    release = gate.resume({"A": 5})
    assert [h.frame for h in release.frames] == [b"only-here"]


def test_stragglers_after_resume_are_duplicates_until_the_grace_period_ends():
    clock = Clock()
    gate = IngressGate(holding=True, clock=clock)
    gate.resume({"A": 10})
    assert gate.admit("A", 9, b"late copy") is Admission.DUPLICATE
    assert gate.admit("A", 11, b"new") is Admission.DELIVER
    assert gate.admit("A", 0, b"unstamped") is Admission.DELIVER
    clock.now += 31
    assert gate.admit("A", 9, b"much later") is Admission.DELIVER


def test_buffer_is_bounded_evicts_oldest_and_counts_what_was_lost():
    gate = IngressGate(holding=True, max_frames=10)
    for seq in range(1, 31):
        assert gate.admit("A", seq, frame("A", seq)) is Admission.HELD
    assert gate.held == 10 and gate.overflowed == 20
    release = gate.resume({"A": 15})  # 16..20 were after the marker but got evicted
    assert [h.seq for h in release.frames] == list(range(21, 31))
    assert release.lost_to_overflow == 5 and release.duplicates_skipped == 0


def test_byte_bound_and_cancel_releases_everything_the_source_held():
    source = IngressGate(max_bytes=100)
    for seq in range(1, 4):
        source.admit("A", seq, b"x" * 10)
    marker = source.hold()
    for seq in range(4, 9):
        source.admit("A", seq, b"y" * 30)
    assert source.held_bytes <= 100 and source.held == 3
    release = source.resume(marker)  # cancel: the VM stays here
    assert [h.seq for h in release.frames] == [6, 7, 8] and release.lost_to_overflow == 2
    assert not source.holding and source.admit("A", 9, b"z") is Admission.DELIVER


def test_sequencer_counts_per_vnic_and_skips_zero_on_wrap():
    seq = Sequencer()
    assert [seq.next("a"), seq.next("a"), seq.next("b")] == [1, 2, 1]
    seq._next["a"] = 0xFFFFFFFF
    assert [seq.next("a"), seq.next("a")] == [0xFFFFFFFF, 1]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(0, 200), st.integers(0, 2**31), st.integers(1, 400))
def test_property_nothing_lost_nothing_twice(before, after, seed, capacity):
    """Random interleaving of two senders; the union of both hosts' deliveries is every frame once,
    except frames the destination had to evict, which are exactly the ones reported lost."""
    rng = random.Random(seed)
    source, destination = IngressGate(), IngressGate(holding=True, max_frames=capacity)
    seqs = Sequencer(), Sequencer()
    sent, at_source = [], []
    marker: dict[str, int] = {}
    for i in range(before + after):
        if i == before:
            marker = source.hold()
        who = rng.randrange(2)
        sender = "AC"[who]
        seq = seqs[who].next("vnic")
        data = frame(sender, seq)
        sent.append(data)
        if source.admit(sender, seq, data) is Admission.DELIVER:
            at_source.append(data)
        destination.admit(sender, seq, data)
    if before + after == before:
        marker = source.hold()
    release = destination.resume(marker)
    at_destination = [h.frame for h in release.frames]
    assert not set(at_source) & set(at_destination)
    assert len(set(at_destination)) == len(at_destination)
    missing = set(sent) - set(at_source) - set(at_destination)
    assert len(missing) == release.lost_to_overflow


# -- the seam inside the source host: frames a stopped QEMU never read --------------------------


def simulate_source_pause(deliveries: list[tuple[str, int]], unread_from: int) -> tuple[list, list, int, bool]:
    """QEMU's dgram backend around a stop. Frames before ``unread_from`` reached the guest; of the
    rest (written after the stop, or left unread when it came), QEMU reads one and parks it, the
    others stay in the socket. Then the vswitch writes the probe: QEMU reads it only if it had
    read nothing since the stop."""
    recent = [Delivery(sender=s, seq=q, at=float(i)) for i, (s, q) in enumerate(deliveries)]
    consumed = deliveries[:unread_from]
    unread = deliveries[unread_from:]
    drained = max(0, len(unread) - 1)  # all but the parked one
    probe_left = bool(unread)
    return recent, consumed, drained, probe_left


@settings(max_examples=300, deadline=None)
@given(
    senders=st.lists(st.sampled_from(["A", "C"]), min_size=0, max_size=40),
    unread_fraction=st.floats(min_value=0, max_value=1),
    stop_offset=st.integers(min_value=-3, max_value=3),
)
def test_replay_marker_gives_the_destination_exactly_what_the_guest_missed(senders, unread_fraction, stop_offset):
    seqs = {"A": Sequencer(), "C": Sequencer()}
    deliveries = [(s, seqs[s].next("v")) for s in senders]
    unread_from = round(unread_fraction * len(deliveries))
    recent, consumed, drained, probe_left = simulate_source_pause(deliveries, unread_from)
    marker = {}
    for sender, seq in deliveries:
        marker[sender] = seq
    # the STOP event's time may be off by a few frames either way: the probe answer decides
    stopped_at = unread_from - 0.5 + stop_offset

    replay = replay_marker(marker, recent, Drain(drained, probe_left), stopped_at)

    # the destination held every stamped frame: it releases those above the replayed marker
    released = [(s, q) for s, q in deliveries if q > replay.marker.get(s, 0)]
    assert sorted(consumed + released) == sorted(deliveries)  # each frame once: none lost, none twice
    assert replay.unconsumed == len(deliveries) - unread_from


def test_replay_marker_without_our_socket_falls_back_to_the_stop_time():
    recent = [Delivery(sender="A", seq=q, at=float(q)) for q in range(1, 6)]
    replay = replay_marker({"A": 5}, recent, None, stopped_at=3.5)
    assert replay.marker == {"A": 3} and replay.unconsumed == 2


def test_replay_marker_when_nothing_came_after_the_stop_changes_nothing():
    recent = [Delivery(sender="A", seq=q, at=float(q)) for q in range(1, 6)]
    assert replay_marker({"A": 5}, recent, None, stopped_at=9.0).marker == {"A": 5}
    assert replay_marker({"A": 5}, recent, Drain(0, False), stopped_at=0.0).marker == {"A": 5}


def test_replay_marker_counts_unstamped_late_frames_as_unrecoverable():
    recent = [
        Delivery(sender="A", seq=1, at=1.0),
        Delivery(sender="", seq=0, at=2.0),
        Delivery(sender="A", seq=2, at=3.0),
    ]
    replay = replay_marker({"A": 2}, recent, Drain(1, probe_left=True), stopped_at=1.5)
    assert replay.marker == {"A": 1}
    assert (replay.unconsumed, replay.unrecoverable) == (2, 1)


def test_replay_marker_never_rolls_back_more_than_it_remembers():
    recent = [Delivery(sender="A", seq=9, at=1.0)]
    replay = replay_marker({"A": 9}, recent, Drain(50, probe_left=True), stopped_at=None)
    assert replay.unconsumed == 1 and replay.marker == {"A": 8}
