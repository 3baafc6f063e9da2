"""Two LMO replicas on one PostgreSQL store; the one driving a live migration is SIGKILLed in the
middle of pre-copy; the other takes over when the lease expires and finishes the migration."""

from __future__ import annotations

import os
import signal
import time

import pytest

from livemig.guest.workload import workload_vm_spec
from livemig.model import MigrationParams, Phase
from livemig.region.local import Region
from livemig.region.proc import pid_alive, wait_gone
from livemig.testing.processes import qemu_pids_running
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_the_surviving_replica_finishes_the_migration(tmp_path, postgres_url, guest_image):
    region = Region(tmp_path)
    config = region.up(db_url=postgres_url)
    try:
        second_url = region.add_lmo_replica()
        replicas = {config.lmo_url: config.lmo_pid, second_url: region.load().replica_pids[0]}
        with LmoClient(config.lmo_url) as first, LmoClient(second_url) as second:
            first.create_vm(workload_vm_spec(memory_mib=256, rate=10, wss_mib=128, name="ha"), host="A")
            first.wait_for_console("ha", "LIVEMIG HB", timeout=90)
            # slow enough (32 MiB/s for ~150 MiB) that the kill lands inside pre-copy
            migration = second.migrate("ha", "B", MigrationParams(max_bandwidth_mib_s=32))
            deadline = time.monotonic() + 60
            while (m := first.migration(migration.id)).phase is not Phase.PRECOPY or not m.last_sample:
                assert time.monotonic() < deadline and not m.terminal, m.phase
                time.sleep(0.05)
            driver = m.timeline[-1].by
            driver_pid = int(driver.split("-")[-2])
            assert driver_pid in replicas.values()
            os.kill(driver_pid, signal.SIGKILL)
            wait_gone(driver_pid, 5)
            survivor = next(url for url, pid in replicas.items() if pid != driver_pid)
            with LmoClient(survivor) as lmo:
                final = lmo.wait(migration.id, timeout=180)
                assert final.phase is Phase.SUCCEEDED, final.reason
                assert final.guest_check == "ok"
                drivers = {e.by for e in final.timeline if e.by}
                assert len(drivers) == 2 and driver in drivers, drivers
                assert lmo.vm("ha").host == "B"
                assert len(qemu_pids_running("ha")) == 1
                lmo.delete_vm("ha")
            assert not pid_alive(driver_pid)
    finally:
        region.down()
