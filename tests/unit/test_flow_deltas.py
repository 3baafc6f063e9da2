"""Pre-copy flow deltas: the controller copies what changed about once a second and tells the
source hostd, so the delta inside the pause holds only the last changes (real hostd, simulated
QEMU, no vswitch: the copy itself is replaced)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from livemig.control import controller as controller_module
from livemig.control.controller import Controller
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.errors import HostUnreachable
from livemig.model import ConditionType, Migration, MigrationParams, NicDevice, VmSpec
from livemig.testing.fakehost import FakeFleet
from livemig.wire.base import async_http
from livemig.wire.hostd import VnicHandoff

NIC = NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:00:01", backend="vswitch", vnic="web")


def run_with_a_migration(
    tmp_path: Path, body: Callable[[Controller, FakeFleet, Migration, VmSpec], Awaitable[None]]
) -> FakeFleet:
    """Run ``body`` while the real source hostd of A drives a pre-copy to B that never ends."""
    fleet = FakeFleet("A", "B", state_dir=tmp_path / "fleet")
    fleet.hosts["A"].behaviour.hold_precopy = True
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for registration in fleet.registrations():
        store.upsert_host(registration.model_copy(update={"vswitch_url": f"http://vswitch-{registration.name}"}))

    async def scenario() -> None:
        source, destination = fleet.hosts["A"].agent, fleet.hosts["B"].agent
        started = await source.create(VmSpec(name="vm", memory_mib=256))
        uri = await destination.prepare_incoming(started.spec)
        handoff = VnicHandoff(vnic="web", destination_vswitch="http://vswitch-B", flows_since=5)
        await source.migrate("vm", uri, MigrationParams(), [handoff])
        async with async_http(transport=fleet.transport()) as http:
            controller = Controller(Services.build(store, http))
            m = Migration(id="m-1", vm="vm", source="A", destination="B", flow_versions={"web": 5})
            await body(controller, fleet, m, VmSpec(name="vm", memory_mib=256, devices=[NIC]))
        await source.cancel_migration("vm")

    asyncio.run(scenario())
    return fleet


def test_deltas_advance_the_version_and_tell_the_source_once_a_second(tmp_path: Path, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(controller_module.time, "monotonic", lambda: clock[0])
    versions, asked = [12, 12, 19], []  # what the source's table is at, call after call

    async def body(controller: Controller, fleet: FakeFleet, m: Migration, spec: VmSpec) -> None:
        async def copy_flows(vnic: str, source: object, destination: object, since: int = 0) -> tuple[int, int]:
            asked.append(since)
            return 1, versions[len(asked) - 1]

        controller.network.copy_flows = copy_flows  # type: ignore[method-assign]
        await controller._sync_flow_deltas(m, spec)  # a delta: 5 -> 12, the source hostd is told
        await controller._sync_flow_deltas(m, spec)  # the same second: nothing
        clock[0] += 1.5
        await controller._sync_flow_deltas(m, spec)  # nothing changed (12 -> 12): the hostd is not told
        clock[0] += 1.5
        await controller._sync_flow_deltas(m, spec)  # 12 -> 19
        job = fleet.hosts["A"].agent.vms["vm"].migration
        assert job is not None and [h.flows_since for h in job.handoffs] == [19]
        assert m.flow_versions == {"web": 19}
        synced = m.condition(ConditionType.FLOWS_SYNCED)
        assert synced is not None and "{'web': 19}" in synced.reason

    fleet = run_with_a_migration(tmp_path, body)
    assert asked == [5, 12, 12]
    assert fleet.hosts["A"].calls.count("POST /vms/vm/migration/flow-versions") == 2


def test_an_unreachable_vswitch_only_skips_a_delta(tmp_path: Path) -> None:
    async def body(controller: Controller, fleet: FakeFleet, m: Migration, spec: VmSpec) -> None:
        async def down(*_args: object, **_kwargs: object) -> tuple[int, int]:
            raise HostUnreachable("vswitch of A did not answer")

        controller.network.copy_flows = down  # type: ignore[method-assign]
        await controller._sync_flow_deltas(m, spec)
        job = fleet.hosts["A"].agent.vms["vm"].migration
        assert job is not None and [h.flows_since for h in job.handoffs] == [5]
        assert m.flow_versions == {"web": 5}

    fleet = run_with_a_migration(tmp_path, body)
    assert "POST /vms/vm/migration/flow-versions" not in fleet.hosts["A"].calls
