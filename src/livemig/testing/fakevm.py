"""A stand-in for a QEMU NIC: a UDP socket speaking Ethernet frames, plus frame builders.

Why in the package (not under tests/): integration tests, the benchmark and, later, the migration
tests all need "a VM" on a vswitch port without booting one. :class:`FakeVm` binds the port QEMU
would bind (``Attachment.qemu_port``) and sends to the vswitch's (``switch_port``), exactly like
``-netdev dgram``; the builders make the frames a guest kernel would send.
"""

from __future__ import annotations

import socket
import time

from livemig.network import dhcp
from livemig.network.model import Mapping, OverlayHost, PortRange, SecurityList, SecurityRule, Subnet, Vcn, Vnic
from livemig.network.packets import (
    ARP_REQUEST,
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ZERO_MAC,
    Arp,
    Ethernet,
    Icmp,
    IPv4,
    MalformedPacket,
    Tcp,
    Udp,
    ip_to_int,
    mac_to_bytes,
)
from livemig.wire.vswitch import Attachment


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    arp = Arp(ARP_REQUEST, mac_to_bytes(src_mac), ip_to_int(src_ip), ZERO_MAC, ip_to_int(target_ip))
    return Ethernet(BROADCAST_MAC, mac_to_bytes(src_mac), ETHERTYPE_ARP, arp.pack()).pack()


def ipv4_frame(src_mac: str, dst_mac: str, ip: IPv4) -> bytes:
    return Ethernet(mac_to_bytes(dst_mac), mac_to_bytes(src_mac), ETHERTYPE_IPV4, ip.pack()).pack()


def tcp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, flags: int,
              seq: int = 0, ack: int = 0, payload: bytes = b"", ttl: int = 64) -> bytes:  # fmt: skip
    s, d = ip_to_int(src_ip), ip_to_int(dst_ip)
    segment = Tcp(sport, dport, seq, ack, flags, payload=payload).pack(s, d)
    return ipv4_frame(src_mac, dst_mac, IPv4(s, d, IPPROTO_TCP, segment, ttl=ttl))


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
              payload: bytes = b"", ttl: int = 64) -> bytes:  # fmt: skip
    s, d = ip_to_int(src_ip), ip_to_int(dst_ip)
    return ipv4_frame(src_mac, dst_mac, IPv4(s, d, IPPROTO_UDP, Udp(sport, dport, payload).pack(s, d), ttl=ttl))


def icmp_echo_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, type_: int, ident: int, seq: int,
                    payload: bytes = b"") -> bytes:  # fmt: skip
    icmp = Icmp.echo(type_, ident, seq, payload).pack()
    return ipv4_frame(src_mac, dst_mac, IPv4(ip_to_int(src_ip), ip_to_int(dst_ip), IPPROTO_ICMP, icmp))


def udp_payload(frame: bytes) -> bytes | None:
    """The UDP payload of an Ethernet/IPv4/UDP frame, or None for anything else."""
    try:
        eth = Ethernet.parse(frame)
        if eth.ethertype != ETHERTYPE_IPV4:
            return None
        ip = IPv4.parse(eth.payload)
        return Udp.parse(ip.payload).payload if ip.proto == IPPROTO_UDP else None
    except MalformedPacket:
        return None


