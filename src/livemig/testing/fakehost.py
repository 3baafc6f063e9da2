"""A fleet of hosts for fast tests and the simulator: the *real* hostd over a simulated QEMU.

Each :class:`FakeHost` is a real ``HostAgent`` whose only replacement is its runtime
(``testing.fakeqemu``), served by hostd's own routes (``host.api.router``): validation, errors, the
migration driver and its switchover hook are hostd's own. One app serves every host of the fleet
(``host.api.create_fleet_app``), each under ``/h/{name}``, because an app per host costs about a
megabyte and tens of milliseconds to build, too much for ten thousand hosts. :meth:`FakeFleet.transport`
routes the LMO's requests to that app in-process (``httpx.ASGITransport``), records them per host,
and can make a host unreachable; ``livemig.testing.fleetserver`` serves the same app over TCP.
Each in-process request reaches the app as if over TLS from the LMO's certificate
(``testing.callers.over_tls``), so hostd's access rules run as in production, and with ``tls`` each
host's QEMU has its certificate, so migrations run over (simulated) TLS.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from livemig.errors import NotFound
from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent, ManagedVm
from livemig.host.api import create_fleet_app, registration_of
from livemig.host.tls import QemuTls
from livemig.model.host import HostRegistration
from livemig.model.vm import RunState
from livemig.security.pki import Role, host_leaf_name
from livemig.storage.api import create_app as blockd_app
from livemig.storage.blockd import Blockd
from livemig.testing.callers import LMO, TestPki, over_tls
from livemig.testing.fakeqemu import FakeQemu, FakeQemuRuntime, QemuBehaviour, QemuWorld, RemoteStreams, SimClock
from livemig.testing.fleetshards import address_of

#: unit tests run simulated time this much faster than real time
DEFAULT_SPEED = 20.0
#: where the fleet's hosts answer in-process (the path names the host)
FLEET_URL = "http://fleet.sim"
PREFIX = "/h/{host}"
#: where the fleet's blockd answers in-process (its real admin app), with ``blockd=True``
BLOCKD_HOST = "fake-blockd"


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
    app: FastAPI  # the fleet's app, shared by every host
    runtime: FakeQemuRuntime
    down: bool = False
    calls: list[str] = field(default_factory=list)
    record_calls: bool = True

    @property
    def behaviour(self) -> QemuBehaviour:
        return self.runtime.behaviour

    @property
    def vms(self) -> dict[str, VmView]:
        """The VMs hostd manages here, each with its simulated QEMU (None once it exited)."""
        return {name: VmView(vm, self.runtime.world.processes.get(vm.pid)) for name, vm in self.agent.vms.items()}

    def registration(self) -> HostRegistration:
        """What this hostd would tell the LMO (hostd's own ``registration_of``)."""
        return registration_of(self.agent, self.url)


#: the port the fleet's blockd answers on (its real admin app, in-process)
BLOCKD_PORT = 8999


class FakeFleet:
    """Hosts named ``names``, each a real hostd agent with ``memory_mib`` for VMs, one QEMU world.

    ``tls``: each host's QEMU gets a certificate of the fleet's test CA (the simulator of thousands
    of hosts goes without: a key per host costs more than the host). ``insecure``: the app answers
    plain HTTP from anyone (the simulator served over TCP, for an ``--insecure`` LMO).
    ``blockd=True`` adds a real blockd (volumes, attachments, fencing; its admin app in-process,
    no NBD server) at :attr:`blockd_url`, for tests of VMs with volumes."""

    def __init__(self, *names: str, memory_mib: int = 4096, speed: float = DEFAULT_SPEED,
                 state_dir: Path | None = None, migration_bandwidth_mib_s: int = 1024, seed: int = 0,
                 base_url: str = FLEET_URL, record_calls: bool = True, tls: bool = True, insecure: bool = False,
                 blockd: bool = False, remote: RemoteStreams | None = None) -> None:  # fmt: skip
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="livemig-fleet-")
        self.root = state_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.world = QemuWorld(SimClock(speed), seed=seed, remote=remote)
        self.base_url = base_url.rstrip("/")
        self.record_calls = record_calls
        self.pki = TestPki(self.root / "pki") if tls else None
        self.hosts: dict[str, FakeHost] = {}
        self.app = create_fleet_app(self._agent_for, prefix=PREFIX, insecure=insecure)
        self.blockd: Blockd | None = None
        self.blockd_app: FastAPI | None = None
        if blockd:
            self.blockd = Blockd(self.root / "blockd")
            self.blockd_app = blockd_app(self.blockd)
        for name in names:
            self.add_host(name, memory_mib, migration_bandwidth_mib_s)

    @property
    def blockd_url(self) -> str:
        return f"http://{BLOCKD_HOST}"

    def _agent_for(self, request: Request) -> HostAgent:
        name = request.path_params.get("host", "")
        host = self.hosts.get(name)
        if host is None:
            raise NotFound(f"no simulated host {name!r} in this fleet", host=name)
        return host.agent

    def add_host(self, name: str, memory_mib: int = 4096, migration_bandwidth_mib_s: int = 1024,
                 behaviour: QemuBehaviour | None = None, index: int | None = None) -> FakeHost:  # fmt: skip
        """``index``: the host's number in the whole fleet, which its address is made from (a
        simulator shard's hosts are numbered from where its slice starts); the next one by default."""
        address = address_of(len(self.hosts) if index is None else index)
        runtime = FakeQemuRuntime(self.world, self.root / "image", address, behaviour)
        qemu = None
        if self.pki is not None:
            leaf = self.pki.leaf(Role.QEMU, host_leaf_name(name), (address,))
            qemu = QemuTls(leaf, self.root / "hosts" / name / "tls")
        agent = HostAgent(name, self.root / "hosts" / name, address, AccelChoice("tcg", "simulated QEMU"), memory_mib,
                          migration_bandwidth_mib_s, runtime=runtime, qemu_tls=qemu)  # fmt: skip
        host = FakeHost(name, f"{self.base_url}/h/{name}", agent, self.app, runtime, record_calls=self.record_calls)
        self.hosts[name] = host
        return host

    def url(self, name: str) -> str:
        return self.hosts[name].url

    def registrations(self) -> list[HostRegistration]:
        return [host.registration() for host in self.hosts.values()]

    def transport(self) -> httpx.AsyncBaseTransport:
        return _FleetTransport(self)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class _FleetTransport(httpx.AsyncBaseTransport):
    """Requests to ``…/h/{name}/…`` go to the fleet's app in-process; a host that is ``down``
    refuses the connection, as a dead host would."""

    def __init__(self, fleet: FakeFleet) -> None:
        self._fleet = fleet
        self._app = httpx.ASGITransport(app=over_tls(fleet.app, LMO))
        self._blockd = httpx.ASGITransport(app=over_tls(fleet.blockd_app, LMO)) if fleet.blockd_app else None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._blockd is not None and request.url.host == BLOCKD_HOST:
            return await self._blockd.handle_async_request(request)
        parts = request.url.path.split("/", 3)  # "", "h", name, rest
        host = self._fleet.hosts.get(parts[2]) if len(parts) >= 3 and parts[1] == "h" else None
        if host is None or host.down:
            raise httpx.ConnectError(f"no fake host answers at {request.url}", request=request)
        if host.record_calls:
            host.calls.append(f"{request.method} /{parts[3] if len(parts) > 3 else ''}")
        return await self._app.handle_async_request(request)
