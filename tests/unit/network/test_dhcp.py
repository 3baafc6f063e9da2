"""DHCP answered from the mapping: the guest learns its VNIC's address, mask, gateway and MTU."""

from __future__ import annotations

import contextlib
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.network import dhcp
from livemig.network.model import derived_gateway_mac
from livemig.network.packets import Ethernet, IPv4, MalformedPacket, Udp, int_to_ip, ip_to_int, mac_to_bytes
from livemig.network.vswitch import Vswitch
from livemig.testing.fakevm import SAMPLE, dhcp_frame, sample_mapping, sample_security_lists
from livemig.wire.vswitch import Attachment

MAC, IP = SAMPLE["web"]


class FakePort:
    kind = "fake"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.counters: Counter[str] = Counter()

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self) -> None:
        pass


def test_answers():
    request = dhcp.parse(dhcp.request_payload(mac_to_bytes(MAC), dhcp.DISCOVER, xid=77))
    assert (request.xid, request.chaddr, request.message_type) == (77, mac_to_bytes(MAC), dhcp.DISCOVER)
    ip, mask, gw = ip_to_int(IP), ip_to_int("255.255.255.0"), ip_to_int("10.0.1.1")
    kind, yiaddr, options = dhcp.reply_fields(dhcp.answer(request, ip, mask, gw) or b"")
    assert (kind, int_to_ip(yiaddr)) == (dhcp.OFFER, IP)
    assert options[dhcp.OPT_ROUTER] == gw.to_bytes(4, "big") and options[dhcp.OPT_SUBNET_MASK] == mask.to_bytes(
        4, "big"
    )
    assert int.from_bytes(options[dhcp.OPT_MTU], "big") == 1450
    wrong = dhcp.parse(dhcp.request_payload(mac_to_bytes(MAC), dhcp.REQUEST, requested_ip=ip + 1))
    assert dhcp.reply_fields(dhcp.answer(wrong, ip, mask, gw) or b"")[:2] == (dhcp.NAK, 0)
    release = dhcp.parse(dhcp.request_payload(mac_to_bytes(MAC), dhcp.RELEASE))
    assert dhcp.answer(release, ip, mask, gw) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_parse_only_raises_malformed(data):
    good = dhcp.request_payload(mac_to_bytes(MAC), dhcp.REQUEST, requested_ip=5)
    for candidate in (data, good[:240] + data, good[: len(data) % len(good)]):
        with contextlib.suppress(MalformedPacket):
            dhcp.parse(candidate)


def test_the_vswitch_answers_a_guest_dhcp_client():
    vs = Vswitch("A", "127.0.0.1:1")
    vs.set_mapping(sample_mapping({"A": "127.0.0.1:1"}))
    for sl in sample_security_lists():
        vs.set_security_list(sl)
    port = FakePort()
    vs.plug(port, Attachment(vnic_id="web", kind="udp", switch_port=1, qemu_port=2))
    vs.vm_frame("web", dhcp_frame(MAC, dhcp.DISCOVER))
    vs.vm_frame("web", dhcp_frame(MAC, dhcp.REQUEST, requested_ip=IP))
    vs.vm_frame("web", dhcp_frame(MAC, dhcp.REQUEST, requested_ip="10.0.1.99"))
    vs.vm_frame("web", dhcp_frame(MAC, dhcp.DISCOVER, chaddr=SAMPLE["db"][0]))  # asking for someone else
    kinds = []
    for frame in port.sent:
        eth = Ethernet.parse(frame)
        assert eth.dst == mac_to_bytes(MAC) and eth.src == mac_to_bytes(derived_gateway_mac("blue-a"))
        ip = IPv4.parse(eth.payload)
        udp = Udp.parse(ip.payload)
        assert (int_to_ip(ip.src), udp.sport, udp.dport) == ("10.0.1.1", 67, 68)
        kinds.append(dhcp.reply_fields(udp.payload)[0])
    assert kinds == [dhcp.OFFER, dhcp.ACK, dhcp.NAK]
    assert vs.counters["dhcp_replies"] == 3 and vs.counters["dropped_spoofed_dhcp"] == 1
