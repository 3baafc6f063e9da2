"""The vswitch's flow cache: each way a cached decision goes stale, and a differential check that the
cached path does what the full path does (same frames out, same counters, same flow state)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from livemig.network.conntrack import DEFAULT_TIMEOUTS, Conntrack, FlowState
from livemig.network.flowcache import MIN_FRAME, cacheable_ipv4, frame_key, intact, overlay_key
from livemig.network.model import PortRange, SecurityList, SecurityRule, derived_gateway_mac
from livemig.network.packets import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IP_FLAG_MF,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    Ethernet,
    IPv4,
    MalformedPacket,
    Udp,
    Vxlan,
    flow_info,
    internet_checksum,
    ip_to_int,
    mac_to_bytes,
)
from livemig.network.vswitch import Vswitch
from livemig.testing.fakevm import SAMPLE, icmp_echo_frame, sample_mapping, sample_security_lists, tcp_frame, udp_frame
from livemig.wire.vswitch import Attachment

HOSTS = {"A": "10.99.0.1:4789", "B": "10.99.0.2:4789", "C": "10.99.0.3:4789"}
GW_A = derived_gateway_mac("blue-a")
GW_B = derived_gateway_mac("blue-b")
VNICS = ("web", "db", "app", "intruder")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePort:
    kind = "fake"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.counters: Counter[str] = Counter()

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self) -> None:
        pass


class World:
    """Three vswitches on a synchronous fake overlay, one conntrack clock, ports plugged by hand."""

    def __init__(self, flow_cache_size: int = 16384, hosts: tuple[str, ...] = ("A", "B", "C")) -> None:
        self.clock = Clock()
        self.log: list[tuple[str, str, bytes]] = []
        self.switches: dict[str, Vswitch] = {}
        self.ports: dict[tuple[str, str], FakePort] = {}
        by_addr: dict[tuple[str, int], Vswitch] = {}
        for name in hosts:
            vs = Vswitch(name, HOSTS[name], flow_cache_size=flow_cache_size)
            vs.conntrack = Conntrack(self.clock)
            host, port = HOSTS[name].split(":")
            addr = (host, int(port))
            by_addr[addr] = vs
            vs.overlay = _Overlay(name, addr, by_addr, self.log)  # type: ignore[assignment]
            self.switches[name] = vs
        self.generation = 0
        self.push()
        for vs in self.switches.values():
            for sl in sample_security_lists():
                vs.set_security_list(sl)

    def push(self, **kwargs: Any) -> None:
        self.generation += 1
        for vs in self.switches.values():
            vs.set_mapping(sample_mapping(HOSTS, generation=self.generation, **kwargs))

    def plug(self, host: str, vnic: str, hold: bool = False) -> FakePort:
        port = FakePort()
        attachment = Attachment(vnic_id=vnic, kind="udp", switch_port=1, qemu_port=2, holding=hold)
        self.switches[host].plug(port, attachment)
        self.ports[(host, vnic)] = port
        return port

    def set_list(self, security_list: SecurityList) -> None:
        for vs in self.switches.values():
            vs.set_security_list(security_list)

    def hits(self) -> int:
        return sum(vs.vm_flows.hits + vs.overlay_flows.hits for vs in self.switches.values())

    def observed(self) -> dict[str, Any]:
        """Everything a peer, a VM or an operator can see, flow-cache statistics left out."""
        out: dict[str, Any] = {"wire": list(self.log), "ports": {k: list(p.sent) for k, p in self.ports.items()}}
        for name, vs in self.switches.items():
            snap = vs.snapshot_counters()
            out[f"{name}.switch"] = {k: v for k, v in snap.switch.items() if not k.startswith("flowcache_")}
            out[f"{name}.vnics"] = snap.vnics
            for vnic in VNICS:
                table = vs.conntrack.table(vnic)
                out[f"{name}.{vnic}.flows"] = sorted(
                    (e.key, e.state, e.deadline, e.version, e.exported_deadline) for e in table.entries()
                )
                out[f"{name}.{vnic}.version"] = table.version
        return out


class _Overlay:
    def __init__(self, name: str, addr: tuple[str, int], by_addr: dict[tuple[str, int], Vswitch], log: list) -> None:
        self.name, self.addr, self.by_addr, self.log = name, addr, by_addr, log
        self.endpoint = f"{addr[0]}:{addr[1]}"
        self.counters: Counter[str] = Counter()

    def sendto(self, data: bytes, to: tuple[str, int]) -> None:
        self.log.append((self.name, f"{to[0]}:{to[1]}", data))
        target = self.by_addr.get(to)
        if target is not None:
            target.overlay_datagram(data, self.addr)


def mac(v: str) -> str:
    return SAMPLE[v][0]


def ip(v: str) -> str:
    return SAMPLE[v][1]


def web_db(flags: int, payload: bytes = b"") -> bytes:
    return tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, flags, 1, 1, payload)


def db_web(flags: int, payload: bytes = b"") -> bytes:
    return tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5432, 40000, flags, 1, 1, payload)


def web_app_udp(payload: bytes = b"u") -> bytes:
    return udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, payload)


def app_web_udp(payload: bytes = b"r") -> bytes:
    return udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 9000, 5555, payload)


def handshake(world: World, host: str = "A") -> None:
    vs = world.switches[host]
    vs.vm_frame("web", web_db(TCP_SYN))
    vs.vm_frame("db", db_web(TCP_SYN | TCP_ACK))
    vs.vm_frame("web", web_db(TCP_ACK))


# ---------------------------------------------------------------------------------------------
# the cached path is used, and each way its decision goes stale


def test_an_established_flow_takes_the_cached_path():
    world = World(hosts=("A",))
    db = world.plug("A", "db")
    world.plug("A", "web")
    handshake(world)
    vs = world.switches["A"]
    hits = vs.vm_flows.hits
    for n in range(5):
        vs.vm_frame("web", web_db(TCP_ACK | TCP_PSH, b"%d" % n))
    assert vs.vm_flows.hits == hits + 5
    assert db.sent[-5:] == [web_db(TCP_ACK | TCP_PSH, b"%d" % n) for n in range(5)]
    assert vs.locals["db"].counters["tx"] == 7 and vs.counters["tx_vm"] == 8  # SYN, ACK, 5 data; SYN/ACK to web


def test_a_security_list_change_drops_the_next_packet_of_a_cached_flow():
    world = World(hosts=("A",))
    app = world.plug("A", "app")
    world.plug("A", "web")
    vs = world.switches["A"]
    # stateless both ways: nothing is tracked, so every packet is decided by the rules
    world.set_list(SecurityList(id="web", rules=[SecurityRule(direction="egress", tracking="stateless")]))
    world.set_list(SecurityList(id="app", rules=[SecurityRule(direction="ingress", tracking="stateless",
                                                              protocol="udp")]))  # fmt: skip
    for _ in range(3):
        vs.vm_frame("web", web_app_udp())
    assert len(app.sent) == 3 and vs.vm_flows.hits == 2
    world.set_list(SecurityList(id="app", rules=[]))  # app now takes nothing in
    vs.vm_frame("web", web_app_udp())
    assert len(app.sent) == 3 and vs.counters["denied_ingress"] == 1
    world.set_list(SecurityList(id="app", rules=[SecurityRule(direction="ingress", tracking="stateless")]))
    vs.vm_frame("web", web_app_udp())
    vs.vm_frame("web", web_app_udp())
    assert len(app.sent) == 5
    vs.delete_security_list("web")  # web's egress has no list left: default deny
    vs.vm_frame("web", web_app_udp())
    assert len(app.sent) == 5 and vs.counters["denied_egress"] == 1


def test_a_tracked_flow_survives_a_list_change_as_on_the_full_path_but_is_decided_again():
    """Conntrack comes first (seclist.decide): a list change does not cut an established flow. The
    cache is still flushed, so the next packet is decided by the full path, not by the stale entry."""
    world = World(hosts=("A",))
    db = world.plug("A", "db")
    world.plug("A", "web")
    handshake(world)
    vs = world.switches["A"]
    vs.vm_frame("web", web_db(TCP_ACK))
    misses = vs.vm_flows.misses
    world.set_list(SecurityList(id="db", rules=[]))
    vs.vm_frame("web", web_db(TCP_ACK))
    assert vs.vm_flows.misses == misses + 1 and len(db.sent) == 4


def test_a_mapping_change_redirects_the_next_packet():
    world = World()
    world.push(placement={"web": "A", "app": "C"})
    world.plug("A", "web")
    on_c, on_b = world.plug("C", "app"), world.plug("B", "app")
    a = world.switches["A"]
    for _ in range(3):
        a.vm_frame("web", web_app_udp())
    assert len(on_c.sent) == 3 and a.vm_flows.hits >= 1
    world.push(placement={"web": "A", "app": "B"})  # app moved to B
    a.vm_frame("web", web_app_udp())
    assert len(on_c.sent) == 3 and len(on_b.sent) == 1
    assert world.log[-1][1] == HOSTS["B"]


def test_conntrack_expiry_drops_a_cached_reply():
    world = World(hosts=("A",))
    web = world.plug("A", "web")
    world.plug("A", "db")
    handshake(world)
    vs = world.switches["A"]
    for _ in range(3):  # db has no egress rule: only web's connection lets these out
        vs.vm_frame("db", db_web(TCP_ACK))
    assert len(web.sent) == 4 and vs.vm_flows.hits >= 1
    world.clock.now += DEFAULT_TIMEOUTS[FlowState.ESTABLISHED] + 1
    vs.vm_frame("db", db_web(TCP_ACK))
    assert len(web.sent) == 4 and vs.counters["denied_egress"] == 1


def test_a_cached_packet_refreshes_its_flow_like_the_full_path():
    world = World(hosts=("A",))
    world.plug("A", "web")
    world.plug("A", "db")
    handshake(world)
    vs = world.switches["A"]
    timeout = DEFAULT_TIMEOUTS[FlowState.ESTABLISHED]
    for _ in range(5):  # each packet comes just before the deadline: only the refreshes keep the flow
        world.clock.now += timeout * 0.9
        vs.vm_frame("db", db_web(TCP_ACK))
    assert vs.vm_flows.hits >= 4 and vs.counters["denied_egress"] == 0
    (entry,) = vs.conntrack.table("db").entries()
    assert entry.deadline == world.clock.now + timeout
    assert entry.exported_deadline == entry.deadline  # each push-out was a change a delta must carry


def test_close_and_import_send_the_next_packet_down_the_full_path():
    world = World(hosts=("A",))
    web = world.plug("A", "web")
    world.plug("A", "db")
    handshake(world)
    vs = world.switches["A"]
    vs.vm_frame("db", db_web(TCP_ACK))
    vs.vm_frame("db", db_web(TCP_ACK))
    vs.vm_frame("web", web_db(TCP_RST))  # closes the flow in both tables
    misses = vs.vm_flows.misses
    vs.vm_frame("db", db_web(TCP_ACK))  # in CLOSE an ACK still passes, decided by the full path
    assert vs.vm_flows.misses == misses + 1 and len(web.sent) == 4
    world.clock.now += DEFAULT_TIMEOUTS[FlowState.CLOSE] + 1
    vs.vm_frame("db", db_web(TCP_ACK))
    assert len(web.sent) == 4 and vs.counters["denied_egress"] == 1

    handshake(world)  # a new connection, cached again; then an import that does not have it
    vs.vm_frame("db", db_web(TCP_ACK))
    vs.vm_frame("db", db_web(TCP_ACK))
    sent = len(web.sent)
    empty = World(hosts=("A",))
    empty.plug("A", "db")
    _batch, envelope = empty.switches["A"].export_flows("db", 0)  # a full export of nothing
    assert vs.import_flows("db", envelope).removed == 1
    vs.vm_frame("db", db_web(TCP_ACK))
    assert len(web.sent) == sent and vs.counters["denied_egress"] == 2


def test_a_state_change_through_another_key_sends_the_next_packet_down_the_full_path():
    """web's FIN leaves with another TTL (another key), db's FIN makes it LAST_ACK: web's next ACK,
    whose key is cached as ESTABLISHED, must take the full path, which moves the flow to TIME_WAIT."""
    world = World(hosts=("A",))
    world.plug("A", "web")
    world.plug("A", "db")
    handshake(world)
    vs = world.switches["A"]
    vs.vm_frame("web", web_db(TCP_ACK))
    vs.vm_frame("web", tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_FIN | TCP_ACK, ttl=9))
    vs.vm_frame("db", db_web(TCP_FIN | TCP_ACK))
    vs.vm_frame("web", web_db(TCP_ACK))
    for vnic in ("web", "db"):
        (entry,) = vs.conntrack.table(vnic).entries()
        assert entry.state is FlowState.TIME_WAIT


def test_a_flow_created_under_a_stateless_decision_is_tracked_from_then_on():
    """Allowed by a stateless rule and cached; then the reverse direction opens a tracked flow on the
    same 5-tuple: from then on the full path refreshes that entry on every packet, so must the cache."""
    world = World(hosts=("A",))
    world.plug("A", "web")
    world.plug("A", "app")
    vs = world.switches["A"]
    world.set_list(SecurityList(id="web", rules=[SecurityRule(direction="egress", tracking="stateless"),
                                                 SecurityRule(direction="ingress")]))  # fmt: skip
    vs.vm_frame("web", web_app_udp())
    vs.vm_frame("web", web_app_udp())
    assert vs.vm_flows.hits == 1 and len(vs.conntrack.table("web")) == 0
    vs.vm_frame("app", app_web_udp())  # web's stateful ingress rule starts tracking app:9000 -> web:5555
    assert len(vs.conntrack.table("web")) == 1
    world.clock.now += 10
    vs.vm_frame("web", web_app_udp())  # now a reply of that flow: it refreshes the entry
    (entry,) = vs.conntrack.table("web").entries()
    assert entry.state is FlowState.UDP_REPLIED and entry.deadline == world.clock.now + 120


def test_anti_spoofing_holds_for_a_cached_flow():
    world = World(hosts=("A",))
    db = world.plug("A", "db")
    world.plug("A", "web")
    world.plug("A", "intruder")
    handshake(world)
    vs = world.switches["A"]
    frame = web_db(TCP_ACK | TCP_PSH, b"data")
    vs.vm_frame("web", frame)
    vs.vm_frame("web", frame)
    assert vs.vm_flows.hits >= 1 and len(db.sent) == 4
    vs.vm_frame("intruder", frame)  # the very bytes of the cached flow, from another VM's port
    forged_ip = tcp_frame(mac("web"), mac("db"), "10.0.1.99", ip("db"), 40000, 5432, TCP_ACK, 1, 1, b"data")
    vs.vm_frame("web", forged_ip)  # web's port and MAC, another source address
    forged_mac = bytearray(frame)
    forged_mac[6:12] = mac_to_bytes(mac("app"))
    vs.vm_frame("web", bytes(forged_mac))
    assert len(db.sent) == 4
    assert (vs.counters["dropped_spoofed_mac"], vs.counters["dropped_spoofed_ip"]) == (2, 1)


def test_malformed_frames_of_a_cached_flow_are_dropped_as_on_the_full_path():
    world = World(hosts=("A",))
    db = world.plug("A", "db")
    world.plug("A", "web")
    handshake(world)
    vs = world.switches["A"]
    good = web_db(TCP_ACK | TCP_PSH, b"x" * 8)
    vs.vm_frame("web", good)
    vs.vm_frame("web", good)
    assert vs.vm_flows.hits >= 1
    bad_checksum = bytearray(good)
    bad_checksum[24] ^= 0xFF
    too_long = bytearray(good)
    too_long[16:18] = (len(good)).to_bytes(2, "big")  # IP total length past the frame
    bad_offset = bytearray(good)
    bad_offset[46] = 0xF0  # TCP data offset 60 > segment
    for frame in (bad_checksum, too_long, good[:50]):
        vs.vm_frame("web", bytes(frame))
    fixed = IPv4.parse(bytes(bad_offset[14:]), verify_checksum=False)
    vs.vm_frame("web", bytes(bad_offset[:14]) + fixed.pack())
    assert vs.counters["malformed"] == 4 and len(db.sent) == 4
    vs.vm_frame("web", good)
    assert len(db.sent) == 5


def test_dual_ingress_stamping_is_unchanged_for_a_cached_flow():
    world = World()
    world.push(placement={"app": "C"})
    src, dst = world.plug("A", "web"), world.plug("B", "web", hold=True)
    world.plug("C", "app")
    c = world.switches["C"]
    world.push(placement={"app": "C"}, ingress={"web": ["A", "B"]})
    frames = [udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 1000, 80, b"%d" % n) for n in range(6)]
    world.set_list(SecurityList(id="web", rules=[SecurityRule(direction="ingress", protocol="udp")]))
    for frame in frames[:4]:
        c.vm_frame("app", frame)
    stamps = [(to, Vxlan.parse(data).seq) for sender, to, data in world.log if sender == "C"]
    assert stamps == [(HOSTS[h], n) for n in range(1, 5) for h in ("A", "B")]
    assert c.vm_flows.hits == 2  # the first frame creates app's flow, the second is tracked and cached
    a, b = world.switches["A"], world.switches["B"]
    marker = a.pause_marker("web").marker
    assert marker == {"C": 4}
    for frame in frames[4:]:
        c.vm_frame("app", frame)
    report = b.resume("web", marker)
    assert (report.delivered, report.duplicates_skipped) == (2, 4)
    assert [Udp.parse(IPv4.parse(f[14:]).payload).payload for f in src.sent[:4] + dst.sent] == [
        b"%d" % n for n in range(6)
    ]


def test_the_cache_is_bounded():
    world = World(flow_cache_size=4, hosts=("A",))
    app = world.plug("A", "app")
    world.plug("A", "web")
    vs = world.switches["A"]
    for _ in range(2):
        for port in range(10):
            vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 6000 + port, 9000, b"b"))
            vs.vm_frame("web", udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 6000 + port, 9000, b"b"))
            assert len(vs.vm_flows) <= 4
    assert len(app.sent) == 40 and vs.vm_flows.evictions >= 16
    stats = vs.snapshot_counters().switch
    assert stats["flowcache_vm_entries"] <= 4 and stats["flowcache_vm_evictions"] == vs.vm_flows.evictions
    with pytest.raises(ValueError):
        Vswitch("A", HOSTS["A"], flow_cache_size=-1)


def test_size_zero_turns_the_fast_path_off():
    world = World(flow_cache_size=0, hosts=("A",))
    world.plug("A", "web")
    db = world.plug("A", "db")
    handshake(world)
    for _ in range(3):
        world.switches["A"].vm_frame("web", web_db(TCP_ACK))
    assert len(db.sent) == 5 and world.hits() == 0 and len(world.switches["A"].vm_flows) == 0


# ---------------------------------------------------------------------------------------------
# the per-packet checks and keys


def _parses(frame: bytes) -> bool:
    try:
        flow_info(IPv4.parse(Ethernet.parse(frame).payload))
    except MalformedPacket:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["web_data", "web_udp", "web_ping", "web_syn", "db_rst"]),
    st.lists(st.tuples(st.integers(14, 50), st.integers(0, 255)), max_size=3),
    st.integers(0, 30),
)
@example("web_udp", [(38, 0), (39, 200)], 0)  # UDP length past the datagram
@example("web_data", [(46, 0xF0)], 0)  # TCP data offset past the segment
@example("web_data", [(17, 0xFF)], 0)  # IP total length past the frame (and a bad checksum)
@example("web_ping", [], 1)  # ICMP header cut short
def test_intact_agrees_with_the_parsers(name, flips, cut):
    """A frame the cache keys (IPv4, 20-byte header, not a fragment) passes :func:`intact` exactly
    when the full path's parsers accept it."""
    frame = bytearray(FRAMES[name][1])
    for index, value in flips:
        if index < len(frame):
            frame[index] = value
    data = bytes(frame[: max(MIN_FRAME, len(frame) - cut)])
    if frame_key("web", data) is None or not cacheable_ipv4(data, 14):
        return
    assert intact(data, 14, data[23]) == _parses(data)


