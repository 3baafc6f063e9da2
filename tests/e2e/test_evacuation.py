"""Evacuate a host running 4 real guests onto 2 hosts through the CLI, limits checked from the
timelines, every guest's memory check passing on its new host."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livemig.control.evacuation import peak_concurrency
from livemig.guest.workload import workload_vm_spec
from livemig.model import Migration, Phase
from livemig.region.local import Region
from livemig.testing.processes import qemu_pids_running
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
VMS = [f"evac{i}" for i in range(4)]


def test_evacuate_four_vms_onto_two_hosts_within_limits(tmp_path, guest_image):
    region = Region(tmp_path)
    config = region.up(("A", "B", "C"))
    try:
        with LmoClient(config.lmo_url) as lmo:
            for name in VMS:
                lmo.create_vm(workload_vm_spec(memory_mib=160, rate=2, wss_mib=32, name=name), host="A")
            for name in VMS:
                lmo.wait_for_console(name, "LIVEMIG HB", timeout=120)
            done = subprocess.run(
                [sys.executable, "-m", "livemig.cli.main", "evacuate", "A", "--json", "--state-dir", str(tmp_path),
                 "--per-host-outbound", "2", "--per-host-inbound", "1", "--region-total", "2"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            report = json.loads(done.stdout)
            migrations = [Migration.model_validate(m) for m in report["migrations"]]
            assert len(migrations) == 4 and all(m.phase is Phase.SUCCEEDED for m in migrations), [
                (m.vm, m.phase, m.reason) for m in migrations
            ]
            assert all(m.guest_check == "ok" for m in migrations)
            assert max(peak_concurrency(migrations, "destination").values()) <= 1
            assert max(peak_concurrency(migrations, "source").values()) <= 2
            hosts = {h.registration.name: h for h in lmo.hosts()}
            assert hosts["A"].info.vms == [] and hosts["A"].registration.maintenance is True
            assert {lmo.vm(name).host for name in VMS} == {"B", "C"}
            for name in VMS:
                assert len(qemu_pids_running(name)) == 1
                lmo.delete_vm(name)
    finally:
        region.down()
