"""Topology validation: contradictions are refused with a message naming the record."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from livemig.network.model import Mapping, OverlayHost, PortRange, SecurityRule, Subnet, Vcn, Vnic, derived_gateway_mac
from livemig.testing.fakevm import sample_mapping
from livemig.wire.vswitch import Attachment

HOSTS = {"A": "127.0.0.1:4789", "B": "127.0.0.2"}


def _with(**changes):
    base = sample_mapping(HOSTS).model_dump()
    base.update(changes)
    return base


def test_sample_mapping_is_valid_and_overlay_port_defaults_to_4789():
    mapping = sample_mapping(HOSTS)
    assert [h.overlay for h in mapping.hosts] == ["127.0.0.1:4789", "127.0.0.2:4789"]
    assert mapping.ingress_hosts(mapping.vnics[0]) == ["A"]


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: Subnet(id="s", vcn="v", cidr="10.0.1.0/24", gateway="10.0.2.1"), "gateway 10.0.2.1 is outside"),
        (lambda: Subnet(id="s", vcn="v", cidr="10.0.1.0/24", gateway="10.0.1.0"), "network or broadcast"),
        (lambda: Subnet(id="s", vcn="v", cidr="10.0.1.5/24", gateway="10.0.1.1"), "without host bits"),
        (lambda: Subnet(id="s", vcn="v", cidr="10.0.1.0/31", gateway="10.0.1.1"), "smaller than a /30"),
        (lambda: Vcn(id="v", cidr="10.0.0.0/16", vni=1 << 24), "less than or equal"),
        (lambda: Vnic(id="n", mac="01:00:5e:00:00:01", ip="10.0.1.2", subnet="s", host="A"), "multicast"),
        (lambda: PortRange(min=443, max=80), "443-80 is reversed"),
        (
            lambda: SecurityRule(direction="ingress", protocol="icmp", dst_ports=PortRange(min=1, max=2)),
            "port ranges need protocol tcp or udp",
        ),
        (lambda: SecurityRule(direction="ingress", protocol="tcp", icmp_type=8), "icmp_type/icmp_code need"),
        (lambda: OverlayHost(name="A", overlay="127.0.0.1:99999"), "port in 1..65535"),
    ],
)
def test_records_reject_nonsense(build, needle):
    with pytest.raises(ValidationError, match=needle):
        build()


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"subnets": [{"id": "x", "vcn": "blue", "cidr": "10.9.0.0/24", "gateway": "10.9.0.1"}], "vnics": []},
         "subnet 'x' \\(10.9.0.0/24\\) is not inside VCN 'blue'"),
        ({"subnets": [{"id": "x", "vcn": "nope", "cidr": "10.0.1.0/24", "gateway": "10.0.1.1"}], "vnics": []},
         "unknown VCN 'nope'"),
        ({"vcns": [{"id": "a", "cidr": "10.0.0.0/16", "vni": 5}, {"id": "b", "cidr": "10.1.0.0/16", "vni": 5}],
          "subnets": [], "vnics": []}, "VNI '5' appears twice"),
    ],
)  # fmt: skip
def test_mapping_cross_checks(changes, needle):
    with pytest.raises(ValidationError, match=needle):
        Mapping.model_validate(_with(**changes))


def _vnic_change(index, **fields):
    base = sample_mapping(HOSTS).model_dump()
    base["vnics"][index].update(fields)
    return base


@pytest.mark.parametrize(
    "index, fields, needle",
    [
        (0, {"ip": "10.0.2.10"}, "VNIC 'web' ip 10.0.2.10 is outside its subnet 'blue-a'"),
        (0, {"ip": "10.0.1.1"}, "gateway address"),
        (1, {"ip": "10.0.1.10"}, "VNICs 'web' and 'db' share ip 10.0.1.10 in VCN 'blue'"),
        (1, {"mac": "52:54:00:00:01:0a"}, "reuses MAC"),
        (0, {"host": "Z"}, "unknown host 'Z'"),
        (0, {"subnet": "nope"}, "unknown subnet"),
    ],
)
def test_vnic_placement_is_checked(index, fields, needle):
    with pytest.raises(ValidationError, match=needle):
        Mapping.model_validate(_vnic_change(index, **fields))


def test_ingress_overrides_are_checked():
    with pytest.raises(ValidationError, match="1 or 2 distinct hosts"):
        Mapping.model_validate(_with(ingress={"web": ["A", "A"]}))
    with pytest.raises(ValidationError, match="unknown hosts"):
        Mapping.model_validate(_with(ingress={"web": ["A", "Q"]}))
    dual = Mapping.model_validate(_with(ingress={"web": ["A", "B"]}))
    assert dual.ingress_hosts(dual.vnics[0]) == ["A", "B"]


def test_gateway_mac_is_stable_and_locally_administered():
    mac = derived_gateway_mac("blue-a")
    assert mac == derived_gateway_mac("blue-a") != derived_gateway_mac("blue-b")
    assert int(mac[:2], 16) & 0b11 == 0b10


def test_attachment_gives_qemu_its_netdev():
    att = Attachment(vnic_id="web", kind="udp", switch_port=4000, qemu_port=4001)
    assert att.netdev("n0") == (
        "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=4001,"
        "remote.type=inet,remote.host=127.0.0.1,remote.port=4000"
    )
