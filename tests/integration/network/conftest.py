"""Real vswitch processes (``livemig vswitch``) on loopback, and helpers to drive them.

Each serves mutual TLS with its own certificate, as in a region; the tests call them with the
LMO's (allowed on every route).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from livemig.network.model import Mapping
from livemig.security.pki import Role
from livemig.testing.callers import TestPki
from livemig.testing.fakevm import SAMPLE, FakeVm, sample_mapping, sample_security_lists
from livemig.wire.base import Credentials
from livemig.wire.vswitch import VswitchClient

_generation = itertools.count(1)


@dataclass
class Switch:
    name: str
    api: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: VswitchClient
    overlay: str = ""


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_switch(
    name: str, directory: Path, api_port: int | None = None, overlay: str = "127.0.0.1:0", extra: tuple[str, ...] = ()
) -> Switch:
    """``livemig vswitch`` serving mutual TLS with its own certificate; its client presents the LMO's."""
    port = api_port or _free_tcp_port()
    log = directory / f"vswitch-{name}.log"
    pki = TestPki(directory / "pki")
    leaf = pki.leaf(Role.VSWITCH, name.lower())
    lmo = pki.leaf(Role.LMO, "lmo")
    cmd = [sys.executable, "-m", "livemig.cli.main", "vswitch", "--name", name, "--listen", f"127.0.0.1:{port}",
           "--overlay", overlay, "--log-level", "warning",
           "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key), "--tls-ca", str(leaf.ca), *extra]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    api = f"https://127.0.0.1:{port}"
    creds = Credentials(ca=lmo.ca, cert=lmo.cert, key=lmo.key)
    return Switch(name, api, proc, log, VswitchClient(api, timeout=5, credentials=creds))


def wait_ready(switch: Switch, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if switch.proc.poll() is not None:
            raise RuntimeError(f"vswitch {switch.name} exited: {switch.log.read_text()}")
        try:
            switch.overlay = switch.client.health().overlay
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"vswitch {switch.name} not ready after {timeout}s: {switch.log.read_text()}")


@pytest.fixture(scope="session")
def switches(tmp_path_factory) -> Iterator[dict[str, Switch]]:
    directory = tmp_path_factory.mktemp("vswitch")
    started = {name: start_switch(name, directory) for name in ("A", "B", "C")}
    try:
        for switch in started.values():
            wait_ready(switch)
        yield started
    finally:
        for switch in started.values():
            switch.client.close()
            switch.proc.terminate()
        for switch in started.values():
            try:
                switch.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                switch.proc.kill()
                switch.proc.wait()


@dataclass
class Net:
    """One test's view of the three switches: push topology, attach fake VMs, clean up after."""

    switches: dict[str, Switch]
    attached: list[tuple[str, str]] = field(default_factory=list)
    vms: list[FakeVm] = field(default_factory=list)

    @property
    def hosts(self) -> dict[str, str]:
        return {name: s.overlay for name, s in self.switches.items()}

    def client(self, host: str) -> VswitchClient:
        return self.switches[host].client

    def push(self, placement: dict[str, str] | None = None, ingress: dict[str, list[str]] | None = None,
             hosts: dict[str, str] | None = None) -> Mapping:  # fmt: skip
        mapping = sample_mapping(hosts or self.hosts, next(_generation), placement, ingress)
        for switch in self.switches.values():
            switch.client.put_mapping(mapping)
        return mapping

    def attach(self, host: str, vnic: str, hold: bool = False) -> FakeVm:
        attachment = self.client(host).attach(vnic, hold=hold)
        self.attached.append((host, vnic))
        vm = FakeVm(attachment, *SAMPLE[vnic])
        self.vms.append(vm)
        return vm

    def detach(self, host: str, vnic: str) -> None:
        self.client(host).detach(vnic)
        self.attached.remove((host, vnic))

    def counters(self, host: str) -> dict[str, int]:
        return dict(self.client(host).counters().switch)

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        for host, vnic in self.attached:
            with contextlib.suppress(Exception):
                self.client(host).detach(vnic)


@pytest.fixture
def net(switches) -> Iterator[Net]:
    for switch in switches.values():
        for sl in sample_security_lists():
            switch.client.put_security_list(sl)
    helper = Net(switches)
    try:
        yield helper
    finally:
        helper.close()
