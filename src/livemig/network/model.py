"""Typed records of the VCN dataplane: what the control plane pushes and what moves between hosts.

Why pydantic with cross-record checks in :class:`Mapping`: a mapping is pushed whole (the vswitch
replaces its view atomically), so every contradiction — a VNIC outside its subnet, a subnet outside
its VCN, a gateway that is not in its subnet, two VNICs with one IP — is refused at the door with a
message naming the record, instead of surfacing later as a silently dropped frame.

Security rules are *allow* rules, evaluated in order per direction; the first match decides whether
the flow is tracked (``stateful``: conntrack lets the return traffic through) or not
(``stateless``: the return traffic needs its own rule). No match means deny.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from livemig.model.vm import unicast_mac
from livemig.network.packets import VXLAN_UDP_PORT

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _network(value: str, what: str) -> str:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r} is not an IPv4 CIDR without host bits ({exc})") from None
    return str(net)


def _address(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IPv4 address") from None


def derived_gateway_mac(subnet_id: str) -> str:
    """A stable, locally administered MAC for a subnet's virtual gateway (same on every host)."""
    digest = hashlib.sha256(subnet_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


class Vcn(_Strict):
    """A virtual cloud network: one address space, one VXLAN network identifier."""

    id: str = Field(pattern=ID_PATTERN)
    cidr: str
    vni: int = Field(ge=1, le=(1 << 24) - 1, description="VXLAN network identifier (24 bits)")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        return _network(value, "VCN cidr")


class Subnet(_Strict):
    """A subnet of one VCN with its virtual gateway (the router between subnets)."""

    id: str = Field(pattern=ID_PATTERN)
    vcn: str
    cidr: str
    gateway: str
    gateway_mac: str | None = Field(default=None, description="default: derived from the subnet id")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        value = _network(value, "subnet cidr")
        if ipaddress.IPv4Network(value).prefixlen > 30:
            raise ValueError(f"subnet cidr {value} is smaller than a /30 (no room for a gateway and a VNIC)")
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway_ip(cls, value: str) -> str:
        return _address(value, "gateway")

    @field_validator("gateway_mac")
    @classmethod
    def _gateway_mac(cls, value: str | None) -> str | None:
        return None if value is None else unicast_mac(value)

    @model_validator(mode="after")
    def _gateway_inside(self) -> Subnet:
        net = ipaddress.IPv4Network(self.cidr)
        gw = ipaddress.IPv4Address(self.gateway)
        if gw not in net:
            raise ValueError(f"subnet {self.id!r}: gateway {gw} is outside {net}")
        if gw in (net.network_address, net.broadcast_address):
            raise ValueError(f"subnet {self.id!r}: gateway {gw} is the network or broadcast address of {net}")
        return self

    @property
    def mac(self) -> str:
        """The gateway's MAC (explicit or derived)."""
        return self.gateway_mac or derived_gateway_mac(self.id)


class Vnic(_Strict):
    """A virtual NIC: the port of one VM in one subnet, on one host."""

    id: str = Field(pattern=ID_PATTERN)
    mac: str
    ip: str
    subnet: str
    security_lists: list[str] = Field(default_factory=list)
    vm: str = Field(default="", description="owner VM (informational)")
    host: str = Field(description="the host whose vswitch the VM's frames enter")

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        return unicast_mac(value)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return _address(value, "VNIC ip")


class PortRange(_Strict):
    """An inclusive TCP/UDP port range."""

    min: int = Field(ge=1, le=65535)
    max: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.min > self.max:
            raise ValueError(f"port range {self.min}-{self.max} is reversed (min > max)")
        return self


class SecurityRule(_Strict):
    """One allow rule. ``cidr`` is the peer: the source for ingress, the destination for egress."""

    direction: Literal["ingress", "egress"]
    tracking: Literal["stateful", "stateless"] = "stateful"
    protocol: Literal["all", "tcp", "udp", "icmp"] = "all"
    cidr: str = "0.0.0.0/0"
    dst_ports: PortRange | None = None
    src_ports: PortRange | None = None
    icmp_type: int | None = Field(default=None, ge=0, le=255)
    icmp_code: int | None = Field(default=None, ge=0, le=255)
    description: str = ""

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        return _network(value, "rule cidr")

    @model_validator(mode="after")
    def _fields_fit_protocol(self) -> SecurityRule:
        if (self.dst_ports or self.src_ports) and self.protocol not in ("tcp", "udp"):
            raise ValueError(f"port ranges need protocol tcp or udp, not {self.protocol!r}")
        if (self.icmp_type is not None or self.icmp_code is not None) and self.protocol != "icmp":
            raise ValueError(f"icmp_type/icmp_code need protocol icmp, not {self.protocol!r}")
        if self.icmp_code is not None and self.icmp_type is None:
            raise ValueError("icmp_code needs an icmp_type")
        return self


class SecurityList(_Strict):
    """An ordered list of allow rules, attached to VNICs by id."""

    id: str = Field(pattern=ID_PATTERN)
    rules: list[SecurityRule] = Field(default_factory=list)


class OverlayHost(_Strict):
    """A host's vswitch as seen on the overlay: where its VXLAN packets go (``ip`` or ``ip:port``)."""

    name: str = Field(pattern=ID_PATTERN)
    overlay: str

    @field_validator("overlay")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        host, _, port = value.partition(":")
        host = _address(host, "overlay address")
        number = int(port) if port.isdigit() else (VXLAN_UDP_PORT if not port else -1)
        if not 1 <= number <= 65535:
            raise ValueError(f"overlay endpoint {value!r} is not ip[:port] with a port in 1..65535")
        return f"{host}:{number}"

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.overlay.partition(":")
        return host, int(port)


class Mapping(_Strict):
    """The whole desired topology a vswitch forwards by: hosts, VCNs, subnets, VNICs and where they live.

    ``ingress`` overrides where a VNIC's *ingress* is delivered: normally only ``vnic.host``; during
    a migration ``[source, destination]`` (dual ingress, see ``vswitch.py``). ``generation`` only
    grows: a vswitch refuses an older mapping so a delayed push cannot undo a newer one.
    """

    generation: int = Field(ge=0)
    hosts: list[OverlayHost] = Field(default_factory=list)
    vcns: list[Vcn] = Field(default_factory=list)
    subnets: list[Subnet] = Field(default_factory=list)
    vnics: list[Vnic] = Field(default_factory=list)
    ingress: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Mapping:
        _unique("host", [h.name for h in self.hosts])
        _unique("overlay endpoint", [h.overlay for h in self.hosts])
        _unique("VCN", [v.id for v in self.vcns])
        _unique("VNI", [str(v.vni) for v in self.vcns])
        _unique("subnet", [s.id for s in self.subnets])
        _unique("VNIC", [v.id for v in self.vnics])
        hosts = {h.name for h in self.hosts}
        vcns = {v.id: v for v in self.vcns}
        subnets = {s.id: s for s in self.subnets}
        for sub in self.subnets:
            vcn = vcns.get(sub.vcn)
            if vcn is None:
                raise ValueError(f"subnet {sub.id!r} names unknown VCN {sub.vcn!r}")
            if not ipaddress.IPv4Network(sub.cidr).subnet_of(ipaddress.IPv4Network(vcn.cidr)):
                raise ValueError(f"subnet {sub.id!r} ({sub.cidr}) is not inside VCN {vcn.id!r} ({vcn.cidr})")
        for i, a in enumerate(self.subnets):
            for b in self.subnets[i + 1 :]:
                if a.vcn == b.vcn and ipaddress.IPv4Network(a.cidr).overlaps(ipaddress.IPv4Network(b.cidr)):
                    raise ValueError(f"subnets {a.id!r} ({a.cidr}) and {b.id!r} ({b.cidr}) overlap in VCN {a.vcn!r}")
        ips: dict[tuple[str, str], str] = {}
        macs: dict[tuple[str, str], str] = {(s.vcn, s.mac): f"gateway of subnet {s.id!r}" for s in self.subnets}
        for vnic in self.vnics:
            home = subnets.get(vnic.subnet)
            if home is None:
                raise ValueError(f"VNIC {vnic.id!r} names unknown subnet {vnic.subnet!r}")
            net, ip = ipaddress.IPv4Network(home.cidr), ipaddress.IPv4Address(vnic.ip)
            if ip not in net:
                raise ValueError(f"VNIC {vnic.id!r} ip {ip} is outside its subnet {home.id!r} ({net})")
            if ip in (net.network_address, net.broadcast_address) or str(ip) == home.gateway:
                raise ValueError(f"VNIC {vnic.id!r} ip {ip} is the network, broadcast or gateway address of {net}")
            if vnic.host not in hosts:
                raise ValueError(f"VNIC {vnic.id!r} lives on unknown host {vnic.host!r}")
            if (owner := ips.setdefault((home.vcn, vnic.ip), vnic.id)) != vnic.id:
                raise ValueError(f"VNICs {owner!r} and {vnic.id!r} share ip {ip} in VCN {home.vcn!r}")
            if (owner := macs.setdefault((home.vcn, vnic.mac), f"VNIC {vnic.id!r}")) != f"VNIC {vnic.id!r}":
                raise ValueError(f"VNIC {vnic.id!r} reuses MAC {vnic.mac} of the {owner} in VCN {home.vcn!r}")
        vnic_ids = {v.id for v in self.vnics}
        for vnic_id, targets in self.ingress.items():
            if vnic_id not in vnic_ids:
                raise ValueError(f"ingress override for unknown VNIC {vnic_id!r}")
            if not 1 <= len(targets) <= 2 or len(set(targets)) != len(targets):
                raise ValueError(f"ingress of VNIC {vnic_id!r} must name 1 or 2 distinct hosts, got {targets}")
            if unknown := [t for t in targets if t not in hosts]:
                raise ValueError(f"ingress of VNIC {vnic_id!r} names unknown hosts {unknown}")
        return self

    def ingress_hosts(self, vnic: Vnic) -> list[str]:
        return self.ingress.get(vnic.id) or [vnic.host]


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} appears twice")
        seen.add(value)


# ---------------------------------------------------------------------------------------------
# flow state that moves between hosts


class FlowRecord(_Strict):
    """One conntrack entry, host-independent: the originating 5-tuple, its state, time left.

    ``expires_in`` is relative (seconds) because monotonic clocks differ between hosts.
    ``deleted`` marks a tombstone in a delta: the flow ended since the last export.
    """

    proto: int = Field(ge=0, le=255)
    src: str
    sport: int = Field(ge=0, le=65535)
    dst: str
    dport: int = Field(ge=0, le=65535)
    state: str
    expires_in: float = Field(ge=0)
    version: int = Field(ge=0)
    deleted: bool = False


class FlowBatch(_Strict):
    """A VNIC's flows as exported: everything (``full``) or what changed after ``since``."""

    vnic: str
    version: int = Field(ge=0, description="pass as ?since= to get the next delta")
    since: int = Field(ge=0)
    full: bool
    records: list[FlowRecord] = Field(default_factory=list)
