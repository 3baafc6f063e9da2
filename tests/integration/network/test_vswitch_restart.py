"""A vswitch SIGKILLed and started again forwards for the VMs it served: with ``--state-dir`` it
restores its mapping, security lists and VNIC ports, binding the same UDP ports the VMs' sockets
are connected to. Without it (the control case) the restarted vswitch knows none of them."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from livemig.network.packets import TCP_SYN, Ethernet, IPv4, Tcp
from livemig.region.freeport import free_port, free_ports
from livemig.testing.fakevm import SAMPLE, FakeVm, sample_mapping, sample_security_lists, tcp_frame
from livemig.wire import vswitch as wire_vswitch

from .conftest import Switch, start_switch, wait_ready


def start(name: str, directory: Path, api_port: int, overlay_port: int, state: bool) -> Switch:
    extra = ("--state-dir", str(directory / f"state-{name}")) if state else ()
    switch = start_switch(name, directory, api_port, f"127.0.0.1:{overlay_port}", extra)
    wait_ready(switch)
    return switch


@pytest.mark.parametrize("state", [True, False], ids=["with-state-dir", "without"])
def test_a_restarted_vswitch_forwards_for_the_vms_it_served(tmp_path: Path, state: bool) -> None:
    api_a, api_b = free_ports(2)
    overlay_a, overlay_b = (free_port("127.0.0.1", socket.SOCK_DGRAM) for _ in range(2))
    a = start("A", tmp_path, api_a, overlay_a, state)
    b = start("B", tmp_path, api_b, overlay_b, state)
    try:
        hosts = {"A": a.overlay, "B": b.overlay}
        for switch in (a, b):
            for security_list in sample_security_lists():
                switch.client.put_security_list(security_list)
            switch.client.put_mapping(sample_mapping(hosts, 7, {"web": "A", "db": "B"}))
        plugged = a.client.attach("web")
        web = FakeVm(plugged, *SAMPLE["web"])
        db = FakeVm(b.client.attach("db"), *SAMPLE["db"])

        def reaches_db(sport: int) -> bool:
            web.send(tcp_frame(*SAMPLE["web"][:1], SAMPLE["db"][0], SAMPLE["web"][1], SAMPLE["db"][1], sport, 5432,
                               TCP_SYN))  # fmt: skip
            frames = db.recv_all(quiet=0.3)
            return any(Tcp.parse(IPv4.parse(Ethernet.parse(f).payload).payload).sport == sport for f in frames)

        assert reaches_db(40000), "over the overlay, A to B"
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        a = start("A", tmp_path, api_a, overlay_a, state)
        restored = {p.vnic_id: p for p in a.client.run(wire_vswitch.attachments())}
        if state:
            assert restored["web"].switch_port == plugged.switch_port, "the same port, bound again"
            assert reaches_db(40001), "frames from the VM's unchanged socket are forwarded again"
        else:
            assert restored == {}
            assert not reaches_db(40001), "without its state the restarted vswitch drops the VM's frames"
        web.close()
        db.close()
    finally:
        for switch in (a, b):
            switch.client.close()
            switch.proc.kill()
            switch.proc.wait(10)
