"""Holding a destination that never finishes loading the migration's last state.

QEMU's source reports ``completed`` once it has sent everything; the destination then loads the
last state and starts the guest, in well under a second. One that stays ``inmigrate`` used to
keep the migration in CuttingOver for ever, the guest paused on both hosts. Now, after
``LOAD_GRACE_S``, the LMO holds it (QMP ``stop`` while ``inmigrate``: QEMU will not start the guest
by itself; checked against QEMU 7.2 by ``tests/e2e/test_destination_hold.py``), and only then
resumes the source: the two can never both run the guest (the whole migration:
``tests/unit/test_lmo.py``).
"""

from __future__ import annotations

import asyncio

import pytest

from livemig.control.controller import Controller
from livemig.model import VmSpec
from livemig.model.vm import RunState, VmRole
from livemig.testing.fakehost import FakeFleet
from livemig.wire.hostd import VmStatus


def test_a_held_destination_that_then_loads_stays_paused_without_running_the_guest(tmp_path):
    """The fake QEMU does what QEMU does: ``stop`` while inmigrate; the load completes paused."""
    fleet = FakeFleet("A", "B", state_dir=tmp_path, tls=False)

    async def scenario() -> None:
        spec = VmSpec(name="vm1", memory_mib=256)
        await fleet.hosts["A"].agent.create(spec)
        b = fleet.hosts["B"].agent
        await b.prepare_incoming(fleet.hosts["A"].agent.vms["vm1"].spec, {}, None, None)
        held = await b.hold_incoming("vm1")
        assert held.state is RunState.INMIGRATE and held.resumed_at is None
        qemu = fleet.hosts["B"].vms["vm1"].qemu
        assert qemu is not None and not qemu.autostart
        qemu.resume_incoming()  # the last state arrives
        after = await b.status("vm1")
        assert after.state is RunState.PAUSED and after.resumed_at is None

    asyncio.run(scenario())


def test_only_a_vm_that_came_in_by_migration_can_be_held(tmp_path):
    fleet = FakeFleet("A", state_dir=tmp_path, tls=False)

    async def scenario() -> None:
        await fleet.hosts["A"].agent.create(VmSpec(name="home", memory_mib=256))
        with pytest.raises(Exception, match="did not come in by migration"):
            await fleet.hosts["A"].agent.hold_incoming("home")

    asyncio.run(scenario())


def _status(state: RunState, resumed_at: float | None = None) -> VmStatus:
    spec = VmSpec(name="vm1", memory_mib=256)
    return VmStatus(name="vm1", host="B", state=state, pid=1, role=VmRole.INCOMING, spec=spec, console_log="",
                    resumed_at=resumed_at)  # fmt: skip


@pytest.mark.parametrize(
    ("destination", "held", "lost"),
    [
        (_status(RunState.INMIGRATE), False, False),
        (_status(RunState.PAUSED), True, False),  # held, then loaded: paused, never ran
        (_status(RunState.PAUSED), False, True),  # paused without a hold: it may have run before
        (_status(RunState.PAUSED, resumed_at=1.0), True, True),  # it ran before the hold
        (None, True, True),  # gone: nobody can say it never ran
    ],
)
def test_a_completed_source_resumes_only_where_the_destination_provably_never_ran(destination, held, lost):
    why = Controller._why_lost(RunState.POSTMIGRATE, destination, held=held)
    assert (why is not None) is lost, why
