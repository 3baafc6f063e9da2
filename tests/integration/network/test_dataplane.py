"""Two-and-more vswitch processes on loopback with fake VMs: ARP, policy, overlay, fast path, robustness, REST."""

from __future__ import annotations

import socket

import pytest

from livemig.errors import InvalidRequest, NotFound
from livemig.network.model import SecurityList, SecurityRule, derived_gateway_mac
from livemig.network.packets import (
    ARP_REPLY,
    TCP_ACK,
    TCP_SYN,
    Arp,
    Ethernet,
    IPv4,
    Tcp,
    Vxlan,
    int_to_ip,
    mac_to_bytes,
    mac_to_str,
)
from livemig.testing.fakevm import SAMPLE, arp_request, tcp_frame, udp_frame, udp_payload

GW_A, GW_B = derived_gateway_mac("blue-a"), derived_gateway_mac("blue-b")


def mac(v: str) -> str:
    return SAMPLE[v][0]


def ip(v: str) -> str:
    return SAMPLE[v][1]


def test_qemu_would_get_a_usable_netdev(net):
    net.push()
    attachment = net.client("A").attach("web")
    net.attached.append(("A", "web"))
    netdev = attachment.netdev("n0")
    assert netdev.startswith("dgram,id=n0,local.type=inet,local.host=127.0.0.1,")
    assert f"local.port={attachment.qemu_port}" in netdev and f"remote.port={attachment.switch_port}" in netdev
    assert net.client("A").attach("web") == attachment  # idempotent


def test_only_qemu_can_send_frames_into_a_vnic(net):
    """A local process that finds a VNIC's switch port cannot inject frames as the VM: the
    vswitch's socket is connected to QEMU's address, so the kernel drops anyone else's datagrams."""
    net.push()
    web = net.attach("A", "web")
    attachment = net.client("A").attach("web")
    before = net.counters("A").get("arp_replies", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        intruder.sendto(arp_request(mac("web"), ip("web"), ip("db")), ("127.0.0.1", attachment.switch_port or 0))
    assert web.recv(0.3) is None and net.counters("A").get("arp_replies", 0) == before
    web.send(arp_request(mac("web"), ip("web"), ip("db")))  # the VM itself still gets its answer
    assert web.recv() is not None and net.counters("A")["arp_replies"] == before + 1


def test_arp_is_answered_and_tcp_is_filtered(net):
    net.push()
    web, db = net.attach("A", "web"), net.attach("A", "db")
    web.send(arp_request(mac("web"), ip("web"), ip("db")))
    reply = Arp.parse(Ethernet.parse(web.recv() or b"").payload)
    assert (reply.op, mac_to_str(reply.sha), int_to_ip(reply.spa)) == (ARP_REPLY, mac("db"), ip("db"))
    assert db.recv(0.1) is None  # the request was answered, not flooded

    web.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40000, 5432, TCP_SYN, seq=1))
    syn = db.recv()
    assert syn is not None and Tcp.parse(IPv4.parse(Ethernet.parse(syn).payload).payload).flags == TCP_SYN
    db.send(tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 5432, 40000, TCP_SYN | TCP_ACK, seq=9, ack=2))
    assert web.recv() is not None  # the reply passes: conntrack, not a rule
    web.send(tcp_frame(mac("web"), mac("db"), ip("web"), ip("db"), 40001, 22, TCP_SYN))
    db.send(tcp_frame(mac("db"), mac("web"), ip("db"), ip("web"), 6000, 80, TCP_SYN))  # db may not call out
    assert db.recv(0.2) is None and web.recv(0.2) is None
    counters = net.counters("A")
    assert counters["denied_ingress"] >= 1 and counters["denied_egress"] >= 1


def test_cross_host_traffic_rides_vxlan(net):
    net.push(placement={"app": "B"})
    web, app = net.attach("A", "web"), net.attach("B", "app")
    web.send(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, b"over the overlay"))
    frame = app.recv()
    assert frame is not None and udp_payload(frame) == b"over the overlay"
    assert mac_to_str(Ethernet.parse(frame).src) == GW_B
    app.send(udp_frame(mac("app"), GW_B, ip("app"), ip("web"), 9000, 5555, b"reply"))
    assert udp_payload(web.recv() or b"") == b"reply"
    assert net.counters("A")["overlay_tx"] >= 1 and net.counters("B")["overlay_rx"] >= 1


