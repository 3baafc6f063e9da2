"""The LMO's API and controller against fake hosts (fast; the real proof is tests/e2e)."""

import time

import pytest
from fastapi.testclient import TestClient

from livemig.control import controller
from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import Migration, Phase, VmSpec
from livemig.model.migration import ConditionType
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet


@pytest.fixture
def fleet():
    return FakeFleet("A", "B", memory_mib=2048)


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'lmo.db'}")


@pytest.fixture
def api(fleet, store):
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:  # an admin; hosts register themselves
        for name, host in fleet.hosts.items():
            reply = client.put(
                f"/hosts/{name}",
                json=host.registration().model_dump(),
            )
            assert reply.status_code == 200, reply.text
        yield client


def create_vm(api, name="vm1", memory=512, host="A"):
    reply = api.post("/vms", json={"spec": VmSpec(name=name, memory_mib=memory).model_dump(), "host": host})
    assert reply.status_code == 201, reply.text
    return reply.json()


def wait_terminal(api, migration_id, timeout=10.0) -> Migration:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{migration_id}").json())
        if m.terminal:
            return m
        time.sleep(0.02)
    raise AssertionError(f"migration {migration_id} did not end")


def test_migration_walks_every_phase_and_moves_ownership(api, fleet):
    create_vm(api)
    reply = api.post("/migrations", json={"vm": "vm1", "destination": "B"})
    assert reply.status_code == 201, reply.text
    m = wait_terminal(api, reply.json()["id"])
    assert m.phase is Phase.SUCCEEDED, m.reason
    phases = [e.phase for e in m.timeline if not e.note]
    assert any(e.note and e.data.get("qemu", {}).get("downtime-limit") == 20 for e in m.timeline)
    assert phases == [
        Phase.PENDING,
        Phase.VALIDATING,
        Phase.PREPARING_TARGET,
        Phase.SYNCING_FLOWS,
        Phase.PRECOPY,
        Phase.SWITCHOVER,
        Phase.CUTTING_OVER,
        Phase.CLEANUP,
        Phase.SUCCEEDED,
    ]
    assert [e.at for e in m.timeline] == sorted(e.at for e in m.timeline)
    assert m.stats.pause_ms is not None and m.stats.pause_ms > 0 and m.guest_check == "ok"
    resumed = fleet.hosts["B"].agent.vms["vm1"].resumed_at
    assert resumed is not None and m.stats.stopped_at is not None
    # source STOP -> destination RESUME, from the two hosts' QMP events
    assert m.stats.guest_pause_ms == round((resumed - m.stats.stopped_at) * 1000, 1)
    assert api.get("/vms/vm1").json()["host"] == "B"
    assert "vm1" not in fleet.hosts["A"].vms and fleet.hosts["B"].vms["vm1"].state == "running"
    # the source was stopped only after the destination was observed running
    calls = fleet.hosts["A"].calls
    assert calls.index("DELETE /vms/vm1") > max(i for i, c in enumerate(calls) if c == "GET /vms/vm1/migration")


def test_a_vm_without_volumes_is_deleted_by_an_lmo_without_blockd(api, fleet):
    create_vm(api)
    reply = api.delete("/vms/vm1")
    assert reply.status_code == 204, reply.text
    assert api.get("/vms/vm1").status_code == 404 and "vm1" not in fleet.hosts["A"].vms


