"""The dual-ingress gate: exactly-once across the pause marker, bounded buffer, overflow counted."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.network.handoff import Admission, IngressGate, Sequencer


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