def test_overlay_packets_are_standard_vxlan(net):
    """A test socket plays host X: what A sends it must be RFC 7348 VXLAN; what it sends A is delivered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as x:
        x.bind(("127.0.0.1", 0))
        x.settimeout(2)
        hosts = {**net.hosts, "X": f"127.0.0.1:{x.getsockname()[1]}"}
        net.push(placement={"app": "X"}, hosts=hosts)
        web = net.attach("A", "web")
        web.send(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, b"to X"))
        data, sender = x.recvfrom(65536)
        assert f"{sender[0]}:{sender[1]}" == net.switches["A"].overlay
        assert data[0] == 0x08 and data[1:4] == b"\x00\x00\x00" and data[7] == 0
        vx = Vxlan.parse(data)
        assert vx.vni == 100 and udp_payload(vx.payload) == b"to X"
        reply = udp_frame(GW_A, mac("web"), ip("app"), ip("web"), 9000, 5555, b"from X")  # routed by X
        a_host, a_port = net.switches["A"].overlay.split(":")
        x.sendto(Vxlan(100, reply).pack(), (a_host, int(a_port)))
        assert udp_payload(web.recv() or b"") == b"from X"


def test_malformed_frames_are_counted_and_the_switch_keeps_forwarding(net):
    net.push(placement={"app": "B"})
    web, app = net.attach("A", "web"), net.attach("B", "app")
    before = net.counters("A").get("malformed", 0)
    head = mac_to_bytes(mac("app")) + mac_to_bytes(mac("web"))
    bad_checksum = bytearray(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 1, 9000)[14:])
    bad_checksum[10] ^= 0xFF
    garbage = [b"", b"\x01", b"\xff" * 13, head + b"\x08\x00\x45junk", head + b"\x08\x06" + b"\x00" * 10,
               head + b"\x08\x00" + bytes(bad_checksum), head + b"\x08\x00\x46" + b"\x00" * 19]  # fmt: skip
    for i in range(70):
        web.send(garbage[i % len(garbage)])
    a_host, a_port = net.switches["A"].overlay.split(":")
    b = net.switches["B"]
    # B is a member host: its garbage is parsed (and counted); a stranger's is dropped unread
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(b"\x08junk", (a_host, int(a_port)))
    web.send(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, b"still alive"))
    assert udp_payload(app.recv() or b"") == b"still alive"
    counters = net.counters("A")
    assert counters["malformed"] - before == 70
    assert counters["dropped_overlay_unknown_sender"] >= 1
    assert b.client.health().status == "ok"


def test_rest_surface_errors_metrics(net):
    net.push()
    client = net.client("A")
    with pytest.raises(NotFound, match="not in the mapping"):
        client.attach("nobody")
    net.attach("A", "web")
    envelope, version = client.export_flows("web", 0)
    assert envelope[:4] == b"LMFS" and version == 0, "a VNIC that saw no traffic has no flow changes yet"
    with pytest.raises(InvalidRequest, match="checksum mismatch"):
        client.import_flows("web", envelope[:-1] + bytes([envelope[-1] ^ 0xFF]))
    with pytest.raises(InvalidRequest, match="flows of VNIC 'web', not 'db'"):
        client.import_flows("db", envelope)
    metrics = client.metrics()
    assert "# TYPE livemig_vswitch_frames_total counter" in metrics
    assert 'livemig_vswitch_vnic_state{host="A",vnic="web",what="flows"} 0.0' in metrics
    assert client.counters().vnics["web"]["flows"] == 0


def test_established_flows_take_the_fast_path_and_a_list_change_reaches_them(net):
    net.push()
    web, app = net.attach("A", "web"), net.attach("A", "app")
    client = net.client("A")
    # stateless both ways: every frame is decided by the rules, none by conntrack
    client.put_security_list(SecurityList(id="web", rules=[SecurityRule(direction="egress", tracking="stateless")]))
    client.put_security_list(SecurityList(id="app", rules=[SecurityRule(direction="ingress", tracking="stateless")]))
    before = net.counters("A")
    for n in range(20):
        web.send(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, b"%d" % n))
    assert [udp_payload(f) for f in app.recv_all()] == [b"%d" % n for n in range(20)]
    after = net.counters("A")
    assert after["flowcache_vm_hits"] - before["flowcache_vm_hits"] == 19  # all but the first frame
    client.put_security_list(SecurityList(id="app", rules=[]))
    web.send(udp_frame(mac("web"), GW_A, ip("web"), ip("app"), 5555, 9000, b"after"))
    assert app.recv(0.3) is None
    assert net.counters("A")["denied_ingress"] == after.get("denied_ingress", 0) + 1
