"""The LMO killed (SIGKILL) or held at every phase of a real migration: every migration still ends,
the VM runs on exactly one host, and the guest's own memory check passes.

Fault points (``livemig.faults.points``) make the kill land at an exact moment: ``controller.after.<P>``
fires after the step of phase P acted on the hosts but before its result was saved — the worst
moment for a crash, since the store is behind what the hosts did.
"""

from __future__ import annotations

import pytest

from livemig.errors import Conflict
from livemig.guest.workload import workload_vm_spec
from livemig.model import MigrationParams, Phase
from livemig.model.migration import ConvergencePolicy
from livemig.testing.processes import qemu_pids_running
from livemig.testing.waiting import wait_until
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
VM = "chaos"


@pytest.fixture(scope="module")
def vm(region):
    config = region.load()
    with LmoClient(config.lmo_url) as lmo:
        lmo.create_vm(workload_vm_spec(memory_mib=256, rate=10, wss_mib=64, name=VM), host="A")
        lmo.wait_for_console(VM, "LIVEMIG HB", timeout=90)
    yield VM
    region.restart_lmo()
    with LmoClient(config.lmo_url) as lmo:
        lmo.delete_vm(VM)


def other_host(host: str) -> str:
    return "B" if host == "A" else "A"


def rounds(lmo: LmoClient, migration_id: str) -> int:
    sample = lmo.migration(migration_id).last_sample
    return sample.dirty_sync_count if sample else 0


def assert_vm_safe(lmo: LmoClient, host: str) -> None:
    """Invariants 1 and 3: one QEMU runs the VM, on the host the LMO names, memory intact."""
    view = lmo.vm(VM)
    assert view.host == host
    assert view.observed.state == "running"
    pids = qemu_pids_running(VM)
    assert pids == [view.observed.pid], f"exactly one QEMU must run {VM}: {pids}"
    check = lmo.guest_check(VM)
    assert check.ok, check


def phase_of(lmo: LmoClient, migration_id: str) -> Phase:
    return lmo.migration(migration_id).phase


FORWARD = ["Pending", "Validating", "PreparingTarget", "SyncingFlows", "PreCopy", "CuttingOver", "Cleanup"]


@pytest.mark.parametrize("phase", FORWARD)
def test_lmo_killed_right_after_each_step_recovers(region, lmo, vm, phase):
    source = lmo.vm(vm).host
    region.restart_lmo(faults=f"controller.after.{phase}=crash")
    migration = lmo.migrate(vm, other_host(source))
    wait_until(lambda: not region.lmo_alive(), f"the LMO to die after {phase}", 60)
    region.restart_lmo()
    final = lmo.wait(migration.id, timeout=180)
    assert final.phase is Phase.SUCCEEDED, f"{final.phase}: {final.reason}"
    assert_vm_safe(lmo, other_host(source))


def test_lmo_killed_while_the_source_is_paused_at_switchover(region, lmo, vm):
    source = lmo.vm(vm).host
    region.kill_host(source)
    region.restart_host(source, faults="hostd.switchover=delay:3")  # hold QEMU at pre-switchover
    try:
        region.restart_lmo(faults="controller.before.Switchover=crash")
        migration = lmo.migrate(vm, other_host(source))
        wait_until(lambda: not region.lmo_alive(), "the LMO to die in Switchover", 60)
        region.restart_lmo()
        final = lmo.wait(migration.id, timeout=180)
        assert Phase.SWITCHOVER in [e.phase for e in final.timeline]
        assert final.phase is Phase.SUCCEEDED, final.reason
        assert_vm_safe(lmo, other_host(source))
    finally:
        region.kill_host(source)
        region.restart_host(source)


CANCELLABLE = ["Pending", "Validating", "PreparingTarget", "SyncingFlows", "PreCopy"]


@pytest.mark.parametrize("phase", CANCELLABLE)
def test_cancel_in_each_phase_keeps_the_vm_on_the_source(region, lmo, vm, phase):
    source = lmo.vm(vm).host
    destination = other_host(source)
    region.restart_lmo(faults=f"controller.before.{phase}=hold")
    migration = lmo.migrate(vm, destination)
    wait_until(lambda: phase_of(lmo, migration.id).value == phase, f"phase {phase}", 60)
    lmo.cancel(migration.id)
    final = lmo.wait(migration.id, timeout=120)
    assert final.phase is Phase.CANCELLED, final.reason
    hosts = {h.registration.name: h.info for h in lmo.hosts()}
    assert VM not in hosts[destination].vms, "no leftover VM on the destination"
    assert_vm_safe(lmo, source)
    region.restart_lmo()


def test_cancel_during_active_precopy(region, lmo, vm):
    source = lmo.vm(vm).host
    lmo.console_input(vm, "rate 400")
    try:
        # a policy that never gives up, so only the cancel can end this pre-copy
        params = MigrationParams(max_bandwidth_mib_s=16,
                                 policy=ConvergencePolicy(min_rounds=100, max_rounds=100))  # fmt: skip
        migration = lmo.migrate(vm, other_host(source), params)
        wait_until(lambda: rounds(lmo, migration.id) >= 2, "two pre-copy rounds", 90)
        lmo.cancel(migration.id)
        final = lmo.wait(migration.id, timeout=120)
        assert final.phase is Phase.CANCELLED, final.reason
    finally:
        lmo.console_input(vm, "rate 10")
    assert_vm_safe(lmo, source)


def test_cancelling_a_finished_migration_is_refused(lmo, vm):
    source = lmo.vm(vm).host
    final = lmo.wait(lmo.migrate(vm, other_host(source)).id, timeout=180)
    assert final.phase is Phase.SUCCEEDED
    with pytest.raises(Conflict, match="already ended"):  # the LMO's 409, decoded to the same class
        lmo.cancel(final.id)
    assert lmo.migration(final.id).phase is Phase.SUCCEEDED
