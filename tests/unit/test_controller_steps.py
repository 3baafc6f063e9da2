"""What one controller step covers: the quick phases to pre-copy in one step, the QEMU job only
in the next (after PreCopy is saved), the cut-over and its cleanup in one; a ``before`` fault
point that holds still ends a step at its phase (real hostd agents over simulated QEMU)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from livemig.control.controller import Controller, _acts
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.faults.model import Action, ArmRequest
from livemig.faults.registry import FaultRegistry
from livemig.model import ConditionType, Migration, Phase, VmSpec
from livemig.testing.fakehost import FakeFleet
from livemig.wire.base import async_http

SPEC = VmSpec(name="vm", memory_mib=256)
START_JOB = "POST /vms/vm/migrate"


def with_a_controller(tmp_path: Path, body: Callable[[Controller, FakeFleet, Migration], Awaitable[None]],
                      hold_precopy: bool = False) -> None:  # fmt: skip
    """Run ``body`` with a controller, the VM running on A and an admitted migration to B."""
    fleet = FakeFleet("A", "B", state_dir=tmp_path / "fleet")
    fleet.hosts["A"].behaviour.hold_precopy = hold_precopy
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for registration in fleet.registrations():
        store.upsert_host(registration)

    async def scenario() -> None:
        started = await fleet.hosts["A"].agent.create(SPEC)
        store.add_vm(started.spec, "A")  # as the LMO records it: the source's resolved spec
        async with async_http(transport=fleet.transport()) as http:
            m = Migration(id="m-1", vm="vm", source="A", destination="B")
            m.transition(Phase.VALIDATING, "admitted")
            await body(Controller(Services.build(store, http)), fleet, m)
        if hold_precopy:
            await fleet.hosts["A"].agent.cancel_migration("vm")

    asyncio.run(scenario())


def phase(m: Migration) -> Phase:
    """The migration's phase, read again after a step (not the one an assertion narrowed)."""
    return m.phase


def test_one_step_reaches_precopy_and_the_next_starts_the_job(tmp_path: Path) -> None:
    async def body(controller: Controller, fleet: FakeFleet, m: Migration) -> None:
        await controller._step(m)
        assert m.phase is Phase.PRECOPY, m.reason
        assert [e.phase for e in m.timeline][-3:] == [Phase.PREPARING_TARGET, Phase.SYNCING_FLOWS, Phase.PRECOPY]
        assert "POST /vms/vm/incoming" in fleet.hosts["B"].calls
        assert START_JOB not in fleet.hosts["A"].calls, "the job starts only once PreCopy is saved"
        assert _acts(m), "a PreCopy whose job has not started is taken by the next pass, not in turn"
        await controller._step(m)
        assert fleet.hosts["A"].calls.count(START_JOB) == 1
        assert m.condition(ConditionType.MIGRATION_STARTED) is not None and not _acts(m)

    with_a_controller(tmp_path, body, hold_precopy=True)


def test_the_cut_over_and_its_cleanup_are_one_step(tmp_path: Path) -> None:
    async def body(controller: Controller, fleet: FakeFleet, m: Migration) -> None:
        for _ in range(200):
            if m.phase is Phase.CUTTING_OVER:
                break
            await controller._step(m)
            await asyncio.sleep(0.01)
        assert m.phase is Phase.CUTTING_OVER, m.reason
        await controller._step(m)
        assert phase(m) is Phase.SUCCEEDED, m.reason
        assert controller.store.vm("vm")[1] == "B"

    with_a_controller(tmp_path, body)


def test_a_before_point_that_holds_ends_the_step_at_its_phase(tmp_path: Path, clean_registry: FaultRegistry) -> None:
    clean_registry.arm(ArmRequest(point="controller.before.SyncingFlows", action=Action.HOLD, count=2))

    async def body(controller: Controller, fleet: FakeFleet, m: Migration) -> None:
        await controller._step(m)
        await controller._step(m)
        assert m.phase is Phase.SYNCING_FLOWS, "held there, step after step"
        assert fleet.hosts["B"].calls.count("POST /vms/vm/incoming") == 1

    with_a_controller(tmp_path, body, hold_precopy=True)


def test_a_migration_that_ended_in_a_pass_whose_save_failed_is_only_saved_again(tmp_path: Path) -> None:
    async def body(controller: Controller, fleet: FakeFleet, m: Migration) -> None:
        m.transition(Phase.SUCCEEDED, "ended; its save failed")
        calls = len(fleet.hosts["A"].calls) + len(fleet.hosts["B"].calls)
        assert await controller._step(m) is True
        assert m.phase is Phase.SUCCEEDED
        assert len(fleet.hosts["A"].calls) + len(fleet.hosts["B"].calls) == calls, "no host asked"

    with_a_controller(tmp_path, body)
