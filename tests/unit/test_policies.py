"""Migration policies (auto-converge, multifd, compression) through the LMO, the real hostd and the
simulated QEMU: each reaches QEMU on the right end, the judgement learns them, the timeline and the
dry run show them. The real-QEMU proof is tests/e2e/test_policies.py."""

import re
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import Migration, MigrationPolicies, Phase, VmSpec
from livemig.model.vm import RunState
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet
from livemig.testing.fakeqemu import FakeQemu

AUTO_CONVERGE = {"auto_converge": {"enabled": True, "initial_pct": 20, "increment_pct": 10}}
#: a fast dirtier may take many throttled rounds: judge it by the throttle, not by the clock
PATIENT = {"completion_timeout_s_per_gib": 2000, "no_progress_timeout_s": 600}


@pytest.fixture
def fleet():
    return FakeFleet("A", "B", memory_mib=2048, speed=50.0)


@pytest.fixture
def api(fleet, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:  # an admin; hosts register themselves
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        yield client


def create_vm(api, memory=256, migration: dict[str, Any] | None = None) -> None:
    spec = VmSpec(name="vm1", memory_mib=memory,
                  migration=MigrationPolicies.model_validate(migration) if migration else None)  # fmt: skip
    reply = api.post("/vms", json={"spec": spec.model_dump(), "host": "A"})
    assert reply.status_code == 201, reply.text


def migrate(api, destination: str = "B", **params: Any) -> str:
    reply = api.post("/migrations", json={"vm": "vm1", "destination": destination, "params": params})
    assert reply.status_code == 201, reply.text
    return str(reply.json()["id"])


def wait(api, migration_id: str, timeout: float = 20.0) -> Migration:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{migration_id}").json())
        if m.terminal:
            return m
        time.sleep(0.02)
    raise AssertionError(f"migration {migration_id} did not end")


def qemu_of(fleet: FakeFleet, incoming: bool) -> FakeQemu:
    """The VM's simulated QEMU while a migration is under way: the listening destination, or the
    source whose pre-copy is active."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for qemu in list(fleet.world.processes.values()):
            if qemu.name != "vm1":
                continue
            if incoming and qemu.runstate is RunState.INMIGRATE:
                return qemu
            if not incoming and qemu.migration.get("status") == "active":
                return qemu
        time.sleep(0.01)
    raise AssertionError("no such QEMU")


@pytest.mark.parametrize(
    ("policies", "source_caps", "source_params", "destination"),
    [
        (AUTO_CONVERGE, {"auto-converge": True, "multifd": False, "xbzrle": False},
         {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99}, {"multifd": False}),
        ({"multifd_channels": 4}, {"auto-converge": False, "multifd": True, "xbzrle": False},
         {"multifd-channels": 4, "multifd-compression": "none"}, {"multifd": True, "multifd-channels": 4}),
        ({"multifd_channels": 2, "compression": "zstd", "zstd_level": 3}, {"multifd": True, "xbzrle": False},
         {"multifd-compression": "zstd", "multifd-zstd-level": 3}, {"multifd": True, "multifd-compression": "zstd"}),
        ({"compression": "xbzrle", "xbzrle_cache_mib": 32}, {"xbzrle": True, "multifd": False},
         {"xbzrle-cache-size": 32 << 20}, {"multifd": False}),
    ],
    ids=["auto-converge", "multifd", "zstd", "xbzrle"],
)  # fmt: skip
def test_each_policy_reaches_qemu_on_the_end_that_needs_it(api, fleet, policies, source_caps, source_params,
                                                           destination):  # fmt: skip
    create_vm(api)
    fleet.hosts["A"].behaviour.hold_precopy = True  # keep it in pre-copy while we look
    migration_id = migrate(api, policies=policies)
    source, incoming = qemu_of(fleet, incoming=False), qemu_of(fleet, incoming=True)
    for capability, state in source_caps.items():
        assert source.capabilities.get(capability, False) is state, capability
    for name, value in source_params.items():
        assert source.parameters[name] == value, name
    assert incoming.capabilities.get("multifd", False) is destination.pop("multifd")
    for name, value in destination.items():
        assert incoming.parameters[name] == value, name
    assert api.post(f"/migrations/{migration_id}/cancel").status_code == 202
    assert wait(api, migration_id).phase is Phase.CANCELLED


def test_a_fast_dirtier_is_aborted_without_auto_converge_and_throttled_with_it(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.dirty_rate_mib_s = 100
    aborted = wait(api, migrate(api, max_bandwidth_mib_s=64, policy=PATIENT))
    assert aborted.phase is Phase.ABORTED
    # judged once min_rounds (2) have passed: at round 2, or 3 when the controller observed a bit later
    assert re.fullmatch(r"dirty rate 100 MiB/s exceeds reserved bandwidth 64 MiB/s after [23] rounds", aborted.reason)

    m = wait(api, migrate(api, max_bandwidth_mib_s=64, policy=PATIENT, policies=AUTO_CONVERGE), timeout=30)
    assert m.phase is Phase.SUCCEEDED, m.reason
    rounds = [e.data for e in m.timeline if "throttle_pct" in e.data]
    throttles = [r["throttle_pct"] for r in rounds]
    assert throttles == sorted(throttles) and throttles[-1] >= 50, rounds  # one step a round, rising
    assert [r["round"] for r in rounds] == sorted({r["round"] for r in rounds})  # one entry per round
    assert "auto-converge throttles the vCPUs" in next(e.message for e in m.timeline if "throttle_pct" in e.data)
    assert m.stats.cpu_throttle_pct == throttles[-1] or m.stats.cpu_throttle_pct >= throttles[-1]
    assert "auto-converge 20%+10% up to 99%" in m.timeline[0].message


def test_auto_converge_gives_up_when_the_maximum_throttle_is_not_enough(api, fleet):
    create_vm(api)
    fleet.hosts["A"].behaviour.dirty_rate_mib_s = 1000  # still 300 MiB/s at a 70% throttle
    policies = {"auto_converge": {"enabled": True, "initial_pct": 50, "increment_pct": 20, "max_pct": 70}}
    m = wait(api, migrate(api, max_bandwidth_mib_s=64, policy=PATIENT, policies=policies), timeout=30)
    assert m.phase is Phase.ABORTED
    assert "with the vCPUs throttled to 70% for 2 rounds" in m.reason
    assert fleet.hosts["A"].vms["vm1"].state == "running"


def test_compression_lets_pages_outrun_the_wire(api, fleet):
    """At a 2:1 ratio a guest dirtying 1.3x the reserved bandwidth is within what the pages leave at."""
    create_vm(api)
    fleet.hosts["A"].behaviour.dirty_rate_mib_s = 40
    fleet.hosts["A"].behaviour.compression_ratio = 4.0
    assert wait(api, migrate(api, max_bandwidth_mib_s=32, policy=PATIENT)).phase is Phase.ABORTED
    m = wait(api, migrate(api, max_bandwidth_mib_s=32, policy=PATIENT,
                          policies={"multifd_channels": 2, "compression": "zstd"}))  # fmt: skip
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert m.stats.transferred_bytes < 256 << 20  # fewer bytes on the wire than the guest's RAM
    assert m.stats.normal_pages * 4096 >= 256 << 20  # though every page was sent


def test_multifd_raises_a_cpu_bound_stream(api, fleet):
    create_vm(api)
    for host in fleet.hosts.values():
        host.behaviour.stream_cap_mib_s = 32  # one stream's CPU limit; the link allows 512
    one = wait(api, migrate(api, max_bandwidth_mib_s=512))
    assert one.phase is Phase.SUCCEEDED, one.reason
    four = wait(api, migrate(api, "A", max_bandwidth_mib_s=512, policies={"multifd_channels": 4}))
    assert four.phase is Phase.SUCCEEDED, four.reason
    assert one.stats.total_ms is not None and four.stats.total_ms is not None
    assert four.stats.total_ms < one.stats.total_ms / 2  # 4x in simulated time; event-loop lag blurs it


def test_the_vm_spec_sets_policies_and_a_migration_overrides_them(api):
    create_vm(api, migration={"multifd_channels": 2})
    report = api.post("/migrations/preflight", json={"vm": "vm1", "destination": "B"}).json()
    check = next(c for c in report["checks"] if c["name"] == "migration policies")
    assert check["ok"] and check["detail"] == ("no auto-converge, multifd 2 channels, no compression "
                                               "(from the VM's spec)")  # fmt: skip
    assert report["policies"]["multifd_channels"] == 2
    body = {"vm": "vm1", "destination": "B", "params": {"policies": AUTO_CONVERGE}}
    report = api.post("/migrations/preflight", json=body).json()
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "migration policies")
    assert detail == "auto-converge 20%+10% up to 99%, one stream, no compression (from this migration)"
    assert api.get("/migrations").json() == []  # a dry run starts nothing


@pytest.mark.parametrize(
    ("policies", "status", "needle"),
    [
        ({"compression": "zstd"}, 422, "zstd compression runs on multifd channels"),
        ({"compression": "xbzrle", "multifd_channels": 2}, 422, "XBZRLE works on QEMU's single stream only"),
        ({"auto_converge": {"enabled": True, "initial_pct": 60, "max_pct": 50}}, 422, "exceeds its maximum"),
        ({"compression": "xbzrle", "xbzrle_cache_mib": 512}, 422, "exceeds the guest's 256 MiB of RAM"),
        ({"multifd_channels": 65}, 422, "multifd_channels"),
    ],
)  # fmt: skip
def test_policies_qemu_would_refuse_are_refused_before_anything_starts(api, fleet, policies, status, needle):
    create_vm(api)
    reply = api.post("/migrations", json={"vm": "vm1", "destination": "B", "params": {"policies": policies}})
    assert reply.status_code == status and needle in reply.json()["message"], reply.text
    assert api.get("/migrations").json() == [] and "vm1" not in fleet.hosts["B"].vms


def test_the_cli_refuses_policies_qemu_would_refuse_in_one_line():
    from typer.testing import CliRunner

    from livemig.cli.main import app

    result = CliRunner().invoke(app, ["migrate", "vm1", "--to", "B", "--compression", "zstd", "--url", "http://x"])
    assert result.exit_code == 1
    assert "migration policies: zstd compression runs on multifd channels" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_setting_qemu_accepts_but_does_not_take_is_named_in_the_timeline(api, fleet):
    """QEMU 7.2 accepts multifd-zstd-level and keeps 1: the record must not claim level 3."""
    create_vm(api)
    fleet.hosts["A"].behaviour.ignored_parameters = ("multifd-zstd-level",)
    m = wait(api, migrate(api, policies={"multifd_channels": 2, "compression": "zstd", "zstd_level": 3}))
    assert m.phase is Phase.SUCCEEDED, m.reason
    note = next(e for e in m.timeline if e.note and "qemu" in e.data)
    assert note.data["qemu"]["multifd-compression"] == "zstd" and note.data["qemu"]["multifd-zstd-level"] == 1
    assert note.data["qemu_ignored"] == {"multifd-zstd-level": {"asked": 3, "qemu": 1}}
    assert note.message.endswith("; QEMU kept multifd-zstd-level=1 (asked 3)")
