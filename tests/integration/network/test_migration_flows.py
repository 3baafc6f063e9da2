"""What a migration needs from the dataplane, across real vswitch processes on loopback.

* flow state moves: the reply traffic of a connection the VM opened passes on the new host only
  when the conntrack was exported from the old host and imported on the new one;
* dual ingress: with a sender at 1000 frames/s, the union of what the VM receives on the source
  (before the pause) and on the destination (after resume) is every frame, exactly once.
"""

from __future__ import annotations

import base64
import threading
import time

import pytest

from livemig.errors import InvalidRequest
from livemig.network.envelope import open_flows
from livemig.network.handoff import PAUSE_PROBE, Drain, replay_marker
from livemig.network.model import derived_gateway_mac
from livemig.network.packets import TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN, Ethernet, IPv4, Tcp
from livemig.testing.fakevm import SAMPLE, FakeVm, tcp_frame

GW_A, GW_B = derived_gateway_mac("blue-a"), derived_gateway_mac("blue-b")


def mac(v: str) -> str:
    return SAMPLE[v][0]


def ip(v: str) -> str:
    return SAMPLE[v][1]


def test_conntrack_moves_with_the_vm(net):
    net.push(placement={"db": "C"})
    web_a, db = net.attach("A", "web"), net.attach("C", "db")
    web_a.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_SYN, seq=100))
    assert db.recv() is not None
    synack = tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5432, 40000, TCP_SYN | TCP_ACK, seq=7, ack=101)
    db.send(synack)
    assert web_a.recv() is not None
    web_a.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_ACK, seq=101, ack=8))
    assert db.recv() is not None

    # the VM moves to B; B has not seen the flow: db's data is denied there (web only serves port 80)
    web_b = net.attach("B", "web")
    net.push(placement={"db": "C", "web": "B"})
    data = tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5432, 40000, TCP_ACK | TCP_PSH, 8, 101, b"row")
    db.send(data)
    assert web_b.recv(0.3) is None
    denied = net.counters("B")["denied_ingress"]
    assert denied >= 1

    envelope, version = net.client("A").export_flows("web", 0)
    report = net.client("B").import_flows("web", envelope)
    assert report.imported == 1 and version > 0
    db.send(data)
    received = web_b.recv()
    assert received is not None and Tcp.parse(IPv4.parse(Ethernet.parse(received).payload).payload).payload == b"row"
    assert net.client("A").export_flows("web", version)[0] == net.client("A").export_flows("web", version)[0]


def _collect(vm: FakeVm, sink: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        frame = vm.recv(0.05)
        if frame is not None and frame != PAUSE_PROBE:  # the probe is for hostd's drain, not the guest
            sink.append(Tcp.parse(IPv4.parse(Ethernet.parse(frame).payload).payload).seq)


def test_dual_ingress_exactly_once_at_1000_frames_per_second(net):
    net.push(placement={"app": "C"})
    source = net.attach("A", "web")
    app = net.attach("C", "app")
    destination = net.attach("B", "web", hold=True)  # PreparingTarget: ingress held on B

    at_source: list[int] = []
    at_destination: list[int] = []
    stop = threading.Event()
    readers = [threading.Thread(target=_collect, args=(vm, sink, stop), daemon=True)
               for vm, sink in ((source, at_source), (destination, at_destination))]  # fmt: skip
    for reader in readers:
        reader.start()

    total, rate = 2000, 1000.0
    sent = threading.Event()

    def sender() -> None:
        start = time.monotonic()
        for n in range(1, total + 1):
            app.send(tcp_frame(mac("app"), GW_B, ip("app"), ip("web"), 33000, 80, TCP_ACK | TCP_PSH, n, 1, b"x"))
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sent.set()

    thread = threading.Thread(target=sender, daemon=True)
    t0 = time.monotonic()
    thread.start()

    def at(offset: float) -> None:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))

    at(0.3)
    net.push(placement={"app": "C"}, ingress={"web": ["A", "B"]})  # dual ingress starts
    at(0.9)
    paused = net.client("A").pause_marker("web", flows_since=0)  # the VM pauses on A: marker + final flows
    marker = paused.marker
    assert marker.get("C", 0) > 0 and paused.flows is not None
    at(1.1)
    handed = net.client("B").hand_over("web", marker, paused.flows)  # import, then release: the VM runs on B
    report = handed.resume
    at(1.3)
    net.push(placement={"app": "C", "web": "B"})  # switchover: only B from now on
    net.detach("A", "web")
    assert sent.wait(timeout=10)
    time.sleep(0.3)
    stop.set()
    for reader in readers:
        reader.join()

    everything = set(range(1, total + 1))
    assert len(at_source) == len(set(at_source)), "the source delivered a frame twice"
    assert len(at_destination) == len(set(at_destination)), "the destination delivered a frame twice"
    assert not set(at_source) & set(at_destination), "a frame reached the VM on both hosts"
    lost = sorted(everything - set(at_source) - set(at_destination))
    assert not lost, f"lost {len(lost)} frames, first {lost[:20]}"
    assert max(at_source) < min(at_destination)  # the handoff is a clean cut in the stream
    # the window was exercised: frames held through the pause, duplicates recognised, none evicted
    assert report.delivered > 20 and report.duplicates_skipped > 100 and report.lost_to_overflow == 0


