"""Security lists compiled for the data path, and the one filter decision every frame goes through.

Why compile: a :class:`~livemig.network.model.SecurityList` is a validated, human-shaped record;
the dataplane wants integers (network, mask, port bounds) it can compare without parsing strings
per packet. :class:`RuleSet` is the concatenation of a VNIC's lists (in the VNIC's order), split
by direction.

:func:`decide` is the filter, conntrack first (like ``-m state ESTABLISHED`` at the top of an
iptables chain): a packet of a tracked flow passes in either direction whatever the rules say;
otherwise the first matching allow rule decides — a ``stateful`` one starts tracking the flow so
its return traffic passes, a ``stateless`` one does not (the return traffic needs its own rule);
no match denies. The filter runs on the VNIC's own host, for its egress and for its ingress.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from livemig.network.conntrack import ConntrackTable, Entry, TableFull
from livemig.network.model import SecurityList, SecurityRule
from livemig.network.packets import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, FlowInfo

_PROTOCOLS = {"all": -1, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP}


class Decision(StrEnum):
    TRACKED = "tracked"  # part of a flow conntrack knows
    NEW_STATEFUL = "new_stateful"  # allowed by a stateful rule; now tracked
    STATELESS = "stateless"  # allowed by a stateless rule; not tracked
    DENY = "deny"  # no rule allows it (default deny), or the flow table is full

    @property
    def allowed(self) -> bool:
        return self is not Decision.DENY


@dataclass(frozen=True, slots=True)
class CompiledRule:
    stateful: bool
    proto: int  # -1: all
    net: int
    mask: int
    dport_lo: int = 0
    dport_hi: int = 65535
    sport_lo: int = 0
    sport_hi: int = 65535
    icmp_type: int = -1
    icmp_code: int = -1

    @classmethod
    def of(cls, rule: SecurityRule) -> CompiledRule:
        net = ipaddress.IPv4Network(rule.cidr)
        dports = (rule.dst_ports.min, rule.dst_ports.max) if rule.dst_ports else (0, 65535)
        sports = (rule.src_ports.min, rule.src_ports.max) if rule.src_ports else (0, 65535)
        return cls(
            rule.tracking == "stateful",
            _PROTOCOLS[rule.protocol],
            int(net.network_address),
            int(net.netmask),
            *dports,
            *sports,
            -1 if rule.icmp_type is None else rule.icmp_type,
            -1 if rule.icmp_code is None else rule.icmp_code,
        )

    def matches(self, info: FlowInfo, peer: int) -> bool:
        if peer & self.mask != self.net:
            return False
        if self.proto == -1:
            return True
        if info.proto != self.proto:
            return False
        if self.proto == IPPROTO_ICMP:
            return (self.icmp_type in (-1, info.icmp_type)) and (self.icmp_code in (-1, info.icmp_code))
        return self.dport_lo <= info.dport <= self.dport_hi and self.sport_lo <= info.sport <= self.sport_hi


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A VNIC's rules, per direction, in evaluation order."""

    ingress: tuple[CompiledRule, ...] = ()
    egress: tuple[CompiledRule, ...] = ()

    @classmethod
    def of(cls, lists: Iterable[SecurityList]) -> RuleSet:
        ingress: list[CompiledRule] = []
        egress: list[CompiledRule] = []
        for sl in lists:
            for rule in sl.rules:
                (ingress if rule.direction == "ingress" else egress).append(CompiledRule.of(rule))
        return cls(tuple(ingress), tuple(egress))

    def match(self, info: FlowInfo, egress: bool) -> CompiledRule | None:
        """The first rule allowing this packet (the peer is the destination on egress, else the source)."""
        rules, peer = (self.egress, info.dst) if egress else (self.ingress, info.src)
        for rule in rules:
            if rule.matches(info, peer):
                return rule
        return None


DENY_ALL = RuleSet()


def decide(table: ConntrackTable, rules: RuleSet, info: FlowInfo, egress: bool) -> Decision:
    """Filter one packet leaving (``egress``) or entering a VNIC whose flows live in ``table``."""
    return evaluate(table, rules, info, egress)[0]


def evaluate(table: ConntrackTable, rules: RuleSet, info: FlowInfo, egress: bool) -> tuple[Decision, Entry | None]:
    """:func:`decide`, plus the conntrack entry a ``TRACKED`` packet advanced (what the flow cache keeps)."""
    entry = table.advance(info)
    if entry is not None:
        return Decision.TRACKED, entry
    rule = rules.match(info, egress)
    if rule is None:
        return Decision.DENY, None
    if not rule.stateful:
        return Decision.STATELESS, None
    try:
        created = table.create(info)
    except TableFull:
        return Decision.DENY, None
    return Decision.NEW_STATEFUL, created
