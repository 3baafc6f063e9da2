"""The convergence predictor against a real guest: a dirtier faster than the reserved bandwidth is
aborted within 3 pre-copy rounds with the numbers in the reason; a slow one under the same policy
succeeds."""

from __future__ import annotations

import pytest

from livemig.guest.workload import workload_vm_spec
from livemig.model import MigrationParams, Phase
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESERVED = MigrationParams(max_bandwidth_mib_s=32)  # the default policy, 32 MiB/s reserved


def test_fast_dirtier_is_aborted_early_and_slow_one_succeeds(lmo: LmoClient):
    lmo.create_vm(workload_vm_spec(memory_mib=256, rate=200, wss_mib=128, name="dirty"), host="A")
    try:
        lmo.wait_for_console("dirty", "LIVEMIG HB", timeout=90)
        m = lmo.wait(lmo.migrate("dirty", "B", RESERVED).id, timeout=300)
        assert m.phase is Phase.ABORTED, m.reason
        assert "exceeds reserved bandwidth 32 MiB/s" in m.reason and "dirty rate" in m.reason
        assert m.last_sample is not None and m.last_sample.dirty_sync_count <= 3, "judged within 3 rounds"
        elapsed = (m.timeline[-1].at - m.timeline[0].at).total_seconds()
        assert elapsed < RESERVED.timeout_s / 4, f"aborted after {elapsed:.0f}s: long before the timeout"
        view = lmo.vm("dirty")
        assert view.host == "A" and view.observed.state == "running"
        assert lmo.guest_check("dirty").ok

        lmo.console_input("dirty", "rate 10")
        m = lmo.wait(lmo.migrate("dirty", "B", RESERVED).id, timeout=300)
        assert m.phase is Phase.SUCCEEDED, m.reason
        assert m.guest_check == "ok"
    finally:
        lmo.delete_vm("dirty")
