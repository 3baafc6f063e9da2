"""A fleet of hosts for fast tests and the simulator: the *real* hostd app over a simulated QEMU.

Each :class:`FakeHost` is ``host.api.create_app`` around a real ``HostAgent`` whose only
replacement is its runtime (``testing.fakeqemu``): routes, validation, errors, the migration driver
and its switchover hook are hostd's own. :meth:`FakeFleet.transport` routes the LMO's requests to
each host's app in-process (``httpx.ASGITransport``), by the port in the host's URL, records them,
and can make a host unreachable. Each request reaches the app as if over TLS from the LMO's
certificate (``testing.callers.over_tls``), so hostd's access rules run as in production.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI

from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent, ManagedVm
from livemig.host.api import create_app
from livemig.host.tls import QemuTls
from livemig.model.host import HostRegistration
from livemig.model.vm import RunState
from livemig.security.pki import Role, host_leaf_name
from livemig.testing.callers import LMO, TestPki, over_tls
from livemig.testing.fakeqemu import FakeQemu, FakeQemuRuntime, QemuBehaviour, QemuWorld, SimClock

#: unit tests run simulated time this much faster than real time
DEFAULT_SPEED = 20.0
FIRST_PORT = 9000


@dataclass
class VmView:
    """A test's look at one VM on a fake host: what the agent manages and what QEMU simulates."""

    managed: ManagedVm
    qemu: FakeQemu | None

    @property
    def state(self) -> str:
        return self.qemu.runstate.value if self.qemu is not None else RunState.ABSENT.value


@dataclass
class FakeHost:
    name: str
    url: str
    agent: HostAgent
    app: FastAPI
    runtime: FakeQemuRuntime
    down: bool = False
    calls: list[str] = field(default_factory=list)

    @property
    def behaviour(self) -> QemuBehaviour:
        return self.runtime.behaviour

    @property
    def vms(self) -> dict[str, VmView]:
        """The VMs hostd manages here, each with its simulated QEMU (None once it exited)."""
        return {name: VmView(vm, self.runtime.world.processes.get(vm.pid)) for name, vm in self.agent.vms.items()}

    def registration(self) -> HostRegistration:
        return HostRegistration(name=self.name, api_url=self.url, migration_address=self.agent.migration_address,
                                migration_bandwidth_mib_s=self.agent.migration_bandwidth_mib_s)  # fmt: skip


class FakeFleet:
    """Hosts named ``names``, each a real hostd app with ``memory_mib`` for VMs, one QEMU world."""

    def __init__(self, *names: str, memory_mib: int = 4096, speed: float = DEFAULT_SPEED,
                 state_dir: Path | None = None, migration_bandwidth_mib_s: int = 1024) -> None:  # fmt: skip
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="livemig-fleet-")
        root = state_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.pki = TestPki(root / "pki")  # each host's QEMU certificate: migrations run over (simulated) TLS
        self.world = QemuWorld(SimClock(speed))
        self.hosts: dict[str, FakeHost] = {}
        self._by_port: dict[int, FakeHost] = {}
        for index, name in enumerate(names):
            self.add_host(name, root, index, memory_mib, migration_bandwidth_mib_s)

    def add_host(self, name: str, root: Path, index: int, memory_mib: int, migration_bandwidth_mib_s: int) -> FakeHost:
        address = f"127.100.{index // 250}.{index % 250 + 1}"
        runtime = FakeQemuRuntime(self.world, root / "image", address)
        qemu = QemuTls(self.pki.leaf(Role.QEMU, host_leaf_name(name), (address,)), root / "hosts" / name / "tls")
        agent = HostAgent(name, root / "hosts" / name, address, AccelChoice("tcg", "simulated QEMU"), memory_mib,
                          migration_bandwidth_mib_s, runtime=runtime, qemu_tls=qemu)  # fmt: skip
        port = FIRST_PORT + index
        host = FakeHost(name, f"http://fake-{name.lower()}:{port}", agent, create_app(agent), runtime)
        self.hosts[name] = host
        self._by_port[port] = host
        return host

    def url(self, name: str) -> str:
        return self.hosts[name].url

    def registrations(self) -> list[HostRegistration]:
        return [host.registration() for host in self.hosts.values()]

    def transport(self) -> httpx.AsyncBaseTransport:
        return _FleetTransport(self._by_port)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class _FleetTransport(httpx.AsyncBaseTransport):
    def __init__(self, by_port: dict[int, FakeHost]) -> None:
        self._by_port = by_port
        self._apps = {port: _transport(host) for port, host in by_port.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port or 80
        host = self._by_port.get(port)
        if host is None or host.down:
            raise httpx.ConnectError(f"no fake host answers at {request.url.host}:{port}", request=request)
        host.calls.append(f"{request.method} {request.url.path}")
        if port not in self._apps:  # a host added after the transport was made
            self._apps[port] = _transport(host)
        return await self._apps[port].handle_async_request(request)


def _transport(host: FakeHost) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=over_tls(host.app, LMO))
