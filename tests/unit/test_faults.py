"""Fault points: arming at run time (scope, count, after), every action, the firing log, the API
every service mounts, and the LMO putting firings from the hosts into the migration's timeline."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.errors import InjectedFault, InvalidRequest, QemuError
from livemig.faults import points
from livemig.faults.api import mount_faults, parse_migration_header
from livemig.faults.model import Action, ArmRequest, Scope
from livemig.faults.registry import CURRENT, REGISTRY, FaultRegistry, Outcome
from livemig.model import Migration, Phase, VmSpec
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet
from livemig.wire.server import install_error_handlers


def arm(registry: FaultRegistry, point: str, action: str, **kwargs: object) -> str:
    return registry.arm(ArmRequest(point=point, action=Action(action), **kwargs)).id  # type: ignore[arg-type]


def fire(registry: FaultRegistry, point: str, **kwargs: object) -> Outcome:
    return asyncio.run(registry.fire(point, **kwargs))  # type: ignore[arg-type]


# ------------------------------------------------------------------ the registry


def test_an_unarmed_registry_has_nothing_to_test() -> None:
    registry = FaultRegistry("hostd")
    assert not registry.armed, "the hot path's whole cost is this truth test"
    assert fire(registry, "hostd.src.qmp.migrate") is Outcome.PROCEED
    assert registry.seq == 0 and registry.since(0) == []


def test_count_and_after_decide_which_hits_fire() -> None:
    registry = FaultRegistry("hostd")
    arm(registry, "hostd.src.qmp.query-migrate", "hold", count=2, after=3)
    outcomes = [fire(registry, "hostd.src.qmp.query-migrate") for _ in range(7)]
    assert outcomes == [Outcome.PROCEED] * 3 + [Outcome.SKIP] * 2 + [Outcome.PROCEED] * 2
    assert not registry.armed, "spent after two firings"
    assert [f.seq for f in registry.since(0)] == [1, 2] and registry.since(1)[0].seq == 2


def test_scope_limits_firings_to_a_migration_vm_and_host() -> None:
    registry = FaultRegistry("hostd", host="A")
    arm(registry, "hostd.dst.launch", "hold", scope=Scope(vm="web", host="B"), count=None)
    assert fire(registry, "hostd.dst.launch", vm="web") is Outcome.PROCEED, "the registry's own host is A"
    assert fire(registry, "hostd.dst.launch", vm="db", host="B") is Outcome.PROCEED
    assert fire(registry, "hostd.dst.launch", vm="web", host="B") is Outcome.SKIP

    arm(registry, "hostd.src.event.*", "hold", scope=Scope(migration="m-1"), count=None)
    assert fire(registry, "hostd.src.event.STOP", vm="web") is Outcome.PROCEED, "no migration known yet"
    registry.bind("m-1", "web")  # the LMO named m-1 for web once: later points outside requests know it
    assert fire(registry, "hostd.src.event.STOP", vm="web") is Outcome.SKIP
    token = CURRENT.set(Scope(migration="m-2", vm="db"))
    try:
        assert fire(registry, "hostd.src.event.RESUME") is Outcome.PROCEED
        assert registry.since(0)[-1].migration == "m-1"
    finally:
        CURRENT.reset(token)
    firing = registry.since(0)[-1]
    assert (firing.vm, firing.host, firing.point) == ("web", "A", "hostd.src.event.STOP")


def test_error_raises_the_callers_exception() -> None:
    registry = FaultRegistry("hostd")
    arm(registry, "hostd.src.qmp.migrate", "error")
    with pytest.raises(QemuError, match=r"injected fault at hostd\.src\.qmp\.migrate \(hostd\)"):
        fire(registry, "hostd.src.qmp.migrate", error=QemuError)
    arm(registry, "hostd.src.qmp.migrate", "error")
    with pytest.raises(InjectedFault):
        fire(registry, "hostd.src.qmp.migrate")


def test_delay_hold_and_drop() -> None:
    registry = FaultRegistry("blockd")
    arm(registry, "blockd.fence", "delay", seconds=0.2)
    started = time.monotonic()
    assert fire(registry, "blockd.fence") is Outcome.PROCEED
    assert time.monotonic() - started >= 0.2
    arm(registry, "blockd.nbd.write", "drop", count=2)
    assert fire(registry, "blockd.nbd.write", data=True) is Outcome.DROP
    assert fire(registry, "blockd.nbd.write") is Outcome.SKIP, "at a step point, a drop skips the step"
    arm(registry, "blockd.nbd.write", "hold", seconds=0.1)
    started = time.monotonic()
    assert fire(registry, "blockd.nbd.write", data=True) is Outcome.PROCEED, "a held request goes on when let go"
    assert time.monotonic() - started >= 0.1


def test_hang_waits_until_released_and_disarm_releases_too() -> None:
    registry = FaultRegistry("hostd")

    async def scenario() -> None:
        hang = arm(registry, "hostd.switchover", "hang", count=2)
        first = asyncio.create_task(registry.fire("hostd.switchover"))
        await asyncio.sleep(0.1)
        assert not first.done() and registry.view().armed[0].waiting == 1
        registry.release(hang)
        assert await asyncio.wait_for(first, 1) is Outcome.PROCEED
        second = asyncio.create_task(registry.fire("hostd.switchover"))
        await asyncio.sleep(0.1)
        assert not second.done(), "a release lets go of those waiting then, not later ones"
        assert registry.view().armed[0].id == hang, "a spent arm someone waits on can still be released"
        registry.disarm(hang)
        await asyncio.wait_for(second, 1)
        limited = arm(registry, "hostd.switchover", "hang", seconds=0.1)
        await asyncio.wait_for(registry.fire("hostd.switchover"), 1)  # gives up waiting by itself
        assert registry.view().armed == [] and limited

    asyncio.run(scenario())


def test_crash_records_the_firing_before_it_acts(tmp_path: Path) -> None:
    log_path = tmp_path / "faults" / "lmo.jsonl"
    registry = FaultRegistry()
    registry.configure("lmo", log_path=log_path)
    crashed: list[int] = []
    registry.crash = lambda: crashed.append(len(log_path.read_text().splitlines()))
    arm(registry, "controller.after.PreCopy", "crash")
    fire(registry, "controller.after.PreCopy")
    assert crashed == [1], "the firing is on disk when the process dies"
    restarted = FaultRegistry()
    restarted.configure("lmo", log_path=log_path)
    assert [f.point for f in restarted.since(0)] == ["controller.after.PreCopy"]
    assert restarted.seq == 1, "numbers go on across restarts, so a caller's 'since' stays right"
    assert json.loads(log_path.read_text())["action"] == "crash"


def test_a_service_refuses_points_that_are_not_its_own() -> None:
    registry = FaultRegistry("blockd", prefixes=points.SERVICE_PREFIXES["blockd"])
    with pytest.raises(InvalidRequest, match=r"blockd has no fault point 'hostd\.switchover'"):
        arm(registry, "hostd.switchover", "crash")


def test_the_start_time_plan() -> None:
    plan = points.parse_plan("controller.after.PreCopy=crash, hostd.switchover=delay:2,lmo.flow_sync=hold,x=hang:5")
    assert [(r.point, r.action.value, r.seconds, r.count) for r in plan] == [
        ("controller.after.PreCopy", "crash", None, None),
        ("hostd.switchover", "delay", 2.0, None),
        ("lmo.flow_sync", "hold", None, None),
        ("x", "hang", 5.0, None),
    ]
    for bad in ("nope", "p=explode", "p=delay", "p=delay:soon"):
        with pytest.raises(InvalidRequest, match="bad fault"):
            points.parse_plan(bad)


# ------------------------------------------------------------------ the API


def test_the_fault_api_arms_lists_releases_and_reports_firings(clean_registry: FaultRegistry) -> None:
    app = FastAPI()
    install_error_handlers(app)
    mount_faults(app)
    seen: list[Scope | None] = []

    @app.get("/work")
    async def work() -> dict[str, str]:
        seen.append(CURRENT.get())
        await points.fault_point("hostd.work", vm="web")
        return {"ok": "yes"}

    with TestClient(app) as client:
        assert client.post("/faults", json={"point": "hostd.work", "action": "explode"}).status_code == 422
        assert client.post("/faults", json={"point": "hostd.work", "action": "delay"}).status_code == 422
        armed = client.post("/faults", json={"point": "hostd.work", "action": "delay", "seconds": 0,
                                             "scope": {"migration": "m-7"}})  # fmt: skip
        assert armed.status_code == 201, armed.text
        assert [a["point"] for a in client.get("/faults").json()["armed"]] == ["hostd.work"]
        plain = client.get("/work")
        assert "x-livemig-faults" not in plain.headers, "nothing fired: nothing advertised"
        named = client.get("/work", headers={"X-Livemig-Migration": "m-7;vm=web"})
        assert named.headers["x-livemig-faults"] == "1"
        assert seen == [None, Scope(migration="m-7", vm="web")]
        firings = client.get("/faults/firings").json()
        assert [(f["point"], f["migration"], f["vm"]) for f in firings] == [("hostd.work", "m-7", "web")]
        assert client.get("/faults/firings", params={"since": 1}).json() == []
        assert client.delete("/faults/nope").status_code == 404
        assert client.post("/faults/nope/release").status_code == 404
        assert client.delete("/faults").status_code == 204 and client.get("/faults").json()["armed"] == []
    assert parse_migration_header(" ") is None


# ------------------------------------------------------------------ the LMO and fake hosts


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet("A", "B", memory_mib=2048)


@pytest.fixture
def api(fleet: FakeFleet, tmp_path: Path, clean_registry: FaultRegistry) -> Iterator[TestClient]:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:  # an admin; hosts register themselves
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        spec = VmSpec(name="vm1", memory_mib=512)
        assert client.post("/vms", json={"spec": spec.model_dump(), "host": "A"}).status_code == 201
        yield client


def wait(api: TestClient, migration_id: str, until: object = None, timeout: float = 15.0) -> Migration:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{migration_id}").json())
        if (until is None and m.terminal) or (until is not None and m.phase is until):
            return m
        time.sleep(0.02)
    raise AssertionError(f"migration {migration_id} did not reach {until or 'an end'}")


def fault_entries(m: Migration) -> list[tuple[str, str, Phase]]:
    return [(e.fault.point, e.fault.service, e.phase) for e in m.timeline if e.fault is not None]


def test_qemu_refusing_migrate_incoming_rolls_back_and_the_timeline_says_so(api: TestClient, fleet: FakeFleet) -> None:
    armed = api.post("/faults", json={"point": "lmo.call.hostd:POST /vms/*/incoming", "action": "delay",
                                      "seconds": 0})  # fmt: skip
    assert armed.status_code == 201, armed.text
    REGISTRY.arm(ArmRequest(point="hostd.dst.qmp.migrate-incoming.reply", action=Action.ERROR,
                            scope=Scope(vm="vm1", host="B")))  # fmt: skip
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED, m.reason
    assert "injected fault at hostd.dst.qmp.migrate-incoming.reply" in m.reason
    assert fault_entries(m) == [
        ("lmo.call.hostd:POST /vms/vm1/incoming", "lmo", Phase.PREPARING_TARGET),
        ("hostd.dst.qmp.migrate-incoming.reply", "hostd", Phase.PREPARING_TARGET),
    ]
    firing = next(e.fault for e in m.timeline if e.fault is not None and e.fault.service == "hostd")
    assert (firing.migration, firing.vm, firing.host) == (m.id, "vm1", "B"), "the LMO's header named it"
    assert "vm1" not in fleet.hosts["B"].vms and fleet.hosts["A"].vms["vm1"].state == "running"


def test_a_hung_controller_step_is_released_through_the_lmo_api(api: TestClient, fleet: FakeFleet) -> None:
    hang = api.post("/faults", json={"point": "controller.before.CuttingOver", "action": "hang",
                                     "scope": {"vm": "vm1"}}).json()  # fmt: skip
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    deadline = time.monotonic() + 10
    while not any(a["waiting"] for a in api.get("/faults").json()["armed"]):
        assert time.monotonic() < deadline, "the controller reaches the hang"
        time.sleep(0.02)
    assert fleet.hosts["B"].vms["vm1"].state == "running", "the destination runs, the step is held"
    assert fleet.hosts["A"].vms["vm1"].state == "postmigrate"
    assert api.post(f"/faults/{hang['id']}/release").status_code == 200
    m = wait(api, migration_id)
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert fault_entries(m) == [("controller.before.CuttingOver", "lmo", Phase.CUTTING_OVER)]


def test_a_failing_store_write_does_not_stop_the_controller(api: TestClient) -> None:
    """A store error escapes a step (it happens while saving): the pass fails, the next goes on."""
    REGISTRY.arm(ArmRequest(point="lmo.store.save_migration", action=Action.ERROR, count=3))
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert [e[0] for e in fault_entries(m)] == ["lmo.store.save_migration"] * 3


def test_hostd_event_points_fire_in_the_migration_job(api: TestClient) -> None:
    REGISTRY.arm(ArmRequest(point="hostd.src.event.MIGRATION.pre-switchover", action=Action.ERROR))
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED and "injected fault at hostd.src.event.MIGRATION.pre-switchover" in m.reason
    assert api.get("/vms/vm1").json()["host"] == "A"


def test_a_hang_blocks_only_its_caller(clean_registry: FaultRegistry) -> None:
    """A synchronous point (the store) hangs its thread at most its limit."""
    REGISTRY.arm(ArmRequest(point="lmo.store.add_vm", action=Action.HANG, seconds=0.2))
    done = threading.Event()
    started = time.monotonic()
    threading.Thread(target=lambda: (REGISTRY.fire_sync("lmo.store.add_vm"), done.set())).start()
    assert done.wait(2) and time.monotonic() - started >= 0.2


# ------------------------------------------------------------------ what the chaos matrix found


def test_a_lost_answer_to_migrate_continue_does_not_roll_back_a_completed_migration(
    api: TestClient, fleet: FakeFleet
) -> None:
    """QEMU continued and completed, hostd never heard it: the job ends in QEMU's word, the
    migration goes forward, and the stale source is never resumed."""
    REGISTRY.arm(ArmRequest(point="hostd.src.qmp.migrate-continue.reply", action=Action.ERROR))
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert "vm1" not in fleet.hosts["A"].vms and fleet.hosts["B"].vms["vm1"].state == "running"


def test_a_lost_answer_to_migrate_continue_is_not_taken_for_a_source_still_paused(
    api: TestClient, fleet: FakeFleet
) -> None:
    """QEMU answers ``migrate-continue`` before its migration thread leaves ``pre-switchover``:
    hostd, having lost the answer, must not read that moment as "never continued" and cancel a
    migration whose destination is already loading (CI's chaos matrix caught it on busy cores)."""
    REGISTRY.arm(ArmRequest(point="hostd.src.qmp.migrate-continue.reply", action=Action.ERROR))
    with patch("livemig.testing.fakeqemu.CONTINUE_LAG_S", 0.3):
        m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert "vm1" not in fleet.hosts["A"].vms and fleet.hosts["B"].vms["vm1"].state == "running"


def test_a_lost_answer_to_migrate_cancels_qemus_migration(api: TestClient, fleet: FakeFleet) -> None:
    """QEMU accepted ``migrate`` but hostd lost the answer: it cancels QEMU's migration before it
    reports the failure (nobody would answer its pause), and the source runs on."""
    REGISTRY.arm(ArmRequest(point="hostd.src.qmp.migrate.reply", action=Action.ERROR))
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED and "injected fault at hostd.src.qmp.migrate.reply" in m.reason
    source = fleet.hosts["A"].vms["vm1"]
    assert source.state == "running" and source.qemu is not None and source.qemu.migration["status"] == "cancelled"
    assert "vm1" not in fleet.hosts["B"].vms


def test_a_destination_that_cannot_be_observed_after_completion_is_observed_again(api: TestClient) -> None:
    REGISTRY.arm(ArmRequest(point="hostd.dst.qmp.query-status.reply", action=Action.ERROR, count=3,
                            scope=Scope(host="B")))  # fmt: skip
    m = wait(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert Phase.ROLLING_BACK not in [e.phase for e in m.timeline]


def test_a_destination_that_dies_after_it_ran_loses_the_vm_and_the_source_stays_stopped(
    api: TestClient, fleet: FakeFleet
) -> None:
    hang = REGISTRY.arm(ArmRequest(point="controller.before.CuttingOver", action=Action.HANG))
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    deadline = time.monotonic() + 10
    while not REGISTRY.view().armed or not REGISTRY.view().armed[0].waiting:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    destination = fleet.hosts["B"].agent.vms["vm1"]
    assert fleet.hosts["B"].vms["vm1"].state == "running"
    fleet.hosts["B"].runtime.kill(destination.pid)
    REGISTRY.release(hang.id)
    m = wait(api, migration_id)
    assert m.phase is Phase.FAILED, m.reason
    assert m.reason.startswith("the VM is lost: the destination received the guest and is gone"), m.reason
    assert "vm1" not in fleet.hosts["A"].vms, "the stale source must never run again"
    assert "vm1" not in fleet.hosts["B"].vms


def test_a_source_qemu_that_dies_in_precopy_ends_the_migration(api: TestClient, fleet: FakeFleet) -> None:
    fleet.hosts["A"].behaviour.hold_precopy = True  # pre-copy goes on until the kill
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    wait(api, migration_id, until=Phase.PRECOPY)
    time.sleep(0.2)
    fleet.hosts["A"].runtime.kill(fleet.hosts["A"].agent.vms["vm1"].pid)
    m = wait(api, migration_id)
    assert m.phase is Phase.FAILED and m.reason.startswith("the VM is lost: its source QEMU is gone"), m.reason
    assert "vm1" not in fleet.hosts["B"].vms


def test_a_destination_half_prepared_by_a_dead_hostd_is_finished(fleet: FakeFleet) -> None:
    """hostd died between starting the incoming QEMU and telling it to listen: asked again, it
    finishes the preparation instead of refusing the VM it already has."""
    agent = fleet.hosts["B"].agent
    spec = fleet.hosts["B"].agent.resolve_spec(VmSpec(name="half", memory_mib=256))

    async def scenario() -> None:
        await agent.create(spec, incoming=True)
        assert agent.vms["half"].incoming_uri is None
        uri = await agent.prepare_incoming(spec)
        assert uri.startswith("tcp:") and agent.vms["half"].incoming_uri == uri
        assert await agent.prepare_incoming(spec) == uri

    asyncio.run(scenario())


def test_firings_of_a_service_that_was_down_when_the_migration_ended_reach_its_timeline(tmp_path: Path) -> None:
    """The final sweep cannot reach a crashed service; the LMO asks it again each pass until it
    answers, and adds its firings to the ended migration."""
    from livemig.control.firings import FiringCollector
    from livemig.errors import HostUnreachable
    from livemig.faults.model import Firing

    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    m = Migration(id="m-9", vm="vm1", source="A", destination="B")
    m.transition(Phase.PENDING)
    store.add_migration(m)
    firing = Firing(id="vswitch:B:7:1", seq=1, at=m.created_at, service="vswitch", point="vswitch.handoff",
                    action="crash", migration="m-9", vm="vm1", host="B")  # fmt: skip

    class Vswitch:
        base_url = "http://vswitch-b"
        up = False

        async def run(self, _call: object) -> list[Firing]:
            if not self.up:
                raise HostUnreachable("vswitch of B did not answer")
            return [firing]

    switch = Vswitch()

    class Services:
        def __init__(self) -> None:
            self.store = store

    registry = FaultRegistry("lmo")
    registry.remote_seen[switch.base_url] = 1
    collector = FiringCollector(Services(), "replica-1", registry)  # type: ignore[arg-type]
    collector._involved = lambda _m: {switch.base_url: switch}  # type: ignore[method-assign]

    async def scenario() -> None:
        ended = store.migration("m-9")
        ended.transition(Phase.FAILED, "the hand-off failed")
        assert await collector.collect(ended, final=True) == 0, "the vswitch is still down"
        store.save_migration(ended)
        assert await collector.sweep_late() == 0
        switch.up = True
        assert await collector.sweep_late() == 1
        assert await collector.sweep_late() == 0, "asked once more, then no more"

    asyncio.run(scenario())
    saved = store.migration("m-9")
    assert [(e.fault.point, e.phase, e.by) for e in saved.timeline if e.fault] == [
        ("vswitch.handoff", Phase.PENDING, "replica-1")
    ]


def test_a_destination_paused_by_its_storage_is_the_vm_and_is_continued(api: TestClient, fleet: FakeFleet) -> None:
    """QEMU pauses a guest whose write met a full disk (io-error). After the migration completed
    that guest is the VM: it is neither rolled back nor given up, it is continued when it can be."""
    from livemig.model.vm import RunState

    hang = REGISTRY.arm(ArmRequest(point="controller.before.CuttingOver", action=Action.HANG))
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    deadline = time.monotonic() + 10
    while not REGISTRY.view().armed or not REGISTRY.view().armed[0].waiting:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    qemu = fleet.hosts["B"].vms["vm1"].qemu
    assert qemu is not None
    qemu.runstate = RunState.IO_ERROR
    REGISTRY.release(hang.id)
    m = wait(api, migration_id)
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert Phase.ROLLING_BACK not in [e.phase for e in m.timeline]
    assert "vm1" not in fleet.hosts["A"].vms and fleet.hosts["B"].vms["vm1"].state == "running"
