"""DHCP answered from the mapping: a guest gets its VNIC's address without any static configuration.

Why in the vswitch: like ARP, the answer is already known — the mapping says which IP a VNIC has,
its subnet's prefix and gateway — so the switch answers on the spot (no DHCP server process, no
leases to lose, nothing to migrate: the same answer on every host). A guest's ``udhcpc``/dhclient
sends DISCOVER/REQUEST from 0.0.0.0; the vswitch replies OFFER/ACK from the subnet's gateway with:
the VNIC's IP, subnet mask, router (the gateway), a lease time, and interface MTU 1450 (VXLAN adds
50 bytes to every frame crossing hosts; 1450 keeps the outer packet within a 1500-byte underlay).

Only RFC 2131 basics: DISCOVER → OFFER, REQUEST → ACK (NAK if the guest asks for another address),
INFORM → ACK without an address; RELEASE and DECLINE need no answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from livemig.network.packets import MalformedPacket

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
LEASE_SECONDS = 86400
GUEST_MTU = 1450
MAGIC_COOKIE = b"\x63\x82\x53\x63"

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK, OPT_ROUTER, OPT_MTU = 1, 3, 26
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 53, 54

_BOOTP = struct.Struct("!BBBBIHHIIII16s64s128s")  # 236 bytes


@dataclass(slots=True)
class DhcpRequest:
    xid: int
    flags: int
    ciaddr: int
    chaddr: bytes
    message_type: int
    requested_ip: int


def parse(payload: bytes) -> DhcpRequest:
    """A client's BOOTREQUEST (raises MalformedPacket for anything else)."""
    if len(payload) < _BOOTP.size + 4:
        raise MalformedPacket(f"DHCP message truncated: {len(payload)} bytes")
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _sname, _file = _BOOTP.unpack_from(
        payload
    )
    if op != 1 or htype != 1 or hlen != 6:
        raise MalformedPacket(f"not an Ethernet BOOTREQUEST (op={op} htype={htype} hlen={hlen})")
    if payload[_BOOTP.size : _BOOTP.size + 4] != MAGIC_COOKIE:
        raise MalformedPacket("DHCP magic cookie missing")
    options: dict[int, bytes] = {}
    i = _BOOTP.size + 4
    while i < len(payload):
        code = payload[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(payload) or i + 2 + payload[i + 1] > len(payload):
            raise MalformedPacket(f"DHCP option {code} runs past the end")
        options[code] = payload[i + 2 : i + 2 + payload[i + 1]]
        i += 2 + payload[i + 1]
    kind = options.get(OPT_MESSAGE_TYPE, b"")
    if len(kind) != 1:
        raise MalformedPacket("DHCP message without a message type")
    requested = options.get(OPT_REQUESTED_IP, b"")
    return DhcpRequest(xid, flags, ciaddr, chaddr[:6], kind[0], int.from_bytes(requested) if len(requested) == 4 else 0)


def _option(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def answer(request: DhcpRequest, ip: int, mask: int, gateway: int) -> bytes | None:
    """The BOOTREPLY payload for ``request`` from a VNIC whose address is ``ip``; None: no reply."""
    if request.message_type == DISCOVER:
        kind, yiaddr = OFFER, ip
    elif request.message_type == REQUEST:
        wanted = request.requested_ip or request.ciaddr
        kind, yiaddr = (ACK, ip) if wanted in (0, ip) else (NAK, 0)
    elif request.message_type == INFORM:
        kind, yiaddr = ACK, 0
    else:
        return None
    header = _BOOTP.pack(2, 1, 6, 0, request.xid, 0, request.flags, request.ciaddr, yiaddr, 0, 0,
                         request.chaddr.ljust(16, b"\x00"), b"", b"")  # fmt: skip
    options = _option(OPT_MESSAGE_TYPE, bytes((kind,))) + _option(OPT_SERVER_ID, gateway.to_bytes(4, "big"))
    if kind != NAK:
        options += (
            _option(OPT_SUBNET_MASK, mask.to_bytes(4, "big"))
            + _option(OPT_ROUTER, gateway.to_bytes(4, "big"))
            + _option(OPT_MTU, GUEST_MTU.to_bytes(2, "big"))
        )
        if kind != ACK or yiaddr:
            options += _option(OPT_LEASE_TIME, LEASE_SECONDS.to_bytes(4, "big"))
    return header + MAGIC_COOKIE + options + bytes((OPT_END,))


def request_payload(chaddr: bytes, message_type: int, xid: int = 0x1234, requested_ip: int = 0) -> bytes:
    """A client's DISCOVER/REQUEST (for tests and the fake VM)."""
    header = _BOOTP.pack(1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0, chaddr.ljust(16, b"\x00"), b"", b"")
    options = _option(OPT_MESSAGE_TYPE, bytes((message_type,)))
    if requested_ip:
        options += _option(OPT_REQUESTED_IP, requested_ip.to_bytes(4, "big"))
    return header + MAGIC_COOKIE + options + bytes((OPT_END,))


def reply_fields(payload: bytes) -> tuple[int, int, dict[int, bytes]]:
    """(message type, yiaddr, options) of a BOOTREPLY — what a client reads (tests use it)."""
    if len(payload) < _BOOTP.size + 4 or payload[0] != 2:
        raise MalformedPacket("not a BOOTREPLY")
    yiaddr = int.from_bytes(payload[16:20])
    options: dict[int, bytes] = {}
    i = _BOOTP.size + 4
    while i + 1 < len(payload) and payload[i] != OPT_END:
        options[payload[i]] = payload[i + 2 : i + 2 + payload[i + 1]]
        i += 2 + payload[i + 1]
    return options.get(OPT_MESSAGE_TYPE, b"\x00")[0], yiaddr, options
