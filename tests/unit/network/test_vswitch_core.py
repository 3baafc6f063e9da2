"""The vswitch pipeline in-process, with fake ports and a fake overlay wire (no sockets, no event loop)."""

from __future__ import annotations

from collections import Counter

import pytest

from livemig.errors import Conflict, NotFound
from livemig.network.handoff import PAUSE_PROBE
from livemig.network.model import SecurityList, SecurityRule, derived_gateway_mac
from livemig.network.packets import (
    ARP_REPLY,
    ETHERTYPE_ARP,
    TCP_ACK,
    TCP_SYN,
    Arp,
    Ethernet,
    IPv4,
    Udp,
    Vxlan,
    int_to_ip,
    mac_to_bytes,
    mac_to_str,
)
from livemig.network.vswitch import Vswitch
from livemig.testing.fakevm import (
    SAMPLE,
    arp_request,
    icmp_echo_frame,
    sample_mapping,
    sample_security_lists,
    tcp_frame,
    udp_frame,
)
from livemig.wire.vswitch import Attachment

HOSTS = {"A": "10.99.0.1:4789", "B": "10.99.0.2:4789", "C": "10.99.0.3:4789"}
GW_A = derived_gateway_mac("blue-a")
GW_B = derived_gateway_mac("blue-b")


class FakePort:
    kind = "fake"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.counters: Counter[str] = Counter()

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self) -> None:
        pass


class Wire:
    """Connects vswitches' overlays by address, delivering synchronously."""

    def __init__(self) -> None:
        self.switches: dict[tuple[str, int], Vswitch] = {}
        self.log: list[tuple[str, str, bytes]] = []

    def add(self, name: str) -> Vswitch:
        vs = Vswitch(name, HOSTS[name])
        host, port = HOSTS[name].split(":")
        addr = (host, int(port))
        wire = self

        class Overlay:
            endpoint = HOSTS[name]

            def __init__(self) -> None:
                self.counters: Counter[str] = Counter()

            def sendto(self, data: bytes, to: tuple[str, int]) -> None:
                wire.log.append((name, f"{to[0]}:{to[1]}", data))
                target = wire.switches.get(to)
                if target is not None:
                    target.overlay_datagram(data, addr)

        vs.overlay = Overlay()  # type: ignore[assignment]
        self.switches[addr] = vs
        return vs


def setup(vs: Vswitch, **mapping_kwargs) -> None:
    vs.set_mapping(sample_mapping(HOSTS, **mapping_kwargs))
    for sl in sample_security_lists():
        vs.set_security_list(sl)


def plug(vs: Vswitch, vnic: str, hold: bool = False) -> FakePort:
    port = FakePort()
    vs.plug(port, Attachment(vnic_id=vnic, kind="udp", switch_port=1, qemu_port=2, holding=hold))
    return port


def mac(v: str) -> str:
    return SAMPLE[v][0]


def ip(v: str) -> str:
    return SAMPLE[v][1]


@pytest.fixture
def one():
    vs = Vswitch("A", HOSTS["A"])
    setup(vs)
    ports = {v: plug(vs, v) for v in ("web", "db", "app", "intruder")}
    return vs, ports


def test_arp_answered_from_the_mapping_never_flooded(one):
    vs, ports = one
    vs.vm_frame("web", arp_request(mac("web"), ip("web"), ip("db")))
    vs.vm_frame("web", arp_request(mac("web"), ip("web"), "10.0.1.1"))
    vs.vm_frame("web", arp_request(mac("web"), ip("web"), "10.0.1.99"))  # nobody
    vs.vm_frame("web", arp_request(mac("web"), ip("web"), ip("app")))  # other subnet: ask the gateway
    answers = [Arp.parse(Ethernet.parse(f).payload) for f in ports["web"].sent]
    assert [(a.op, mac_to_str(a.sha), int_to_ip(a.spa)) for a in answers] == [
        (ARP_REPLY, mac("db"), ip("db")),
        (ARP_REPLY, GW_A, "10.0.1.1"),
    ]
    assert all(Ethernet.parse(f).ethertype == ETHERTYPE_ARP and len(f) >= 60 for f in ports["web"].sent)
    assert not ports["db"].sent and not ports["app"].sent and not ports["intruder"].sent
    assert vs.counters["dropped_arp_unanswered"] == 2