def test_keys_leave_out_what_changes_from_packet_to_packet():
    one, two = web_db(TCP_ACK | TCP_PSH, b"a"), web_db(TCP_SYN, b"longer payload")
    changed = bytearray(one)
    changed[18:20] = b"\x12\x34"  # IP ident
    assert frame_key("web", one) == frame_key("web", two) == frame_key("web", _refresh_checksum(changed))
    assert frame_key("web", one) != frame_key("db", one)
    assert frame_key("web", one) != frame_key("web", web_db(TCP_ACK)[:6] + mac_to_bytes(mac("db")) + one[12:])
    ping = icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), ICMP_ECHO_REQUEST, 7, 1, b"p")
    assert frame_key("web", ping) == frame_key(
        "web", icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), ICMP_ECHO_REQUEST, 7, 99, b"other")
    )
    assert frame_key("web", ping) != frame_key(
        "web", icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), ICMP_ECHO_REQUEST, 8, 1, b"p")
    )
    addr = ("10.99.0.2", 4789)
    assert overlay_key(addr, Vxlan(100, one, 5).pack()) == overlay_key(addr, Vxlan(100, two, 9).pack())
    assert overlay_key(addr, Vxlan(100, one).pack()) != overlay_key(addr, Vxlan(200, one).pack())
    assert overlay_key(addr, Vxlan(100, one).pack()) != overlay_key(("10.99.0.3", 4789), Vxlan(100, one).pack())
    assert frame_key("web", one[: MIN_FRAME - 1]) is None


