"""Pre-copy flow deltas: the controller copies what changed about once a second and tells the
source hostd, so the delta inside the pause holds only the last changes (fake hosts, no vswitch)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from livemig.control import controller as controller_module
from livemig.control.controller import Controller
from livemig.control.store import Store
from livemig.errors import HostUnreachable
from livemig.model import Migration, NicDevice, VmSpec
from livemig.model.host import HostRegistration
from livemig.testing.fakehost import FakeFleet, FakeVm


def setup(tmp_path: Path) -> tuple[Controller, FakeFleet, Migration, VmSpec, list[int]]:
    fleet = FakeFleet("A", "B")
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for name in ("A", "B"):
        store.upsert_host(HostRegistration(name=name, api_url=fleet.url(name), migration_address="127.0.0.1",
                                           vswitch_url=f"http://vswitch-{name.lower()}"))  # fmt: skip
    nic = NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:00:01", backend="vswitch", vnic="web")
    spec = VmSpec(name="vm", memory_mib=256, devices=[nic])
    fleet.hosts["A"].vms["vm"] = FakeVm(spec=spec, migration={"state": "running"})
    controller = Controller(store, httpx.AsyncClient(transport=fleet.transport()))
    versions = [12, 12, 19]  # what the source's table is at, call after call
    calls: list[int] = []

    async def copy_flows(vnic, source, destination, since=0):
        calls.append(since)
        return 1, versions[len(calls) - 1]

    controller.network.copy_flows = copy_flows  # type: ignore[method-assign]
    m = Migration(id="m-1", vm="vm", source="A", destination="B", flow_versions={"web": 5})
    return controller, fleet, m, spec, calls


def test_deltas_advance_the_version_and_tell_the_source_once_a_second(tmp_path: Path, monkeypatch) -> None:
    controller, fleet, m, spec, calls = setup(tmp_path)
    clock = [100.0]
    monkeypatch.setattr(controller_module.time, "monotonic", lambda: clock[0])

    async def passes() -> None:
        await controller._sync_flow_deltas(m, spec)  # a delta: 5 -> 12, the source hostd is told
        await controller._sync_flow_deltas(m, spec)  # the same second: nothing
        clock[0] += 1.5
        await controller._sync_flow_deltas(m, spec)  # nothing changed (12 -> 12): the hostd is not told
        clock[0] += 1.5
        await controller._sync_flow_deltas(m, spec)  # 12 -> 19

    asyncio.run(passes())
    assert calls == [5, 12, 12]
    assert m.flow_versions == {"web": 19}
    assert fleet.hosts["A"].vms["vm"].flow_versions == {"web": 19}
    assert fleet.hosts["A"].calls.count("POST /vms/vm/migration/flow-versions") == 2
    synced = next(c for c in m.conditions if c.type == "FlowsSynced")
    assert "{'web': 19}" in synced.reason


def test_an_unreachable_vswitch_only_skips_a_delta(tmp_path: Path) -> None:
    controller, fleet, m, spec, _ = setup(tmp_path)

    async def down(*_args: object, **_kwargs: object) -> tuple[int, int]:
        raise HostUnreachable("vswitch of A did not answer")

    controller.network.copy_flows = down  # type: ignore[method-assign]
    asyncio.run(controller._sync_flow_deltas(m, spec))
    assert m.flow_versions == {"web": 5} and "POST /vms/vm/migration/flow-versions" not in fleet.hosts["A"].calls