class FakeVm:
    """One VM NIC on a vswitch port (blocking socket; use from tests, threads or a benchmark)."""

    def __init__(self, attachment: Attachment, mac: str, ip: str) -> None:
        if attachment.qemu_port is None or attachment.switch_port is None:
            raise ValueError(f"attachment {attachment} is not a UDP port")
        self.mac = mac
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", attachment.qemu_port))
        self.switch = ("127.0.0.1", attachment.switch_port)

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.switch)

    def recv(self, timeout: float = 1.0) -> bytes | None:
        """The next frame, or None after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, _addr = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        return data

    def recv_all(self, quiet: float = 0.2, limit: float = 5.0) -> list[bytes]:
        """Frames until none arrives for ``quiet`` seconds (or ``limit`` seconds pass)."""
        frames: list[bytes] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            frame = self.recv(quiet)
            if frame is None:
                break
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FakeVm:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# a small sample topology shared by tests and the benchmark


def sample_mapping(hosts: dict[str, str], generation: int = 1, placement: dict[str, str] | None = None,
                   ingress: dict[str, list[str]] | None = None) -> Mapping:  # fmt: skip
    """Two VCNs with *overlapping* address space (isolation must come from the VNI, not the IPs).

    blue (VNI 100, 10.0.0.0/16): subnet blue-a 10.0.1.0/24 (web .10, db .11), blue-b 10.0.2.0/24 (app .20)
    red  (VNI 200, 10.0.0.0/16): subnet red-a 10.0.1.0/24 (intruder .10: the same IP as web)
    ``placement`` maps VNIC id -> host (default: everything on the first host).
    """
    first = next(iter(hosts))
    where = {"web": first, "db": first, "app": first, "intruder": first, **(placement or {})}
    return Mapping(
        generation=generation,
        hosts=[OverlayHost(name=n, overlay=e) for n, e in hosts.items()],
        vcns=[Vcn(id="blue", cidr="10.0.0.0/16", vni=100), Vcn(id="red", cidr="10.0.0.0/16", vni=200)],
        subnets=[
            Subnet(id="blue-a", vcn="blue", cidr="10.0.1.0/24", gateway="10.0.1.1"),
            Subnet(id="blue-b", vcn="blue", cidr="10.0.2.0/24", gateway="10.0.2.1"),
            Subnet(id="red-a", vcn="red", cidr="10.0.1.0/24", gateway="10.0.1.1"),
        ],
        vnics=[
            Vnic(id="web", mac=SAMPLE["web"][0], ip=SAMPLE["web"][1], subnet="blue-a", security_lists=["web"],
                 vm="web-vm", host=where["web"]),
            Vnic(id="db", mac=SAMPLE["db"][0], ip=SAMPLE["db"][1], subnet="blue-a", security_lists=["db"],
                 vm="db-vm", host=where["db"]),
            Vnic(id="app", mac=SAMPLE["app"][0], ip=SAMPLE["app"][1], subnet="blue-b", security_lists=["app"],
                 vm="app-vm", host=where["app"]),
            Vnic(id="intruder", mac=SAMPLE["intruder"][0], ip=SAMPLE["intruder"][1], subnet="red-a",
                 security_lists=["open"], vm="red-vm", host=where["intruder"]),
        ],
        ingress=ingress or {},
    )  # fmt: skip


SAMPLE: dict[str, tuple[str, str]] = {  # VNIC id -> (mac, ip)
    "web": ("52:54:00:00:01:0a", "10.0.1.10"),
    "db": ("52:54:00:00:01:0b", "10.0.1.11"),
    "app": ("52:54:00:00:02:14", "10.0.2.20"),
    "intruder": ("52:54:00:00:09:0a", "10.0.1.10"),
}


def sample_security_lists() -> list[SecurityList]:
    """web: serves TCP 80 (stateful) and may call anything in blue; db: TCP 5432 from blue-a only, never
    calls out; app: UDP 9000 in (stateful), calls out statefully; open: everything, both ways."""
    return [
        SecurityList(id="web", rules=[
            SecurityRule(direction="ingress", protocol="tcp", dst_ports=PortRange(min=80, max=80)),
            SecurityRule(direction="ingress", protocol="icmp", icmp_type=8),
            SecurityRule(direction="egress", cidr="10.0.0.0/16"),
        ]),
        SecurityList(id="db", rules=[
            SecurityRule(direction="ingress", protocol="tcp", cidr="10.0.1.0/24",
                         dst_ports=PortRange(min=5432, max=5432)),
        ]),
        SecurityList(id="app", rules=[
            SecurityRule(direction="ingress", protocol="udp", dst_ports=PortRange(min=9000, max=9000)),
            SecurityRule(direction="egress"),
        ]),
        SecurityList(id="open", rules=[SecurityRule(direction="ingress"), SecurityRule(direction="egress")]),
    ]  # fmt: skip


def dhcp_frame(src_mac: str, message_type: int, requested_ip: str | None = None, chaddr: str | None = None) -> bytes:
    """A guest's DHCP DISCOVER/REQUEST, broadcast from 0.0.0.0 like udhcpc sends it."""
    payload = dhcp.request_payload(mac_to_bytes(chaddr or src_mac), message_type,
                                   requested_ip=ip_to_int(requested_ip) if requested_ip else 0)  # fmt: skip
    udp = Udp(dhcp.DHCP_CLIENT_PORT, dhcp.DHCP_SERVER_PORT, payload).pack(0, 0xFFFFFFFF)
    return ipv4_frame(src_mac, "ff:ff:ff:ff:ff:ff", IPv4(0, 0xFFFFFFFF, IPPROTO_UDP, udp))
