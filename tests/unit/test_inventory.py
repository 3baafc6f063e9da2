"""The LMO's inventory of hosts: hostd reports what it can hold when it registers and whenever
its VMs change, and the LMO places from that plus what it placed itself, asking no host."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import httpx

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.host.api import register_with_lmo
from livemig.model import HostRegistration, VmSpec
from livemig.testing.callers import lmo_over_tls
from livemig.testing.fakehost import FakeFleet


async def eventually(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_hostd_reports_its_capacity_at_registration_and_when_its_vms_change(tmp_path: Path) -> None:
    fleet = FakeFleet("A", memory_mib=4096, state_dir=tmp_path / "fleet")
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.05, transport=fleet.transport())
    agent = fleet.hosts["A"].agent

    def inventory() -> tuple[int | None, int, int | None] | None:
        with contextlib.suppress(Exception):
            c = store.capacity("A")
            return c.memory_mib, c.reported_used_mib, c.free_mib
        return None

    async def scenario() -> None:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=lmo_over_tls(app))  # hostd registers with its certificate
            ) as http,
        ):
            reporting = asyncio.create_task(register_with_lmo(agent, "http://lmo", fleet.url("A"), 0.01, http))
            await eventually(lambda: inventory() == (4096, 0, 4096))
            assert store.host("A").qemu_version == "7.2.0" and store.host("A").accel == "tcg"
            await agent.create(VmSpec(name="unknown", memory_mib=512))  # a VM the LMO never placed
            await eventually(lambda: inventory() == (4096, 512, 3584))
            await agent.destroy("unknown")
            await eventually(lambda: inventory() == (4096, 0, 4096))
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting

    asyncio.run(scenario())


def test_an_older_hostd_that_reports_no_capacity_is_asked_once_when_it_registers(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    fleet = FakeFleet("A", memory_mib=2048, state_dir=tmp_path / "fleet")
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.05, transport=fleet.transport())
    with TestClient(lmo_over_tls(app)) as api:  # PUT /hosts/A presents host A's certificate
        old = HostRegistration(name="A", api_url=fleet.url("A"), migration_address="127.100.0.1")
        assert api.put("/hosts/A", json=old.model_dump()).status_code == 200
        assert store.capacity("A").memory_mib == 2048 and fleet.hosts["A"].calls == ["GET /host"]
        fleet.hosts["A"].down = True
        assert api.put("/hosts/A", json=old.model_dump()).status_code == 200  # answers or not: registered
        assert store.capacity("A").memory_mib == 2048, "what was known is kept"


def test_a_wake_that_changes_no_capacity_builds_and_sends_nothing(tmp_path: Path) -> None:
    """The fleet simulator runs this loop for each of its thousands of hosts: a wake compares two
    numbers, and neither a registration nor the host's whole view (which scans the firmware
    catalog) is built or sent unless they changed."""
    fleet = FakeFleet("A", memory_mib=4096, state_dir=tmp_path / "fleet")
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.05, transport=fleet.transport())
    agent = fleet.hosts["A"].agent
    scans: list[int] = []
    scan = agent.runtime.firmware
    agent.runtime.firmware = lambda: (scans.append(1), scan())[1]  # type: ignore[method-assign]
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    async def scenario() -> None:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=lmo_over_tls(app)),
                              event_hooks={"request": [count]}) as http,
        ):  # fmt: skip
            reporting = asyncio.create_task(register_with_lmo(agent, "http://lmo", fleet.url("A"), 0.01, http))
            await eventually(lambda: sent == ["PUT /hosts/A"])
            for _ in range(20):  # wakes with nothing changed
                agent.changed.set()
                await asyncio.sleep(0.015)
            assert sent == ["PUT /hosts/A"] and scans == []
            await agent.create(VmSpec(name="v", memory_mib=512))
            await eventually(lambda: store.capacity("A").reported_used_mib == 512)
            assert sent == ["PUT /hosts/A"] * 2 and scans == [], "one registration per change, no scan"
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting

    asyncio.run(scenario())
