"""Wire codecs for the frames the vswitch touches: Ethernet II, ARP, IPv4, ICMP, TCP, UDP, VXLAN.

Why hand-written ``struct`` codecs: the dataplane parses every frame a guest sends, so the codecs
must be cheap, dependency-free and, above all, *total*: whatever bytes a guest (or a peer on the
overlay) throws at us, parsing either returns a record or raises :class:`MalformedPacket` — never
``struct.error``, ``IndexError`` or ``ValueError`` — so the vswitch can count the frame and keep
running. The unit tests fuzz every parser with hypothesis to hold that promise.

IPv4 addresses are plain ``int`` (fast to mask against a CIDR), MACs are 6 ``bytes``. Records are
mutable slotted dataclasses only because frozen ones cost several times more to build per
packet: treat them as values. Parsers keep the payload as a ``bytes`` slice and leave L4
checksums alone (a switch forwards, it does not judge payloads); the IPv4 header checksum is
verified because we rewrite that header when routing. The vswitch's fast path does not parse at
all (``flowcache.py``); :func:`routed_frame` and :func:`vxlan_header` are its writers.

VXLAN (RFC 7348) is 8 bytes: flags (``0x08``: VNI valid), 24 reserved bits, the 24-bit VNI, 8
reserved bits. livemig stores a 32-bit *ingress sequence number* in those 32 reserved bits (high
24 bits in bytes 1-3, low 8 bits in byte 7) while a VNIC migrates — see ``vswitch.py`` for why.
Ordinary traffic has them zero, so tshark (``udp.port == 4789``) decodes every packet as VXLAN.
"""

from __future__ import annotations

import array
import ipaddress
import struct
import sys
from dataclasses import dataclass, field

from livemig.errors import InvalidRequest

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
VXLAN_UDP_PORT = 4789  # IANA; the overlay's default outer destination port
VXLAN_FLAG_VNI = 0x08

ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

TCP_FIN = 0x001
TCP_SYN = 0x002
TCP_RST = 0x004
TCP_PSH = 0x008
TCP_ACK = 0x010
TCP_URG = 0x020
TCP_ECE = 0x040
TCP_CWR = 0x080
TCP_NS = 0x100

IP_FLAG_DF = 0x2
IP_FLAG_MF = 0x1

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBHII")
_ICMP = struct.Struct("!BBH4s")
_ECHO = struct.Struct("!HH")
_TCP = struct.Struct("!HHIIHHHH")
_UDP = struct.Struct("!HHHH")
_VXLAN = struct.Struct("!II")
_PSEUDO = struct.Struct("!IIBBH")


class MalformedPacket(InvalidRequest):
    """Bytes that do not decode as the protocol they claim to be (truncated, bad length, garbage)."""


# ---------------------------------------------------------------------------------------------
# address helpers


