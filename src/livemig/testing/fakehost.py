"""A fleet of hosts for fast tests and the simulator: the *real* hostd app over a simulated QEMU.

Each :class:`FakeHost` is ``host.api.create_app`` around a real ``HostAgent`` whose only
replacement is its runtime (``testing.fakeqemu``): routes, validation, errors, the migration driver
and its switchover hook are hostd's own. :meth:`FakeFleet.transport` routes the LMO's requests to
each host's app in-process (``httpx.ASGITransport``), by the port in the host's URL, records them,
and can make a host unreachable.
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
from livemig.model.host import HostRegistration
from livemig.model.vm import RunState
from livemig.storage.api import create_app as blockd_app
from livemig.storage.blockd import Blockd
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


#: the port the fleet's blockd answers on (its real admin app, in-process)
BLOCKD_PORT = 8999


class FakeFleet:
    """Hosts named ``names``, each a real hostd app with ``memory_mib`` for VMs, one QEMU world.

    ``blockd=True`` adds a real blockd (volumes, attachments, fencing; its admin app in-process,
    no NBD server) at :attr:`blockd_url`, for tests of VMs with volumes."""

    def __init__(self, *names: str, memory_mib: int = 4096, speed: float = DEFAULT_SPEED,
                 state_dir: Path | None = None, migration_bandwidth_mib_s: int = 1024,
                 blockd: bool = False) -> None:  # fmt: skip
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="livemig-fleet-")
        root = state_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.world = QemuWorld(SimClock(speed))
        self.hosts: dict[str, FakeHost] = {}
        self._by_port: dict[int, FakeHost] = {}
        self._services: dict[int, FastAPI] = {}
        self.blockd: Blockd | None = None
        if blockd:
            self.blockd = Blockd(root / "blockd")
            self._services[BLOCKD_PORT] = blockd_app(self.blockd)
        for index, name in enumerate(names):
            self.add_host(name, root, index, memory_mib, migration_bandwidth_mib_s)

    @property
    def blockd_url(self) -> str:
        return f"http://fake-blockd:{BLOCKD_PORT}"

    def add_host(self, name: str, root: Path, index: int, memory_mib: int, migration_bandwidth_mib_s: int) -> FakeHost:
        address = f"127.100.{index // 250}.{index % 250 + 1}"
        runtime = FakeQemuRuntime(self.world, root / "image", address)
        agent = HostAgent(name, root / "hosts" / name, address, AccelChoice("tcg", "simulated QEMU"), memory_mib,
                          migration_bandwidth_mib_s, runtime=runtime)  # fmt: skip
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
        return _FleetTransport(self._by_port, self._services)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class _FleetTransport(httpx.AsyncBaseTransport):
    def __init__(self, by_port: dict[int, FakeHost], services: dict[int, FastAPI]) -> None:
        self._by_port = by_port
        self._apps = {port: httpx.ASGITransport(app=host.app) for port, host in by_port.items()}
        self._services = {port: httpx.ASGITransport(app=app) for port, app in services.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port or 80
        if port in self._services:
            return await self._services[port].handle_async_request(request)
        host = self._by_port.get(port)
        if host is None or host.down:
            raise httpx.ConnectError(f"no fake host answers at {request.url.host}:{port}", request=request)
        host.calls.append(f"{request.method} {request.url.path}")
        if port not in self._apps:  # a host added after the transport was made
            self._apps[port] = httpx.ASGITransport(app=host.app)
        return await self._apps[port].handle_async_request(request)