def test_the_pause_carries_only_the_flows_changed_since_the_bulk_copy(net):
    """SyncingFlows copies in bulk and remembers the source's version; inside the pause the source's
    marker carries only later changes (a new flow, a reset one), and the destination's one
    hand-off call imports them before it releases ingress."""
    net.push(placement={"db": "C"})
    web_a, db = net.attach("A", "web"), net.attach("C", "db")
    net.attach("B", "web", hold=True)

    def open_flow(port: int) -> None:
        web_a.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), port, 5432, TCP_SYN, seq=100))
        assert db.recv() is not None

    open_flow(40001)
    open_flow(40002)
    envelope, bulk_version = net.client("A").export_flows("web", 0)  # SyncingFlows: the bulk copy
    assert net.client("B").import_flows("web", envelope).imported == 2
    open_flow(40003)  # pre-copy goes on: one more connection
    web_a.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40001, 5432, TCP_RST, seq=101))

    paused = net.client("A").pause_marker("web", flows_since=bulk_version)
    assert paused.flows is not None and paused.flows_version is not None and paused.flows_version > bulk_version
    delta = open_flows(base64.b64decode(paused.flows))
    assert not delta.full and sorted(r.sport for r in delta.records) == [40001, 40003], (
        "only what changed after the bulk copy: 40003 opened, 40001 reset; 40002 stays behind"
    )
    handed = net.client("B").hand_over("web", paused.marker, paused.flows)
    assert handed.flows is not None and handed.flows.imported == 2
    held, _ = net.client("B").export_flows("web", 0)
    states = {r.sport: r.state for r in open_flows(held).records}
    assert sorted(states) == [40001, 40002, 40003] and states[40001] != states[40002], states


def test_a_hand_off_with_damaged_flows_is_refused_and_releases_nothing(net):
    net.attach("B", "web", hold=True)
    for flows, why in (("%%%not-base64", "base64"), ("AAAA", "envelope")):
        with pytest.raises(InvalidRequest, match=why):
            net.client("B").hand_over("web", {}, flows)
    assert net.client("B").hand_over("web", {}).resume.delivered == 0


def test_a_failed_hand_off_gives_the_source_what_its_paused_qemu_never_read(net):
    """The destination failed after the hand-off, so the source runs on: the frames its paused QEMU
    never passed on (the one it dropped at the stop, the ones hostd drained) are written again from
    the source vswitch's memory, then the ones it held since the pause; the guest sees every frame
    once, in order. The socket plays QEMU's dgram backend (network/handoff.py)."""
    net.push(placement={"app": "C"})
    web = net.attach("A", "web")
    app = net.attach("C", "app")
    net.attach("B", "web", hold=True)
    net.push(placement={"app": "C"}, ingress={"web": ["A", "B"]})  # the migration's dual ingress: stamped frames

    def send(n: int) -> None:
        app.send(tcp_frame(mac("app"), GW_B, ip("app"), ip("web"), 33000, 80, TCP_ACK | TCP_PSH, n, 1, b"x"))

    def seq_of(frame: bytes) -> int:
        return Tcp.parse(IPv4.parse(Ethernet.parse(frame).payload).payload).seq

    for n in range(1, 11):
        send(n)
    seen = [seq_of(f) for f in (web.recv() for _ in range(6)) if f is not None]  # the guest took 6
    time.sleep(0.3)
    assert web.recv() is not None  # the stopped QEMU read #7, could not deliver it, and drops it at the stop
    paused = net.client("A").pause_marker("web")  # its probe queues behind #8-#10: QEMU parked one
    unread = web.recv_all(quiet=0.2)  # hostd's drain
    drained = [f for f in unread if f != PAUSE_PROBE]
    replay = replay_marker(paused.marker, paused.recent, Drain(len(drained), PAUSE_PROBE in unread), None)
    for n in range(11, 14):
        send(n)  # held by the source vswitch during the pause
    time.sleep(0.3)

    report = net.client("A").resume("web", replay.marker, replay_recent=True)  # the hand-off failed
    after = [seq_of(f) for f in web.recv_all(quiet=0.3)]
    assert seen == [1, 2, 3, 4, 5, 6] and len(drained) == 3 and PAUSE_PROBE in unread
    assert (report.replayed, report.delivered) == (4, 3)
    assert seen + after == list(range(1, 14)), "every frame once, in order"