def test_switching_with_security_lists_and_conntrack(one):
    vs, ports = one
    syn = tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_SYN)
    vs.vm_frame("web", syn)
    assert ports["db"].sent == [syn]
    synack = tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5432, 40000, TCP_SYN | TCP_ACK)
    vs.vm_frame("db", synack)  # db has no egress rule: conntrack lets the reply out
    assert ports["web"].sent == [synack]
    vs.vm_frame("web", tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40001, 22, TCP_SYN))
    vs.vm_frame("db", tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5000, 80, TCP_SYN))  # db may not call
    assert len(ports["db"].sent) == 1 and len(ports["web"].sent) == 1
    assert vs.counters["denied_ingress"] == 1 and vs.counters["denied_egress"] == 1


def test_routing_between_subnets_rewrites_macs_and_ttl(one):
    vs, ports = one
    vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 1234, 9000, b"hi", ttl=5))
    (frame,) = ports["app"].sent
    eth = Ethernet.parse(frame)
    assert (mac_to_str(eth.dst), mac_to_str(eth.src)) == (mac("app"), GW_B)
    packet = IPv4.parse(eth.payload)  # verifies the rewritten header checksum
    assert packet.ttl == 4 and Udp.parse(packet.payload).payload == b"hi"
    vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 1234, 9000, b"x", ttl=1))
    vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), "10.0.3.3", 1234, 9000, b"x"))
    assert len(ports["app"].sent) == 1
    assert vs.counters["dropped_ttl_exceeded"] == 1 and vs.counters["dropped_no_route"] == 1


def test_vcns_are_isolated_even_with_the_same_addresses(one):
    vs, ports = one
    # intruder (red, 10.0.1.10) tries web's twin address space: ARP, direct MAC, via its gateway
    vs.vm_frame("intruder", arp_request(mac("intruder"), ip("intruder"), ip("db")))
    vs.vm_frame("intruder", udp_frame(mac("intruder"), mac("db"), ip("intruder"), ip("db"), 1, 5432))
    gw_red = derived_gateway_mac("red-a")
    vs.vm_frame("intruder", udp_frame(mac("intruder"), gw_red, ip("intruder"), ip("app"), 1, 9000))
    assert not ports["db"].sent and not ports["app"].sent and not ports["web"].sent
    assert ports["intruder"].sent == []
    # a VXLAN packet in red's VNI addressed to a blue MAC goes nowhere either
    vs.overlay = None
    inner = udp_frame(mac("intruder"), mac("db"), ip("intruder"), ip("db"), 1, 5432)
    vs.set_mapping(sample_mapping(HOSTS, generation=2, placement={"intruder": "B"}))
    vs.overlay_datagram(Vxlan(200, inner).pack(), ("10.99.0.2", 4789))
    assert not ports["db"].sent and vs.counters["dropped_overlay_no_target"] == 1


def test_spoofing_and_garbage_are_counted_and_dropped(one):
    vs, ports = one
    vs.vm_frame("web", udp_frame(mac("db"), mac("app"), ip("web"), ip("app"), 1, 9000))  # wrong MAC
    vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("db"), ip("app"), 1, 9000))  # wrong IP
    for junk in (b"", b"\x00" * 13, mac_to_bytes(mac("db")) + mac_to_bytes(mac("web")) + b"\x08\x00garbage"):
        vs.vm_frame("web", junk)
    vs.vm_frame("web", Ethernet(mac_to_bytes(mac("db")), mac_to_bytes(mac("web")), 0x86DD, b"v6").pack())
    vs.overlay_datagram(b"\x01\x02", ("10.99.0.2", 4789))
    vs.overlay_datagram(b"\x08" + b"\x00" * 7, ("10.99.0.9", 4789))  # not a host of the mapping
    assert not any(p.sent for p in ports.values())
    c = vs.counters
    assert (c["dropped_spoofed_mac"], c["dropped_spoofed_ip"], c["malformed"]) == (1, 1, 4)
    assert (c["dropped_unsupported_ethertype"], c["dropped_overlay_unknown_sender"]) == (1, 1)
    vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 1, 9000))
    assert len(ports["app"].sent) == 1  # and it keeps forwarding


def test_cross_host_over_the_overlay():
    wire = Wire()
    a, b = wire.add("A"), wire.add("B")
    for vs in (a, b):
        setup(vs, placement={"app": "B"})
    web, app = plug(a, "web"), plug(b, "app")
    frame = udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 1234, 9000, b"over")
    a.vm_frame("web", frame)
    ((sender, to, data),) = wire.log
    assert (sender, to) == ("A", HOSTS["B"])
    vx = Vxlan.parse(data)
    assert vx.vni == 100 and vx.seq == 0 and data[1:4] == b"\x00\x00\x00" and data[7] == 0
    assert len(app.sent) == 1 and Ethernet.parse(app.sent[0]).src == mac_to_bytes(GW_B)
    b.vm_frame("app", udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 9000, 1234, b"back"))
    assert len(web.sent) == 1  # web allows only TCP 80/ICMP in; conntrack of its own egress lets the reply in


