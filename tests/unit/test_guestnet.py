"""``livemig vm ssh``: the ssh line it runs, from the VM's VNIC and its subnet's gateway namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livemig.cli import guestnet
from livemig.errors import Conflict, InvalidRequest
from livemig.model import NicDevice, VmSpec
from livemig.wire.lmo import NetKind


class StubLmo:
    """What ssh_argv asks the LMO: the VM's spec and the VNICs."""

    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec

    def vm(self, name: str) -> Any:
        return type("View", (), {"spec": self.spec})()

    def run(self, call: Any) -> list[dict[str, Any]]:
        assert call.path == f"/network/{NetKind.VNICS.value}"
        return [{"id": "web", "ip": "10.0.7.10", "subnet": "own-a", "mac": "52:54:00:07:00:10"}]


def vm(nic: bool = True) -> VmSpec:
    devices = [NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:07:00:10", backend="vswitch", vnic="web")]
    return VmSpec(name="web", memory_mib=256, devices=devices if nic else [])


def test_ssh_runs_in_the_subnets_gateway_namespace(monkeypatch):
    monkeypatch.setattr("livemig.region.netplumb.netns_exists", lambda name: name == "lmgw-own-a")
    argv = guestnet.ssh_argv(StubLmo(vm()), "web", identity=Path("/k"), known_hosts=Path("/s/known_hosts"),  # type: ignore[arg-type]
                             options=["BatchMode=yes"], command=["uptime"])  # fmt: skip
    assert argv == ["ip", "netns", "exec", "lmgw-own-a", "ssh", "-o", "StrictHostKeyChecking=accept-new",
                    "-o", "UserKnownHostsFile=/s/known_hosts", "-o", "HostKeyAlias=livemig-web", "-i", "/k",
                    "-o", "BatchMode=yes", "debian@10.0.7.10", "uptime"]  # fmt: skip


def test_ssh_says_what_is_missing(monkeypatch):
    monkeypatch.setattr("livemig.region.netplumb.netns_exists", lambda name: False)
    with pytest.raises(Conflict, match=r"no gateway into subnet own-a .*`livemig net gateway VNIC`"):
        guestnet.ssh_argv(StubLmo(vm()), "web", known_hosts=Path("/k"))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="VM web has no NIC on the VCN"):
        guestnet.ssh_argv(StubLmo(vm(nic=False)), "web", known_hosts=Path("/k"))  # type: ignore[arg-type]
