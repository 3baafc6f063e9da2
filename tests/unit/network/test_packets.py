"""Codec round trips, checksums against known values, and fuzzing: only MalformedPacket ever escapes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.network.packets import (
    ARP_REQUEST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_NS,
    TCP_SYN,
    Arp,
    Ethernet,
    Icmp,
    IPv4,
    MalformedPacket,
    Tcp,
    Udp,
    Vxlan,
    decrement_ttl,
    flow_info,
    internet_checksum,
    ip_to_int,
    l4_checksum_ok,
    mac_to_bytes,
    mac_to_str,
    routed_frame,
    vxlan_header,
    vxlan_seq,
)

A = ip_to_int("10.0.1.5")
B = ip_to_int("10.0.2.7")
MAC_A = mac_to_bytes("52:54:00:00:00:0a")
MAC_B = mac_to_bytes("52:54:00:00:00:0b")


def test_internet_checksum_rfc1071_example():
    # RFC 1071 section 3 sample: 0001 f203 f4f5 f6f7 sums to ddf2, checksum 220d
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7220d")) == 0


def test_ipv4_header_matches_a_known_packet():
    # a classic example header (wikipedia "IPv4 header checksum"): checksum b861
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    ip = IPv4(ip_to_int("192.168.0.1"), ip_to_int("192.168.0.199"), IPPROTO_UDP, b"\x00" * 95, ttl=64)
    packed = ip.pack()
    assert packed[:20] == header[:10] + bytes.fromhex("b861") + header[12:]
    assert IPv4.parse(packed) == ip


def test_ethernet_arp_round_trip():
    arp = Arp(ARP_REQUEST, MAC_A, A, b"\x00" * 6, B)
    frame = Ethernet(b"\xff" * 6, MAC_A, ETHERTYPE_ARP, arp.pack()).pack()
    eth = Ethernet.parse(frame)
    assert eth.ethertype == ETHERTYPE_ARP and eth.src == MAC_A
    assert Arp.parse(eth.payload) == arp
    assert mac_to_str(MAC_A) == "52:54:00:00:00:0a"


def test_tcp_round_trip_with_pseudo_header_checksum():
    tcp = Tcp(40000, 80, seq=1000, ack=0, flags=TCP_SYN | TCP_NS, payload=b"hello", options=b"\x02\x04\x05\xb4")
    segment = tcp.pack(A, B)
    assert l4_checksum_ok(IPPROTO_TCP, A, B, segment)
    assert not l4_checksum_ok(IPPROTO_TCP, A, B + 1, segment)
    parsed = Tcp.parse(segment)
    assert parsed == tcp and parsed.flags & TCP_NS


def test_udp_and_icmp_round_trip():
    udp = Udp(5353, 53, b"query")
    datagram = udp.pack(A, B)
    assert Udp.parse(datagram) == udp and l4_checksum_ok(IPPROTO_UDP, A, B, datagram)
    echo = Icmp.echo(ICMP_ECHO_REQUEST, 0x1234, 7, b"ping")
    packed = echo.pack()
    assert internet_checksum(packed) == 0
    parsed = Icmp.parse(packed, verify_checksum=True)
    assert parsed == echo and parsed.ident == 0x1234 and parsed.seq == 7


def test_vxlan_header_layout_and_sequence_in_reserved_bits():
    inner = Ethernet(MAC_B, MAC_A, ETHERTYPE_IPV4, b"x" * 30).pack()
    plain = Vxlan(0xABCDEF, inner).pack()
    assert plain[:8] == bytes([0x08, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0])  # RFC 7348, reserved bits zero
    stamped = Vxlan(42, inner, seq=0x01020304).pack()
    assert stamped[:8] == bytes([0x08, 0x01, 0x02, 0x03, 0, 0, 42, 0x04])
    assert Vxlan.parse(stamped) == Vxlan(42, inner, 0x01020304)
    with pytest.raises(MalformedPacket, match="VNI bit"):
        Vxlan.parse(b"\x00" * 8 + inner)
    assert vxlan_header(42, 0x01020304) == stamped[:8] and vxlan_seq(stamped) == 0x01020304
    with pytest.raises(MalformedPacket, match="32 bits"):
        vxlan_header(42, 1 << 32)


def test_flow_info_and_ttl():
    tcp = Tcp(1234, 443, flags=TCP_SYN | TCP_ACK).pack(A, B)
    ip = IPv4(A, B, IPPROTO_TCP, tcp, ttl=2)
    info = flow_info(IPv4.parse(ip.pack()))
    assert (info.proto, info.src, info.dst, info.sport, info.dport, info.tcp_flags) == (6, A, B, 1234, 443, 0x12)
    once = decrement_ttl(ip.pack())
    assert once is not None and IPv4.parse(once).ttl == 1  # parse verifies the new checksum
    assert decrement_ttl(once) is None
    icmp = flow_info(IPv4(A, B, IPPROTO_ICMP, Icmp.echo(ICMP_ECHO_REQUEST, 9, 1).pack()))
    assert (icmp.sport, icmp.dport, icmp.icmp_type) == (9, 9, ICMP_ECHO_REQUEST)


@pytest.mark.parametrize(
    "parser, data, needle",
    [
        (Ethernet.parse, b"\x00" * 13, "truncated"),
        (Ethernet.parse, b"\x00" * 12 + b"\x00\x40", "802.3"),
        (Arp.parse, b"\x00" * 27, "truncated"),
        (IPv4.parse, b"\x45" + b"\x00" * 18, "truncated"),
        (IPv4.parse, b"\x65" + b"\x00" * 19, "version 6"),
        (IPv4.parse, b"\x44" + b"\x00" * 19, "header length 16"),
        (IPv4.parse, bytes.fromhex("450000ff") + b"\x00" * 16, "total length"),
        (IPv4.parse, bytes.fromhex("45000014000040004011ffff0a0000010a000002"), "checksum"),
        (Tcp.parse, struct.pack("!HHIIHHHH", 1, 2, 0, 0, 0x1000, 0, 0, 0), "data offset 4"),
        (Udp.parse, struct.pack("!HHHH", 1, 2, 99, 0), "UDP length 99"),
        (Icmp.parse, b"\x08\x00", "truncated"),
        (Vxlan.parse, b"\x08\x00", "truncated"),
    ],
)
def test_malformed_inputs_say_what_is_wrong(parser, data, needle):
    with pytest.raises(MalformedPacket, match=needle):
        parser(data)


def _decode_everything(data: bytes) -> None:
    """Every parser on ``data``; the full-stack decode as the vswitch does it."""
    for parser in (Ethernet.parse, Arp.parse, IPv4.parse, Icmp.parse, Tcp.parse, Udp.parse, Vxlan.parse):
        with contextlib.suppress(MalformedPacket):
            parser(data)
    try:
        eth = Ethernet.parse(Vxlan.parse(data).payload)
        flow_info(IPv4.parse(eth.payload))
    except MalformedPacket:
        pass
    with contextlib.suppress(MalformedPacket):
        flow_info(IPv4.parse(data, verify_checksum=False))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes_only_raise_malformed(data):
    _decode_everything(data)


def _valid_packets() -> list[bytes]:
    tcp = IPv4(A, B, IPPROTO_TCP, Tcp(1, 2, flags=TCP_SYN, options=b"\x01" * 4).pack(A, B)).pack()
    udp = IPv4(A, B, IPPROTO_UDP, Udp(1, 2, b"abc").pack(A, B)).pack()
    icmp = IPv4(A, B, IPPROTO_ICMP, Icmp.echo(8, 1, 1, b"p").pack()).pack()
    frames = [Ethernet(MAC_B, MAC_A, ETHERTYPE_IPV4, p).pack() for p in (tcp, udp, icmp)]
    return [Vxlan(7, f, seq=5).pack() for f in frames] + [tcp, udp, icmp]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_valid_packets()),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.integers(0, 200),
)
def test_fuzz_mutated_valid_packets_only_raise_malformed(packet, flips, cut):
    data = bytearray(packet)
    for index, value in flips:
        if index < len(data):
            data[index] = value
    _decode_everything(bytes(data[: len(data) - cut if cut < len(data) else len(data)]))


@settings(max_examples=400, deadline=None)
@given(
    st.integers(2, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.binary(min_size=0, max_size=40),
    st.binary(max_size=6),
    st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47]),
)
def test_routed_frame_is_decrement_ttl_behind_a_new_header(ttl, tos, ident, payload, padding, proto):
    """The incremental checksum update equals a full recompute, for every TTL and header (RFC 1624)."""
    packet = IPv4(A, B, proto, payload, ttl=ttl, tos=tos, ident=ident).pack()
    frame = Ethernet(MAC_B, MAC_A, ETHERTYPE_IPV4, packet).pack() + padding
    head = MAC_A + MAC_B + b"\x08\x00"
    once = decrement_ttl(packet)
    assert once is not None and routed_frame(head, frame) == head + once