def test_a_guest_that_crashes_after_resuming_fails_the_migration_with_qemus_words(api, fleet):
    """Any guest, not only livemig's workload: QEMU's reset event on the destination is the proof."""
    api.post("/vms", json={"spec": VmSpec(name="plain", memory_mib=512, workload=None).model_dump(), "host": "A"})
    fleet.hosts["B"].behaviour.crash_after_resume = True
    m = wait_terminal(api, api.post("/migrations", json={"vm": "plain", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED
    assert m.reason.startswith("the guest crashed or rebooted on B after the migration: RESET (guest-reset), ")
    assert "s after resuming here" in m.reason
    assert m.guest_check is None, "no workload, so no workload check; the reason says what happened"


def test_a_destination_that_never_finishes_loading_is_held_and_the_source_resumes(api, fleet, monkeypatch):
    """QEMU's source completed; its destination stays inmigrate: held after LOAD_GRACE_S, then the
    source runs the guest again (tests/unit/test_destination_hold.py: the hold itself)."""
    monkeypatch.setattr(controller, "LOAD_GRACE_S", 0.3)
    api.post("/vms", json={"spec": VmSpec(name="vm1", memory_mib=512).model_dump(), "host": "A"})
    fleet.hosts["B"].behaviour.stall_incoming = True
    m = wait_terminal(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED, m.reason
    assert "did not finish loading the last state within 0.3 s" in m.reason and "the source resumes" in m.reason
    phases = [e.phase for e in m.timeline]
    assert phases.index(Phase.CUTTING_OVER) < phases.index(Phase.ROLLING_BACK)
    assert any(c.type is ConditionType.DESTINATION_HELD and c.status for c in m.conditions)
    # held before the source resumed; the guest runs on the source again, the destination is gone
    b_calls, a_calls = fleet.hosts["B"].calls, fleet.hosts["A"].calls
    assert "POST /vms/vm1/hold" in b_calls and "POST /vms/vm1/resume" in a_calls
    assert api.get("/vms/vm1").json()["host"] == "A"
    assert fleet.hosts["A"].vms["vm1"].state == "running" and "vm1" not in fleet.hosts["B"].vms


def test_failed_precopy_rolls_back_to_the_source(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.fail_migration = "Unable to write to socket: Broken pipe"
    m = wait_terminal(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED
    assert "Broken pipe" in m.reason
    assert Phase.ROLLING_BACK in [e.phase for e in m.timeline]
    assert api.get("/vms/vm1").json()["host"] == "A"
    assert "vm1" not in fleet.hosts["B"].vms, "the destination must be torn down"
    assert fleet.hosts["A"].vms["vm1"].state == "running"


def test_target_that_cannot_start_fails_cleanly(api, fleet):
    create_vm(api)
    fleet.hosts["B"].behaviour.fail_incoming = True
    m = wait_terminal(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.FAILED and "refused" in m.reason
    assert fleet.hosts["A"].vms["vm1"].state == "running"


def test_cancel_keeps_the_vm_on_the_source(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.hold_precopy = True  # pre-copy never ends by itself
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    deadline = time.monotonic() + 5
    while api.get(f"/migrations/{migration_id}").json()["phase"] != "PreCopy" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api.post(f"/migrations/{migration_id}/cancel").status_code == 202
    m = wait_terminal(api, migration_id)
    assert m.phase is Phase.CANCELLED
    assert "vm1" not in fleet.hosts["B"].vms and fleet.hosts["A"].vms["vm1"].state == "running"
    again = api.post(f"/migrations/{migration_id}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["message"]


def test_one_active_migration_per_vm(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.hold_precopy = True
    first = api.post("/migrations", json={"vm": "vm1", "destination": "B"})
    second = api.post("/migrations", json={"vm": "vm1", "destination": "B"})
    assert first.status_code == 201 and second.status_code == 409
    assert "already migrating" in second.json()["message"]


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"vm": "nope", "destination": "B"}, 404, "unknown VM"),
        ({"vm": "vm1", "destination": "Z"}, 404, "unknown host"),
        ({"vm": "vm1", "destination": "A"}, 409, "already on host A"),
        ({"vm": "vm1"}, 422, "destination"),
        ({"vm": "vm1", "destination": "B", "params": {"downtime_limit_ms": -1}}, 422, "downtime_limit_ms"),
        ({"vm": "vm1", "destination": "B", "params": {"max_bandwidth_mib_s": -5}}, 422, "max_bandwidth_mib_s"),
        ({"vm": "vm1", "destination": "B", "params": {"policy": {"rate_margin": 2}}}, 422, "rate_margin"),
    ],
)
def test_bad_migration_requests(api, body, status, needle):
    create_vm(api)
    reply = api.post("/migrations", json=body)
    assert reply.status_code == status, reply.text
    assert needle in reply.json()["message"]
    assert api.get("/migrations").json() == [], "a rejected request starts nothing"


def test_destination_without_room_is_refused(api, fleet):
    create_vm(api, memory=512)
    create_vm(api, name="big", memory=1800, host="B")
    reply = api.post("/migrations", json={"vm": "vm1", "destination": "B"})
    assert reply.status_code == 409 and "free" in reply.json()["message"]


def test_malformed_json_and_bad_vm_requests(api):
    reply = api.post("/vms", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422 and reply.json()["error"] == "InvalidRequest"
    assert api.post("/vms", json={"spec": {"name": "vm", "memory_mib": 0}}).status_code == 422
    create_vm(api)
    taken = api.post("/vms", json={"spec": VmSpec(name="vm1", memory_mib=256).model_dump()})
    assert taken.status_code == 409 and "taken" in taken.json()["message"]
    huge = api.post("/vms", json={"spec": VmSpec(name="huge", memory_mib=100_000).model_dump()})
    assert huge.status_code == 409 and "no host can hold" in huge.json()["message"]
    assert api.get("/vms/huge").status_code == 404, "a refused VM leaves nothing behind"


def test_unreachable_destination_aborts_and_keeps_source(api, fleet, monkeypatch):
    import livemig.control.controller as controller

    monkeypatch.setattr(controller, "UNREACHABLE_GRACE_S", 0.2)
    create_vm(api)
    migration_id = api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
    fleet.hosts["B"].down = True
    deadline = time.monotonic() + 5
    while api.get(f"/migrations/{migration_id}").json()["phase"] not in ("RollingBack", "Failed", "Succeeded"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fleet.hosts["B"].down = False
    m = wait_terminal(api, migration_id)
    assert m.phase in (Phase.FAILED, Phase.SUCCEEDED)
    owner = api.get("/vms/vm1").json()["host"]
    running = [h for h in fleet.hosts.values() if "vm1" in h.vms and h.vms["vm1"].state == "running"]
    assert [h.name for h in running] == [owner], "the VM runs on exactly one host"


def test_a_guest_dirtying_faster_than_the_bandwidth_is_aborted_with_numbers(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.hold_precopy = True
    fleet.hosts["A"].behaviour.dirty_rate_mib_s = 200
    body = {"vm": "vm1", "destination": "B", "params": {"max_bandwidth_mib_s": 32}}
    m = wait_terminal(api, api.post("/migrations", json=body).json()["id"])
    assert m.phase is Phase.ABORTED
    assert "dirty rate 200 MiB/s exceeds reserved bandwidth 32 MiB/s after 2 rounds" in m.reason
    assert "vm1" not in fleet.hosts["B"].vms and fleet.hosts["A"].vms["vm1"].state == "running"


def test_unknown_policy_field_is_refused(api):
    create_vm(api)
    body = {"vm": "vm1", "destination": "B", "params": {"policy": {"max_roundz": 3}}}
    reply = api.post("/migrations", json=body)
    assert reply.status_code == 422 and "max_roundz" in reply.json()["message"]


def test_dry_run_reports_every_check_and_starts_nothing(api, fleet):
    create_vm(api)
    create_vm(api, name="big", memory=1800, host="B")
    report = api.post("/migrations/preflight", json={"vm": "vm1", "destination": "B"}).json()
    assert report["ok"] is False
    failed = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert list(failed) == ["destination capacity"] and "needs 512 MiB" in failed["destination capacity"]
    assert api.get("/migrations").json() == []
    assert "vm1" not in fleet.hosts["B"].vms


@pytest.fixture
def api3(store):
    fleet = FakeFleet("A", "B", "C", memory_mib=2048)
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:  # an admin; hosts register themselves
        for name, host in fleet.hosts.items():
            client.put(
                f"/hosts/{name}",
                json=host.registration().model_dump(),
            )
        yield client, fleet


def test_evacuation_moves_every_vm_within_the_limits(api3):
    from livemig.control.evacuation import peak_concurrency

    api, fleet = api3
    for i in range(4):
        create_vm(api, name=f"vm{i}", memory=512, host="A")
    limits = {"per_host_outbound": 2, "per_host_inbound": 1, "region_total": 4}
    reply = api.post("/hosts/A/evacuate", json={"limits": limits})
    assert reply.status_code == 201, reply.text
    evacuation_id = reply.json()["id"]
    refused = api.post("/vms", json={"spec": VmSpec(name="new", memory_mib=128).model_dump(), "host": "A"})
    assert refused.status_code == 409 and "maintenance" in refused.json()["message"]
    deadline = time.monotonic() + 20
    while not (report := api.get(f"/evacuations/{evacuation_id}").json())["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    migrations = [Migration.model_validate(m) for m in report["migrations"]]
    assert len(migrations) == 4 and all(m.phase is Phase.SUCCEEDED for m in migrations)
    assert {m.destination for m in migrations} == {"B", "C"}
    assert max(peak_concurrency(migrations, "destination").values()) <= 1
    assert max(peak_concurrency(migrations, "source").values()) <= 2
    assert fleet.hosts["A"].vms == {}


def test_evacuation_lists_vms_that_cannot_move(api3):
    api, _fleet = api3
    create_vm(api, name="small", memory=256, host="A")
    create_vm(api, name="big", memory=1500, host="A")
    create_vm(api, name="fillb", memory=1000, host="B")
    create_vm(api, name="fillc", memory=1000, host="C")
    items = {i["vm"]: i for i in api.post("/hosts/A/evacuate", json={}).json()["items"]}
    assert items["big"]["migration"] is None and "needs 1500 MiB" in items["big"]["reason"]
    assert items["small"]["destination"] in ("B", "C")


def test_evacuating_the_only_host_is_refused_without_a_state_change(api):
    create_vm(api)
    assert api.put("/hosts/B/maintenance", params={"on": True}).status_code == 200
    reply = api.post("/hosts/A/evacuate", json={})
    assert reply.status_code == 409 and "no other host in service" in reply.json()["message"]
    hosts = {h["registration"]["name"]: h["registration"] for h in api.get("/hosts").json()}
    assert hosts["A"]["maintenance"] is False
    assert api.get("/migrations").json() == []


def test_bandwidth_admission_queues_instead_of_overcommitting(api):
    create_vm(api, name="one")
    create_vm(api, name="two")
    api.put(
        "/hosts/A",
        json={
            "name": "A",
            "api_url": api.get("/hosts").json()[0]["registration"]["api_url"],
            "migration_address": "127.0.100.1",
            "migration_bandwidth_mib_s": 100,
        },
    )
    params = {"max_bandwidth_mib_s": 80, "min_bandwidth_mib_s": 50}
    first = api.post("/migrations", json={"vm": "one", "destination": "B", "params": params}).json()["id"]
    second = api.post("/migrations", json={"vm": "two", "destination": "B", "params": params}).json()["id"]
    m1, m2 = wait_terminal(api, first), wait_terminal(api, second)
    assert m1.phase is m2.phase is Phase.SUCCEEDED
    assert m1.reserved_mib_s == 80 and m1.params.max_bandwidth_mib_s == 80
    conditions = {c.type: c for c in m2.conditions}
    assert conditions["BandwidthReserved"].status is True
    started_2 = next(e.at for e in m2.timeline if e.phase is Phase.VALIDATING)
    ended_1 = next(e.at for e in m1.timeline if e.phase is Phase.SUCCEEDED)
    assert started_2 >= ended_1, "the second waited for bandwidth instead of sharing an overcommitted link"


def test_placement_asks_no_host_but_the_one_it_chose(api3):
    """The LMO places from its inventory: creating a VM calls only the host that starts it."""
    api, fleet = api3
    for host in fleet.hosts.values():
        host.calls.clear()
    created = create_vm(api, name="placed", memory=512, host=None)
    assert [h.name for h in fleet.hosts.values() if h.calls] == [created["host"]]
    assert fleet.hosts[created["host"]].calls == ["POST /vms"]
    inventory = {h["registration"]["name"]: h["inventory"] for h in api.get("/hosts", params={"observe": False}).json()}
    assert inventory[created["host"]]["placed_mib"] == 512 and inventory[created["host"]]["free_mib"] == 2048 - 512


def test_a_host_that_does_not_answer_gets_no_vm_and_keeps_its_room(api3):
    api, fleet = api3
    create_vm(api, name="a", memory=1024, host="A")
    create_vm(api, name="b", memory=512, host="B")  # C is the most free now
    fleet.hosts["C"].down = True
    created = create_vm(api, name="placed", memory=256, host=None)
    assert created["host"] == "B"  # C was chosen, did not answer, and B (next most free) took it
    inventory = {h["registration"]["name"]: h["inventory"] for h in api.get("/hosts", params={"observe": False}).json()}
    assert inventory["C"]["placed_mib"] == 0


def test_a_plan_predicts_each_vm_and_changes_nothing(api3):
    api, fleet = api3
    for i in range(3):
        create_vm(api, name=f"vm{i}", memory=512, host="A")
    reply = api.post("/evacuations/plan", json={"hosts": ["A"], "measure": True,
                                                "limits": {"per_host_outbound": 1, "region_total": 1}})  # fmt: skip
    assert reply.status_code == 200, reply.text
    plan = reply.json()
    assert plan["vms"] == 3 and plan["measured"] == 3 and plan["verdicts"] == {"ok": 3}
    items = plan["items"]
    assert {i["destination"] for i in items} <= {"B", "C"} and all(i["dirty_rate_source"] == "measured" for i in items)
    # one at a time: each starts when the one before it ends
    starts = sorted(i["start_s"] for i in items)
    assert starts[0] == 0 and plan["total_s"] == pytest.approx(sum(i["duration_s"] for i in items), rel=1e-3)
    assert api.get("/migrations").json() == []
    hosts = {h["registration"]["name"]: h["registration"] for h in api.get("/hosts", params={"observe": False}).json()}
    assert hosts["A"]["maintenance"] is False
    assert {name for name in fleet.hosts["A"].vms} == {"vm0", "vm1", "vm2"}


def test_a_plan_the_lmos_pace_lengthens_says_how_long_the_hosts_alone_would_take(api3, store):
    """Three VMs the hosts would move at once: with no pace measured the plan is theirs. Once a
    replica measured that the LMO ends at most one a second, the plan is longer, and says how long
    the wave would take if the LMO kept up (what more replicas could bring it to)."""
    api, _ = api3
    for i in range(3):
        create_vm(api, name=f"vm{i}", memory=512, host="A")
    request = {
        "hosts": ["A"],
        "limits": {"per_host_outbound": 3, "per_host_inbound": 3, "region_total": 3},
        "params": {"max_bandwidth_mib_s": 256},
    }  # three shares fit A's 1024 MiB/s: all three at once
    free = api.post("/evacuations/plan", json=request).json()
    assert free["lmo_pace"] is None and free["hosts_bound_s"] is None
    store.claim("lmo-slow", 3600, 10, (0.5, 1))  # with one or more held, it ended half a migration a second
    paced = api.post("/evacuations/plan", json=request).json()
    assert paced["lmo_pace"]["replica"] == "lmo-slow"
    assert paced["total_s"] > free["total_s"] + 0.5
    assert paced["hosts_bound_s"] == pytest.approx(free["total_s"], rel=1e-3)
    store.claim("lmo-slow", 3600, 10, (1000.0, 1))  # a pace far above QEMU's: it bounds nothing
    fast = api.post("/evacuations/plan", json=request).json()
    assert fast["hosts_bound_s"] is None and fast["total_s"] == pytest.approx(free["total_s"], rel=1e-3)


def test_a_wave_empties_two_hosts_and_reports_the_plan_beside_what_happened(api3):
    api, fleet = api3
    create_vm(api, name="a1", memory=256, host="A")
    create_vm(api, name="a2", memory=256, host="A")
    create_vm(api, name="b1", memory=256, host="B")
    reply = api.post("/evacuations", json={"hosts": ["A", "B"], "limits": {"region_total": 2}})
    assert reply.status_code == 201, reply.text
    evacuation = reply.json()
    assert evacuation["hosts"] == ["A", "B"] and evacuation["plan"]["vms"] == 3
    assert {i["destination"] for i in evacuation["items"]} == {"C"}
    deadline = time.monotonic() + 20
    while not (report := api.get(f"/evacuations/{evacuation['id']}").json())["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert all(m["phase"] == "Succeeded" for m in report["migrations"])
    comparison = report["comparison"]
    assert comparison["actual_s"] > 0 and comparison["error"] is not None
    assert {row["vm"]: row["outcome"] for row in comparison["items"]} == dict.fromkeys(("a1", "a2", "b1"), "Succeeded")
    assert set(fleet.hosts["C"].vms) == {"a1", "a2", "b1"}


def test_the_controller_reports_its_replica_and_passes(api):
    create_vm(api)
    m = wait_terminal(api, api.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"])
    assert m.phase is Phase.SUCCEEDED
    status = api.get("/controller").json()
    assert status["finished"] == 1 and status["replica"] in status["replicas"]
    assert status["passes"] and all(p["seconds"] >= 0 for p in status["passes"])
    counts = api.get("/migrations/counts").json()
    assert counts["Succeeded"] == 1 and counts["finished"] == 1 and counts["active"] == 0


def test_an_api_replica_accepts_migrations_and_leaves_driving_them_to_the_others(fleet, store):
    """``--capacity 0``: the API without a controller. It takes no part of the leases, so what it
    accepts waits for a replica that drives (here, the ordinary app started after it)."""
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport(), replica="api-1", capacity=0)
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        create_vm(client)
        migration_id = client.post("/migrations", json={"vm": "vm1", "destination": "B"}).json()["id"]
        time.sleep(0.3)  # thirty of a controller's intervals
        assert client.get(f"/migrations/{migration_id}").json()["phase"] == "Pending"
        status = client.get("/controller").json()
        assert (status["replica"], status["capacity"], status["held"], status["passes"]) == ("api-1", 0, 0, [])
        assert "api-1" not in status["replicas"], "an API replica would take a share it never drives"
    driver = create_app(store, controller_interval_s=0.01, transport=fleet.transport(), replica="lmo-1")
    with TestClient(lmo_over_tls(driver), headers=bearer(store)) as client:
        assert wait_terminal(client, migration_id).phase is Phase.SUCCEEDED
        assert client.get("/controller").json()["finished"] == 1


def test_an_api_replica_is_refused_on_a_store_other_replicas_cannot_share(tmp_path):
    from typer.testing import CliRunner

    from livemig.cli.main import app

    db = f"sqlite:///{tmp_path / 'lmo.db'}"
    result = CliRunner().invoke(app, ["lmo", "--capacity", "0", "--insecure", "--db", db])
    assert result.exit_code == 1 and "only on PostgreSQL" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "lmo.db").exists(), "refused before anything was created"
