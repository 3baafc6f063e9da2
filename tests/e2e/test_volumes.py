"""A real guest appending a checksummed log to a blockd volume over QEMU's NBD client, migrated
A→B→A: no acknowledged record lost or torn, the source attachment fenced then detached."""

from __future__ import annotations

import time

import pytest

from livemig.guest.workload import workload_vm_spec
from livemig.model import Phase
from livemig.testing.processes import qemu_pids_running
from livemig.wire.blockd import AttachmentView
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def attachments(lmo: LmoClient, volume: str) -> list[AttachmentView]:
    return list(lmo.volume(volume).attachments)


def test_disk_log_survives_round_trip_and_source_is_fenced(lmo: LmoClient):
    lmo.create_volume("vol-rt", 64)
    lmo.create_vm(workload_vm_spec(memory_mib=256, rate=10, wss_mib=64, name="disky", volume="vol-rt", disk_rate=40),
                  host="A")  # fmt: skip
    try:
        lmo.wait_for_console("disky", "disk_acked=", timeout=90)
        first = attachments(lmo, "vol-rt")
        assert [a.host for a in first] == ["A"] and first[0].writes > 0 and first[0].is_writer
        for destination in ("B", "A"):
            m = lmo.wait(lmo.migrate("disky", destination).id, timeout=180)
            assert m.phase is Phase.SUCCEEDED, m.reason
            assert m.guest_check == "ok" and m.disk_check == "ok", (m.guest_check, m.disk_check)
            current = attachments(lmo, "vol-rt")
            assert [a.host for a in current] == [destination], "the source attachment is detached"
            assert current[0].rejected_writes == 0, "a clean migration has no stale writes"
        deadline = time.monotonic() + 30
        while not attachments(lmo, "vol-rt")[0].is_writer:
            assert time.monotonic() < deadline, "the destination's writes make it the volume's writer"
            time.sleep(0.2)
        assert lmo.volume("vol-rt").volume.writer == current[0].id
        assert len(qemu_pids_running("disky")) == 1
    finally:
        lmo.delete_vm("disky")
        lmo.delete_volume("vol-rt")


def test_cancel_leaves_no_destination_attachment(region, lmo: LmoClient):
    lmo.create_volume("vol-cancel", 32)
    lmo.create_vm(workload_vm_spec(memory_mib=256, rate=5, wss_mib=32, name="cancelled", volume="vol-cancel"), host="A")
    region.restart_lmo(faults="controller.before.PreCopy=hold")  # the destination is prepared, then we wait
    try:
        lmo.wait_for_console("cancelled", "disk_acked=", timeout=90)
        migration = lmo.migrate("cancelled", "B")
        deadline = time.monotonic() + 60
        while lmo.migration(migration.id).phase is not Phase.PRECOPY:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sorted(a.host for a in attachments(lmo, "vol-cancel")) == ["A", "B"]
        lmo.cancel(migration.id)
        final = lmo.wait(migration.id, timeout=120)
        assert final.phase is Phase.CANCELLED, final.reason
        assert [a.host for a in attachments(lmo, "vol-cancel")] == ["A"], "the destination attachment is gone"
        assert lmo.vm("cancelled").host == "A" and len(qemu_pids_running("cancelled")) == 1
        assert lmo.guest_check("cancelled").ok
    finally:
        region.restart_lmo()
        lmo.delete_vm("cancelled")
        lmo.delete_volume("vol-cancel")