# ---------------------------------------------------------------------------------------------
# differential: random traffic and control-plane changes, with and without the cache


def _refresh_checksum(frame: bytearray) -> bytes:
    frame[24:26] = b"\x00\x00"
    frame[24:26] = internet_checksum(bytes(frame[14:34])).to_bytes(2, "big")
    return bytes(frame)


def _frames() -> dict[str, tuple[str, bytes]]:
    """name -> (sending VNIC, frame): the flows of the sample topology, both ways, and broken variants."""
    data = web_db(TCP_ACK | TCP_PSH, b"req")
    frames = {
        "web_syn": ("web", web_db(TCP_SYN)),
        "db_synack": ("db", db_web(TCP_SYN | TCP_ACK)),
        "web_ack": ("web", web_db(TCP_ACK)),
        "web_data": ("web", data),
        "db_data": ("db", db_web(TCP_ACK | TCP_PSH, b"resp")),
        "web_fin": ("web", web_db(TCP_FIN | TCP_ACK)),
        "db_fin": ("db", db_web(TCP_FIN | TCP_ACK)),
        "db_rst": ("db", db_web(TCP_RST)),
        "web_udp": ("web", web_app_udp()),
        "app_udp": ("app", app_web_udp()),
        "web_ping": ("web", icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), ICMP_ECHO_REQUEST, 7, 1)),
        "app_pong": ("app", icmp_echo_frame(mac("app"), GW_B, ip("app"), ip("web"), ICMP_ECHO_REPLY, 7, 1)),
        "app_ping": ("app", icmp_echo_frame(mac("app"), GW_B, ip("app"), ip("web"), ICMP_ECHO_REQUEST, 7, 2)),
        "web_pong": ("web", icmp_echo_frame(mac("web"), GW_A, ip("web"), ip("app"), ICMP_ECHO_REPLY, 7, 2)),
        "app_syn": ("app", tcp_frame(mac("app"), GW_B, ip("app"), ip("web"), 1000, 80, TCP_SYN)),
        "web_synack": ("web", tcp_frame(mac("web"), GW_A, ip("web"), ip("app"), 80, 1000, TCP_SYN | TCP_ACK)),
        "app_get": (
            "app",
            tcp_frame(mac("app"), GW_B, ip("app"), ip("web"), 1000, 80, TCP_ACK | TCP_PSH, 1, 1, b"get"),
        ),
        "web_page": (
            "web",
            tcp_frame(mac("web"), GW_A, ip("web"), ip("app"), 80, 1000, TCP_ACK | TCP_PSH, 1, 1, b"pg"),
        ),
        "app_ttl1": ("app", udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 9000, 5555, b"x", ttl=1)),
        "intruder_db": ("intruder", udp_frame(mac("intruder"), mac("db"), ip("intruder"), ip("db"), 1, 5432)),
        "web_fin_ttl9": (
            "web",
            tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_FIN | TCP_ACK, ttl=9),
        ),
        # broken, or foreign, with the key of a flow above
        "web_data_padded": ("web", data + b"\x00" * 6),  # Ethernet padding after the IP packet
        "web_data_cut": ("web", data[:45]),
        "intruder_web_data": ("intruder", data),
        "db_web_data": ("db", data),
    }
    bad = bytearray(data)
    bad[25] ^= 0x01
    frames["web_data_bad_checksum"] = ("web", bytes(bad))
    fragment = bytearray(web_app_udp())
    fragment[20] |= IP_FLAG_MF << 5
    frames["web_udp_fragment"] = ("web", _refresh_checksum(fragment))
    udp_len = bytearray(web_app_udp())
    udp_len[38:40] = (200).to_bytes(2, "big")
    frames["web_udp_bad_length"] = ("web", bytes(udp_len))
    spoofed = bytearray(db_web(TCP_ACK))
    spoofed[26:30] = ip_to_int("10.0.1.99").to_bytes(4, "big")
    frames["db_spoofed_ip"] = ("db", _refresh_checksum(spoofed))
    return frames