def mac_to_bytes(mac: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes (raises MalformedPacket on anything else)."""
    parts = mac.split(":")
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise MalformedPacket(f"MAC {mac!r} is not of the form 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise MalformedPacket(f"MAC {mac!r} has a non-hex octet") from None


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_to_int(ip: str) -> int:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        raise MalformedPacket(f"{ip!r} is not an IPv4 address") from None


def int_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


# ---------------------------------------------------------------------------------------------
# checksums

_LITTLE = sys.byteorder == "little"


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum (0 when ``data`` already contains a valid checksum)."""
    if len(data) % 2:
        data = data + b"\x00"
    total = sum(array.array("H", data))  # native order: the one's-complement sum is order-independent
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    return ((total & 0xFF) << 8 | total >> 8) if _LITTLE else total


def _l4_checksum(proto: int, src: int, dst: int, segment: bytes) -> int:
    pseudo = _PSEUDO.pack(src, dst, 0, proto, len(segment))
    return internet_checksum(pseudo + segment)


def l4_checksum_ok(proto: int, src: int, dst: int, segment: bytes) -> bool:
    """True if a TCP/UDP segment's checksum (over the IPv4 pseudo-header) is valid."""
    if proto == IPPROTO_UDP and len(segment) >= 8 and segment[6:8] == b"\x00\x00":
        return True  # UDP over IPv4: checksum 0 means "none computed"
    return _l4_checksum(proto, src, dst, segment) == 0


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise MalformedPacket(f"{what} truncated: {len(data)} bytes, need {size}")


# ---------------------------------------------------------------------------------------------
# L2


@dataclass(slots=True)
class Ethernet:
    """An Ethernet II frame (no 802.1Q: VLAN tags are not part of a VCN)."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Ethernet:
        _need(data, 14, "Ethernet header")
        dst, src, ethertype = _ETH.unpack_from(data)
        if ethertype < 0x0600:
            raise MalformedPacket(f"802.3 length field {ethertype} where an Ethernet II type belongs")
        return cls(dst, src, ethertype, bytes(data[14:]))

    def pack(self) -> bytes:
        return _ETH.pack(self.dst, self.src, self.ethertype) + self.payload


@dataclass(slots=True)
class Arp:
    """ARP for IPv4 over Ethernet (the only kind a VCN carries)."""

    op: int
    sha: bytes
    spa: int
    tha: bytes
    tpa: int

    @classmethod
    def parse(cls, data: bytes) -> Arp:
        _need(data, 28, "ARP packet")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
        if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
            raise MalformedPacket(f"ARP for htype={htype} ptype={ptype:#06x} hlen={hlen} plen={plen}")
        if op not in (ARP_REQUEST, ARP_REPLY):
            raise MalformedPacket(f"ARP opcode {op}")
        return cls(op, sha, int.from_bytes(spa, "big"), tha, int.from_bytes(tpa, "big"))

    def pack(self) -> bytes:
        return _ARP.pack(
            1,
            ETHERTYPE_IPV4,
            6,
            4,
            self.op,
            self.sha,
            self.spa.to_bytes(4, "big"),
            self.tha,
            self.tpa.to_bytes(4, "big"),
        )


# ---------------------------------------------------------------------------------------------
# L3


@dataclass(slots=True)
class IPv4:
    """An IPv4 packet; ``pack`` fills total length and header checksum."""

    src: int
    dst: int
    proto: int
    payload: bytes = b""
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    flags: int = IP_FLAG_DF
    frag_offset: int = 0
    options: bytes = b""

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & IP_FLAG_MF) or self.frag_offset != 0

    @classmethod
    def parse(cls, data: bytes, verify_checksum: bool = True) -> IPv4:
        _need(data, 20, "IPv4 header")
        vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(data)
        version, ihl = vihl >> 4, (vihl & 0xF) * 4
        if version != 4:
            raise MalformedPacket(f"IP version {version} in an IPv4 frame")
        if ihl < 20:
            raise MalformedPacket(f"IPv4 header length {ihl} < 20")
        if total < ihl or total > len(data):
            raise MalformedPacket(f"IPv4 total length {total} outside [{ihl}, {len(data)}]")
        if verify_checksum and internet_checksum(data[:ihl]) != 0:
            raise MalformedPacket("IPv4 header checksum mismatch")
        return cls(
            src,
            dst,
            proto,
            bytes(data[ihl:total]),
            ttl,
            tos,
            ident,
            frag >> 13,
            frag & 0x1FFF,
            bytes(data[20:ihl]),
        )

    def pack(self) -> bytes:
        if len(self.options) % 4 or len(self.options) > 40:
            raise MalformedPacket(f"IPv4 options of {len(self.options)} bytes (need a multiple of 4, <= 40)")
        ihl = 20 + len(self.options)
        header = bytearray(
            _IPV4.pack(
                0x40 | ihl // 4,
                self.tos,
                ihl + len(self.payload),
                self.ident,
                self.flags << 13 | self.frag_offset,
                self.ttl,
                self.proto,
                0,
                self.src,
                self.dst,
            )
            + self.options
        )
        header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
        return bytes(header) + self.payload


def decrement_ttl(packet: bytes) -> bytes | None:
    """The IPv4 ``packet`` with TTL one lower and a fresh header checksum; None if TTL would hit 0."""
    ihl = (packet[0] & 0xF) * 4
    if packet[8] <= 1:
        return None
    header = bytearray(packet[:ihl])
    header[8] -= 1
    header[10:12] = b"\x00\x00"
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[ihl:]


def routed_frame(head: bytes, frame: bytes) -> bytes:
    """``frame``'s IPv4 packet behind the Ethernet header ``head``, TTL one lower: what routing sends.

    For a frame already checked (IHL 5, valid header checksum, TTL above 1), so the checksum is
    updated incrementally (RFC 1624: the TTL/protocol word drops by 0x0100) instead of recomputed;
    the bytes equal ``head + decrement_ttl(packet)``. Ethernet padding after the packet is dropped.
    """
    total = frame[16] << 8 | frame[17]
    folded = (~(frame[24] << 8 | frame[25]) & 0xFFFF) + 0xFEFF
    folded = (folded & 0xFFFF) + (folded >> 16)
    return b"".join((head, frame[14:22], bytes((frame[22] - 1, frame[23])), (~folded & 0xFFFF).to_bytes(2, "big"),
                     frame[26 : 14 + total]))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# L4


@dataclass(slots=True)
class Icmp:
    """An ICMP message; ``rest`` is the 4-byte field after the checksum (id/seq for echo)."""

    type: int
    code: int = 0
    rest: bytes = b"\x00\x00\x00\x00"
    payload: bytes = b""

    @classmethod
    def echo(cls, type_: int, ident: int, seq: int, payload: bytes = b"") -> Icmp:
        return cls(type_, 0, _ECHO.pack(ident, seq), payload)

    @property
    def is_echo(self) -> bool:
        return self.type in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)

    @property
    def ident(self) -> int:
        return int(_ECHO.unpack(self.rest)[0])

    @property
    def seq(self) -> int:
        return int(_ECHO.unpack(self.rest)[1])

    @classmethod
    def parse(cls, data: bytes, verify_checksum: bool = False) -> Icmp:
        _need(data, 8, "ICMP header")
        type_, code, _csum, rest = _ICMP.unpack_from(data)
        if verify_checksum and internet_checksum(data) != 0:
            raise MalformedPacket("ICMP checksum mismatch")
        return cls(type_, code, rest, bytes(data[8:]))

    def pack(self) -> bytes:
        if len(self.rest) != 4:
            raise MalformedPacket(f"ICMP rest-of-header is {len(self.rest)} bytes, not 4")
        body = _ICMP.pack(self.type, self.code, 0, self.rest) + self.payload
        return body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]


@dataclass(slots=True)
class Tcp:
    """A TCP segment; ``flags`` holds the 9 flag bits (NS..FIN)."""

    sport: int
    dport: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 65535
    payload: bytes = b""
    options: bytes = b""
    urgent: int = 0
    checksum: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, data: bytes) -> Tcp:
        _need(data, 20, "TCP header")
        sport, dport, seq, ack, off_flags, window, csum, urgent = _TCP.unpack_from(data)
        offset = (off_flags >> 12) * 4
        if offset < 20 or offset > len(data):
            raise MalformedPacket(f"TCP data offset {offset} outside [20, {len(data)}]")
        return cls(
            sport,
            dport,
            seq,
            ack,
            off_flags & 0x1FF,
            window,
            bytes(data[offset:]),
            bytes(data[20:offset]),
            urgent,
            csum,
        )

    def pack(self, src: int, dst: int) -> bytes:
        """The segment with its checksum over the IPv4 pseudo-header ``src``/``dst``."""
        if len(self.options) % 4 or len(self.options) > 40:
            raise MalformedPacket(f"TCP options of {len(self.options)} bytes (need a multiple of 4, <= 40)")
        offset = (20 + len(self.options)) // 4
        segment = (
            _TCP.pack(
                self.sport,
                self.dport,
                self.seq,
                self.ack,
                offset << 12 | (self.flags & 0x1FF),
                self.window,
                0,
                self.urgent,
            )
            + self.options
            + self.payload
        )
        csum = _l4_checksum(IPPROTO_TCP, src, dst, segment)
        return segment[:16] + csum.to_bytes(2, "big") + segment[18:]


@dataclass(slots=True)
class Udp:
    """A UDP datagram; ``pack`` computes the checksum (0 is sent as 0xffff)."""

    sport: int
    dport: int
    payload: bytes = b""
    checksum: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, data: bytes) -> Udp:
        _need(data, 8, "UDP header")
        sport, dport, length, csum = _UDP.unpack_from(data)
        if length < 8 or length > len(data):
            raise MalformedPacket(f"UDP length {length} outside [8, {len(data)}]")
        return cls(sport, dport, bytes(data[8:length]), csum)

    def pack(self, src: int, dst: int) -> bytes:
        datagram = _UDP.pack(self.sport, self.dport, 8 + len(self.payload), 0) + self.payload
        csum = _l4_checksum(IPPROTO_UDP, src, dst, datagram) or 0xFFFF
        return datagram[:6] + csum.to_bytes(2, "big") + datagram[8:]


# ---------------------------------------------------------------------------------------------
# overlay


@dataclass(slots=True)
class Vxlan:
    """A VXLAN header plus the inner Ethernet frame; ``seq`` lives in the reserved bits (0 = none)."""

    vni: int
    payload: bytes = b""
    seq: int = 0

    @classmethod
    def parse(cls, data: bytes) -> Vxlan:
        _need(data, 8, "VXLAN header")
        word0, word1 = _VXLAN.unpack_from(data)
        if not (word0 >> 24) & VXLAN_FLAG_VNI:
            raise MalformedPacket(f"VXLAN flags {word0 >> 24:#04x} without the VNI bit (0x08)")
        return cls(word1 >> 8, bytes(data[8:]), (word0 & 0xFFFFFF) << 8 | (word1 & 0xFF))

    def pack(self) -> bytes:
        return vxlan_header(self.vni, self.seq) + self.payload


def vxlan_header(vni: int, seq: int = 0) -> bytes:
    """The 8-byte VXLAN header for ``vni`` carrying the ingress sequence ``seq`` (0: none)."""
    if not 0 <= vni < 1 << 24:
        raise MalformedPacket(f"VNI {vni} does not fit 24 bits")
    if not 0 <= seq < 1 << 32:
        raise MalformedPacket(f"sequence {seq} does not fit 32 bits")
    return _VXLAN.pack(VXLAN_FLAG_VNI << 24 | seq >> 8, vni << 8 | (seq & 0xFF))


def vxlan_seq(datagram: bytes) -> int:
    """The sequence number in a VXLAN header already known to be 8 bytes long."""
    return (datagram[1] << 16 | datagram[2] << 8 | datagram[3]) << 8 | datagram[7]


# ---------------------------------------------------------------------------------------------
# one frame, decoded as far as the dataplane needs


@dataclass(slots=True)
class FlowInfo:
    """What security lists and conntrack look at: the 5-tuple plus TCP flags / ICMP type.

    For ICMP echo ``sport`` and ``dport`` both carry the echo identifier, which is how conntrack
    pairs a reply with its request; for other ICMP and other protocols ports are 0.
    """

    proto: int
    src: int
    dst: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = -1
    icmp_code: int = -1


def flow_info(ip: IPv4) -> FlowInfo:
    """Decode the L4 header of a (non-fragmented) IPv4 packet into a :class:`FlowInfo`."""
    payload = ip.payload
    if ip.proto == IPPROTO_TCP:
        _need(payload, 20, "TCP header")
        sport, dport, _seq, _ack, off_flags = struct.unpack_from("!HHIIH", payload)
        if (off_flags >> 12) * 4 < 20 or (off_flags >> 12) * 4 > len(payload):
            raise MalformedPacket(f"TCP data offset {(off_flags >> 12) * 4} outside [20, {len(payload)}]")
        return FlowInfo(IPPROTO_TCP, ip.src, ip.dst, sport, dport, tcp_flags=off_flags & 0x1FF)
    if ip.proto == IPPROTO_UDP:
        udp = Udp.parse(payload)
        return FlowInfo(IPPROTO_UDP, ip.src, ip.dst, udp.sport, udp.dport)
    if ip.proto == IPPROTO_ICMP:
        icmp = Icmp.parse(payload)
        ident = icmp.ident if icmp.is_echo else 0
        return FlowInfo(IPPROTO_ICMP, ip.src, ip.dst, ident, ident, icmp_type=icmp.type, icmp_code=icmp.code)
    return FlowInfo(ip.proto, ip.src, ip.dst)
