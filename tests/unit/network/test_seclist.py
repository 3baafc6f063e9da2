"""Security-list decisions: default deny, stateful return traffic, stateless needs both directions."""

from __future__ import annotations

from livemig.network.conntrack import ConntrackTable
from livemig.network.model import PortRange, SecurityList, SecurityRule
from livemig.network.packets import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, FlowInfo, ip_to_int
from livemig.network.seclist import DENY_ALL, Decision, RuleSet, decide

VM = ip_to_int("10.0.1.10")
CLIENT = ip_to_int("192.168.5.5")
SERVER = ip_to_int("10.0.2.20")


def tcp(src: int, dst: int, sport: int, dport: int, flags: int) -> FlowInfo:
    return FlowInfo(IPPROTO_TCP, src, dst, sport, dport, tcp_flags=flags)


def rules(*rule: SecurityRule) -> RuleSet:
    return RuleSet.of([SecurityList(id="sl", rules=list(rule))])


def test_default_deny():
    table = ConntrackTable()
    assert decide(table, DENY_ALL, tcp(CLIENT, VM, 1, 80, TCP_SYN), egress=False) is Decision.DENY
    assert decide(table, DENY_ALL, tcp(VM, CLIENT, 80, 1, TCP_SYN | TCP_ACK), egress=True) is Decision.DENY
    assert len(table) == 0


def test_stateful_ingress_lets_the_reply_out_without_an_egress_rule():
    table = ConntrackTable()
    web = rules(SecurityRule(direction="ingress", protocol="tcp", dst_ports=PortRange(min=80, max=80)))
    assert decide(table, web, tcp(CLIENT, VM, 5555, 80, TCP_SYN), egress=False) is Decision.NEW_STATEFUL
    assert decide(table, web, tcp(VM, CLIENT, 80, 5555, TCP_SYN | TCP_ACK), egress=True) is Decision.TRACKED
    assert decide(table, web, tcp(CLIENT, VM, 5555, 80, TCP_ACK), egress=False) is Decision.TRACKED
    # other ports stay closed, and the VM still cannot open connections of its own
    assert decide(table, web, tcp(CLIENT, VM, 5555, 22, TCP_SYN), egress=False) is Decision.DENY
    assert decide(table, web, tcp(VM, CLIENT, 40000, 80, TCP_SYN), egress=True) is Decision.DENY


def test_stateless_needs_a_rule_for_each_direction():
    table = ConntrackTable()
    one_way = rules(SecurityRule(direction="egress", tracking="stateless", protocol="tcp",
                                 dst_ports=PortRange(min=443, max=443)))  # fmt: skip
    assert decide(table, one_way, tcp(VM, SERVER, 40000, 443, TCP_SYN), egress=True) is Decision.STATELESS
    assert len(table) == 0
    assert decide(table, one_way, tcp(SERVER, VM, 443, 40000, TCP_SYN | TCP_ACK), egress=False) is Decision.DENY
    both = rules(
        SecurityRule(direction="egress", tracking="stateless", protocol="tcp", dst_ports=PortRange(min=443, max=443)),
        SecurityRule(direction="ingress", tracking="stateless", protocol="tcp", src_ports=PortRange(min=443, max=443)),
    )
    assert decide(table, both, tcp(SERVER, VM, 443, 40000, TCP_SYN | TCP_ACK), egress=False) is Decision.STATELESS
    assert len(table) == 0


def test_first_match_decides_tracking_and_cidr_protocol_icmp_filters():
    table = ConntrackTable()
    mixed = rules(
        SecurityRule(direction="ingress", tracking="stateless", protocol="udp", cidr="192.168.0.0/16"),
        SecurityRule(direction="ingress", protocol="udp"),
        SecurityRule(direction="ingress", protocol="icmp", icmp_type=8, icmp_code=0),
    )
    assert decide(table, mixed, FlowInfo(IPPROTO_UDP, CLIENT, VM, 1, 2), egress=False) is Decision.STATELESS
    assert decide(table, mixed, FlowInfo(IPPROTO_UDP, SERVER, VM, 1, 2), egress=False) is Decision.NEW_STATEFUL
    ping = FlowInfo(IPPROTO_ICMP, CLIENT, VM, 3, 3, icmp_type=8, icmp_code=0)
    unreachable = FlowInfo(IPPROTO_ICMP, CLIENT, VM, 0, 0, icmp_type=3, icmp_code=1)
    assert decide(table, mixed, ping, egress=False) is Decision.NEW_STATEFUL
    assert decide(table, mixed, unreachable, egress=False) is Decision.DENY
    pong = FlowInfo(IPPROTO_ICMP, VM, CLIENT, 3, 3, icmp_type=0, icmp_code=0)
    assert decide(table, mixed, pong, egress=True) is Decision.TRACKED
    assert decide(table, mixed, FlowInfo(47, CLIENT, VM), egress=False) is Decision.DENY  # GRE: no rule


def test_rules_of_several_lists_keep_their_order():
    first = SecurityList(id="a", rules=[SecurityRule(direction="ingress", tracking="stateless", protocol="tcp")])
    second = SecurityList(id="b", rules=[SecurityRule(direction="ingress", protocol="tcp")])
    table = ConntrackTable()
    assert decide(table, RuleSet.of([first, second]), tcp(CLIENT, VM, 1, 2, TCP_SYN), False) is Decision.STATELESS
    assert decide(table, RuleSet.of([second, first]), tcp(CLIENT, VM, 1, 2, TCP_SYN), False) is Decision.NEW_STATEFUL