FRAMES = _frames()
NAMES = sorted(FRAMES)
LISTS = {
    "sample": sample_security_lists(),
    "stateless": [
        SecurityList(id="web", rules=[SecurityRule(direction="egress", tracking="stateless"),
                                      SecurityRule(direction="ingress", tracking="stateless", protocol="tcp")]),
        SecurityList(id="db", rules=[SecurityRule(direction="ingress", tracking="stateless", protocol="tcp",
                                                  dst_ports=PortRange(min=5432, max=5432)),
                                     SecurityRule(direction="egress", tracking="stateless")]),
        SecurityList(id="app", rules=[SecurityRule(direction="ingress", protocol="udp"),
                                      SecurityRule(direction="egress", tracking="stateless")]),
    ],
    "mixed": [  # stateless on one side, tracked on the other
        SecurityList(id="web", rules=[SecurityRule(direction="egress", tracking="stateless"),
                                      SecurityRule(direction="ingress", tracking="stateless")]),
        SecurityList(id="db", rules=[SecurityRule(direction="ingress", protocol="tcp")]),
    ],
    "closed": [SecurityList(id=name, rules=[]) for name in ("web", "db", "app")],
}  # fmt: skip
PLACEMENTS = [
    {},
    {"app": "B"},
    {"app": "C", "web": "B"},
    {"web": "B", "db": "C", "app": "C"},
]
# conversations that establish flows and keep them busy, so the cache has something to do
CONVERSATIONS = [
    ["web_syn", "db_synack", "web_ack"] + ["web_data", "db_data"] * 3,
    ["web_udp", "app_udp"] * 4,  # routed
    ["web_ping", "app_pong"] * 4,
    ["app_syn", "web_synack", "app_get"] + ["web_page", "app_get"] * 3,  # routed
    ["web_syn", "db_synack", "web_ack", "web_data", "web_data", "web_fin", "web_data", "db_fin", "web_ack"],
    ["web_syn", "db_synack", "web_ack", "web_data", "web_fin_ttl9", "db_fin", "web_ack", "web_ack"],
    ["web_ping", "app_pong", "web_ping", "web_ping", "app_ping", "web_pong", "web_ping"],  # one identifier both ways
    ["web_syn", "db_synack", "web_ack", "web_data", "web_data_bad_checksum", "web_data", "web_data_cut",
     "web_data_padded", "intruder_web_data", "db_web_data", "web_data", "db_spoofed_ip", "web_data"],
    ["web_udp", "app_udp", "web_udp", "web_udp_fragment", "web_udp", "web_udp_bad_length", "web_udp"],
]  # fmt: skip
# what a peer sends straight onto the overlay: flows the cache keeps, mixed with broken copies
INJECTIONS = [
    ["web_data"] * 3,
    ["web_data", "web_data", "web_data_bad_checksum", "web_data", "web_data_cut", "web_data_padded", "web_data"],
    ["web_udp", "web_udp", "web_udp_fragment", "web_udp", "web_udp_bad_length", "web_udp"],
    ["db_data", "db_data", "db_rst", "db_data"],
    ["app_pong", "app_pong", "app_ping", "app_pong"],
]

