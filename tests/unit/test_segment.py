"""The reference L2 segment: hostd's NIC sockets say hello, so the hub floods every frame to a
port from the moment it exists, including a migration's destination that has sent nothing."""

import socket

import pytest

from livemig.errors import LivemigError
from livemig.host.segment import close_all, netdev, open_segment_sockets
from livemig.model import NicDevice, VmSpec
from livemig.testing.segment import SegmentHub


def spec(hub: str) -> VmSpec:
    return VmSpec(name="ref", memory_mib=256,
                  devices=[NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:02:10", backend="segment",
                                     segment=hub)])  # fmt: skip


def recv(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    return sock.recv(65536)


def test_every_port_hears_every_frame_but_its_own_from_its_first_hello():
    with SegmentHub() as hub:
        source = open_segment_sockets(spec(hub.address))
        destination = open_segment_sockets(spec(hub.address))  # says hello, sends nothing else
        assert netdev("nic0", source["nic0"]) == f"dgram,id=net_nic0,local.type=fd,local.str={source['nic0'].fileno()}"
        source["nic0"].send(b"frame-1")
        assert recv(destination["nic0"]) == b"frame-1"
        destination["nic0"].send(b"frame-2")
        assert recv(source["nic0"]) == b"frame-2"
        source["nic0"].settimeout(0.2)
        with pytest.raises(TimeoutError):
            source["nic0"].recv(65536)  # its own frame-1 never came back
        assert hub.counters["hellos"] == 2
        close_all(source)
        close_all(destination)


def test_a_segment_nic_is_named_by_its_hub_only():
    with pytest.raises(ValueError, match="a segment is named exactly when the backend is segment"):
        NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:02:10", backend="segment")
    with pytest.raises(ValueError, match="segment"):
        NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:02:10", backend="segment", segment="10.0.0.1:9")


def test_an_unreachable_hub_is_a_clear_error():
    with pytest.raises(LivemigError, match="cannot join its L2 segment"):
        open_segment_sockets(spec("127.0.0.1:99999"))