def test_flow_state_moves_with_the_vnic():
    wire = Wire()
    a, b, c = wire.add("A"), wire.add("B"), wire.add("C")
    for vs in (a, b, c):
        setup(vs, placement={"app": "C"})
    plug(a, "web")
    app_c = plug(c, "app")
    a.vm_frame("web", icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), 8, 77, 1))
    assert len(app_c.sent) == 0  # app's list has no ICMP ingress rule: dropped at C
    a.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000))
    assert len(app_c.sent) == 1
    reply = udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 9000, 5555, b"reply")
    # web moves to B without its flows: the reply is denied there
    web_b = plug(b, "web")
    for vs in (a, b, c):
        vs.set_mapping(sample_mapping(HOSTS, generation=2, placement={"app": "C", "web": "B"}))
    c.vm_frame("app", reply)
    assert web_b.sent == [] and b.counters["denied_ingress"] == 1
    # with the flows imported, it passes
    _batch, envelope = a.export_flows("web", 0)
    report = b.import_flows("web", envelope)
    assert report.imported >= 1
    c.vm_frame("app", reply)
    assert len(web_b.sent) == 1 and Ethernet.parse(web_b.sent[0]).src == mac_to_bytes(GW_A)
    with pytest.raises(NotFound):
        a.export_flows("ghost", 0)


def test_dual_ingress_pause_marker_resume_exactly_once():
    wire = Wire()
    a, b, c = wire.add("A"), wire.add("B"), wire.add("C")
    for vs in (a, b, c):
        setup(vs, placement={"app": "C"})
    src = plug(a, "web")
    plug(c, "app")
    dst = plug(b, "web", hold=True)
    dual = {"web": ["A", "B"]}
    for vs in (a, b, c):
        vs.set_mapping(sample_mapping(HOSTS, generation=2, placement={"app": "C"}, ingress=dual))
    plug(a, "db")
    a.set_security_list(SecurityList(id="db", rules=[SecurityRule(direction="egress")]))  # db may call web here

    def send(n: int) -> None:
        c.vm_frame("app", tcp_frame(mac("app"), GW_B, ip("app"), ip("web"), 1000 + n, 80, TCP_SYN))
        a.vm_frame("db", tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 2000 + n, 80, TCP_SYN))

    for n in range(10):
        send(n)
    paused = a.pause_marker("web")
    marker = paused.marker
    assert marker == {"C": 10, "A": 10}
    assert [(d.sender, d.seq) for d in paused.recent][-2:] == [("C", 10), ("A", 10)]  # what QEMU was given
    assert src.sent.pop() == PAUSE_PROBE  # written after holding began: tells hostd if QEMU parked a frame
    for n in range(10, 15):
        send(n)
    assert len(src.sent) == 20 and dst.sent == []
    report = b.resume("web", marker)
    assert (report.delivered, report.duplicates_skipped, report.lost_to_overflow) == (10, 20, 0)
    ports_src = {Ethernet.parse(f).payload for f in src.sent}
    ports_dst = {Ethernet.parse(f).payload for f in dst.sent}
    assert len(ports_src | ports_dst) == 30 and not ports_src & ports_dst
    # stragglers stamped at or below the marker are dropped as duplicates; new frames flow
    b.overlay_datagram(Vxlan(100, src.sent[0], seq=3).pack(), ("10.99.0.3", 4789))
    send(15)
    assert len(dst.sent) == 12 and b.locals["web"].counters["duplicates"] == 21
    # the source is told to forget the VNIC: its ingress set loses A
    assert a.detach("web") is True and a.detach("web") is False  # idempotent
    assert a.topology.vnics["web"].ingress_hosts == ("B",)
    send(16)
    assert len(dst.sent) == 14


def test_mapping_generations_only_move_forward(one):
    vs, _ = one
    with pytest.raises(Conflict, match="older"):
        vs.set_mapping(sample_mapping(HOSTS, generation=0))
    vs.set_mapping(sample_mapping(HOSTS, generation=1))  # the same push again is fine
    with pytest.raises(Conflict):
        vs.set_mapping(sample_mapping(HOSTS, generation=1, placement={"web": "B"}))