pace = st.sampled_from([0.0, 1.0, 7.0, 40.0])  # seconds between a conversation's frames
send = st.tuples(st.just("send"), st.sampled_from(NAMES), st.sampled_from("AABC"), st.integers(1, 4))
talk = st.tuples(st.just("talk"), st.integers(0, len(CONVERSATIONS) - 1), st.sampled_from("AAB"), pace)
op = st.one_of(
    talk,
    send,
    talk,
    send,
    st.tuples(st.just("tick"), st.sampled_from([1.0, 29.0, 31.0, 121.0, 500_000.0])),
    st.tuples(st.just("lists"), st.sampled_from(sorted(LISTS))),
    st.tuples(st.just("place"), st.integers(0, len(PLACEMENTS) - 1), st.booleans()),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("inject"), st.integers(0, len(INJECTIONS) - 1), st.sampled_from("BC"), st.sampled_from("AB"),
              st.sampled_from([0, 1, 2, 3])),
    st.tuples(st.just("pause"), st.sampled_from("AB")),
    st.tuples(st.just("resume"), st.sampled_from("AB")),
    st.tuples(st.just("move_flows"), st.sampled_from(VNICS[:3]), st.sampled_from("ABC"), st.sampled_from("ABC")),
)  # fmt: skip


def _run(world: World, ops: list[tuple[Any, ...]]) -> list[Any]:
    results: list[Any] = []
    marker: dict[str, int] = {}
    for step in ops:
        kind = step[0]
        if kind == "send":
            _, name, host, count = step
            vnic, frame = FRAMES[name]
            for _ in range(count):
                world.switches[host].vm_frame(vnic, frame)
        elif kind == "talk":
            _, conversation, host, seconds = step
            for name in CONVERSATIONS[conversation]:
                world.switches[host].vm_frame(*FRAMES[name])
                world.clock.now += seconds
        elif kind == "inject":  # straight onto the overlay, as a peer's vswitch would send it
            _, injection, sender, receiver, seq = step
            host, port = HOSTS[sender].split(":")
            for name in INJECTIONS[injection]:
                world.switches[receiver].overlay_datagram(Vxlan(100, FRAMES[name][1], seq).pack(), (host, int(port)))
                seq += 1 if seq else 0
        elif kind == "tick":
            world.clock.now += step[1]
        elif kind == "lists":
            for sl in LISTS[step[1]]:
                world.set_list(sl)
        elif kind == "place":
            _, index, dual = step
            world.push(placement=PLACEMENTS[index], ingress={"web": ["A", "B"]} if dual else None)
        elif kind == "sweep":
            results.append([vs.conntrack.sweep() for vs in world.switches.values()])
        elif kind == "pause":
            marker = world.switches[step[1]].pause_marker("web").marker
            results.append(marker)
        elif kind == "resume":
            results.append(world.switches[step[1]].resume("web", marker).model_dump())
        elif kind == "move_flows":
            _, vnic, source, dest = step
            _batch, envelope = world.switches[source].export_flows(vnic, 0)
            results.append(world.switches[dest].import_flows(vnic, envelope).model_dump())
    return results


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=4, max_size=40))
def test_the_cached_path_does_what_the_full_path_does(ops):
    worlds = [World(flow_cache_size=size) for size in (0, 16384)]
    for world in worlds:
        for host in "ABC":
            for vnic in VNICS:
                world.plug(host, vnic)
    results = [_run(world, ops) for world in worlds]
    assert results[0] == results[1]
    assert worlds[0].observed() == worlds[1].observed()


def test_the_differential_check_does_exercise_the_cache():
    """A fixed run of the scenario above: the cached world does take the fast path, both directions."""
    worlds = [World(flow_cache_size=size) for size in (0, 16384)]
    for world in worlds:
        for host in "ABC":
            for vnic in VNICS:
                world.plug(host, vnic)
    sends = [("talk", i, "A", 1.0) for i in range(len(CONVERSATIONS))]
    moves = [("place", 1, True)] + [("send", "web_udp", "A", 1), ("send", "app_udp", "B", 1)] * 3
    for world in worlds:
        _run(world, sends)
    cached = worlds[1].switches
    assert {IPPROTO_TCP, IPPROTO_UDP} <= {f.proto for f in cached["A"].vm_flows.flows.values()}
    for world in worlds:
        _run(world, moves)
    assert worlds[0].observed() == worlds[1].observed()
    assert worlds[0].hits() == 0
    assert cached["A"].vm_flows.hits > 10 and cached["A"].overlay_flows.hits > 0
