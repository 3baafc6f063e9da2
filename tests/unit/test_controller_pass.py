"""A controller pass at scale: it holds only its replica's fair part of the active migrations, and
steps them concurrently, never more than its bound at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

from livemig.control.controller import PASS_BUDGET_S, Controller, PassRecord
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.model import ConditionType, Migration, Phase
from livemig.wire.base import async_http


def validating(i: int) -> Migration:
    m = Migration(id=f"m{i:02d}", vm=f"vm{i:02d}", source="A", destination="B")
    m.transition(Phase.VALIDATING, "admitted")
    return m


def test_a_pass_steps_concurrently_within_its_bound(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(10):
        store.add_migration(validating(i))
    in_flight, most, stepped = 0, 0, []

    async def scenario() -> None:
        nonlocal in_flight, most
        async with async_http() as http:
            controller = Controller(Services.build(store, http), concurrency=3)

            async def step(m: Migration) -> bool:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1
                stepped.append(m.id)
                return False

            controller._step = step  # type: ignore[method-assign]
            await controller.pass_once()
            assert controller.recent_passes()[-1].stepped == 10

    asyncio.run(scenario())
    assert most == 3 and sorted(stepped) == [f"m{i:02d}" for i in range(10)]


def test_replicas_hold_a_fair_part_each_and_the_active_migrations_only(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(12):
        store.add_migration(validating(i))
    done = validating(99)
    store.add_migration(done)
    done.phase = Phase.SUCCEEDED
    store.save_migration(done)

    async def scenario() -> dict[str, int]:
        async with async_http() as http:
            replicas = [Controller(Services.build(store, http), replica=f"lmo-{r}", capacity=100) for r in range(3)]
            for replica in replicas:
                replica._step = _idle  # type: ignore[method-assign]
            for _ in range(3):
                for replica in replicas:
                    await replica.pass_once()
            return {r.replica: len(r.held) for r in replicas}

    held = asyncio.run(scenario())
    assert held == {"lmo-0": 4, "lmo-1": 4, "lmo-2": 4}


async def _idle(_m: Migration) -> bool:
    return False


def precopy(i: int) -> Migration:
    m = validating(i)
    m.transition(Phase.PREPARING_TARGET, "source running")
    m.transition(Phase.SYNCING_FLOWS, "listening")
    m.transition(Phase.PRECOPY, "no VNICs")
    m.set_condition(ConditionType.MIGRATION_STARTED, True, "the job runs: its steps only observe")
    return m


def recorded_passes(
    store: Store, count: int, concurrency: int, step_cost_s: float, on_step: Callable[[], None] = lambda: None
) -> tuple[list[list[str]], list[PassRecord]]:
    """Run ``count`` passes of a fresh controller whose steps only record the migration they take
    (and call ``on_step``), with the cost per step the budget divides by held at ``step_cost_s``:
    the ids each pass stepped, in order, and the passes' records."""
    passes: list[list[str]] = []

    async def scenario() -> list[PassRecord]:
        async with async_http() as http:
            controller = Controller(Services.build(store, http), concurrency=concurrency)

            async def step(m: Migration) -> bool:
                passes[-1].append(m.id)
                on_step()
                return False

            controller._step = step  # type: ignore[method-assign]
            controller._measure_step_cost = lambda seconds, steps: None  # type: ignore[method-assign]
            controller._step_cost_s = step_cost_s
            for _ in range(count):
                passes.append([])
                await controller.pass_once()
            return controller.recent_passes()

    return passes, asyncio.run(scenario())


def slowed_passes(store: Store, count: int) -> tuple[list[list[str]], list[PassRecord]]:
    """``recorded_passes`` on a machine slower than the controller estimates: one step at a time,
    each taking 0.05 s of a fake clock, against a budget of 0.12 s, while the estimate (0.001 s a
    step) would take them all; only the deadline stops a pass."""
    clock = [100.0]
    fake_time = SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0], time=time.time)

    def tick() -> None:
        clock[0] += 0.05

    with (
        patch("livemig.control.controller.PASS_BUDGET_S", 0.12),
        patch("livemig.control.controller.time", fake_time),
    ):
        return recorded_passes(store, count, concurrency=1, step_cost_s=0.001, on_step=tick)


def test_a_pass_acts_always_and_observes_what_fits_its_budget_longest_unobserved_first(tmp_path: Path) -> None:
    """Steps that act are never deferred; observations beyond the budget wait, and the ones left
    out are the first observed by the next pass, so every migration is observed in turn."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(2):
        store.add_migration(validating(i))
    for i in range(10, 16):
        store.add_migration(precopy(i))
    with patch("livemig.control.controller.OBSERVE_COST_S", 0.0):  # every observation due every pass
        # room for 4 steps a pass: 2 acting + 2 observing
        passes, records = recorded_passes(store, 4, concurrency=2, step_cost_s=PASS_BUDGET_S / 4)
    record = records[-1]
    assert (record.acting, record.stepped, record.deferred) == (2, 4, 4)
    acting = {"m00", "m01"}
    assert all(acting <= set(p) for p in passes)  # acting steps every pass
    observed = [sorted(set(p) - acting) for p in passes]
    assert all(len(o) == 2 for o in observed)
    assert sorted(m for o in observed[:3] for m in o) == [f"m{i}" for i in range(10, 16)]  # each once in turn
    assert observed[3] == observed[0]  # then the longest unobserved again


def test_a_pass_the_machine_slows_starts_no_observation_past_its_budget(tmp_path: Path) -> None:
    """The budget is also a deadline: an observation not started within it waits for the next
    pass, where it comes first; a concurrency's worth of acting steps is taken however late."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    store.add_migration(validating(0))
    for i in range(10, 16):
        store.add_migration(precopy(i))
    with patch("livemig.control.controller.OBSERVE_COST_S", 0.0):
        passes, records = slowed_passes(store, 2)
    assert [(r.acting, r.stepped, r.deferred) for r in records] == [(1, 3, 4)] * 2
    assert passes == [["m00", "m10", "m11"], ["m00", "m12", "m13"]]


def test_a_burst_of_acting_steps_is_spread_over_passes_cancels_first(tmp_path: Path) -> None:
    """Past a concurrency's worth, acting steps obey the deadline too: a burst of admissions (or
    of rollbacks) makes several short passes, each taking the longest unstepped first, and a
    cancel goes ahead of them all."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(8):
        store.add_migration(validating(i))
    store.request_cancel("m05")
    passes, records = slowed_passes(store, 4)
    assert [(r.acting, r.stepped, r.deferred) for r in records] == [(8, 3, 5)] * 4
    assert passes[0] == ["m05", "m00", "m01"]  # the cancel first, then in the order they came
    # the rest in turn (the cancel, which these fake steps never take, every pass), then round again
    assert [p[1:] for p in passes[1:]] == [["m02", "m03"], ["m04", "m06"], ["m07", "m00"]]


def _passes(count: int, *, deferred: int, ended: int, held: int = 900, start: float = 1000.0) -> list[PassRecord]:
    return [PassRecord(at=start + 0.5 * i, held=held, stepped=150, admitted=0, queued=0, seconds=0.5,
                       deferred=deferred, ended=ended) for i in range(count)]  # fmt: skip


def test_a_replica_measures_its_pace_only_while_its_passes_cannot_take_all_that_is_due() -> None:
    """The pace the wave planner bounds a wave by: migrations ended per second while the passes
    left due steps to the next ones. A replica with time to spare ends them as fast as QEMU does,
    which says nothing of its own pace."""
    busy = SimpleNamespace(passes=_passes(40, deferred=300, ended=3))  # 20 s of passes, 3 ended in each
    assert Controller.pace(busy, now=1020.0) == (6.0, 900)  # type: ignore[arg-type]
    idle = SimpleNamespace(passes=_passes(40, deferred=0, ended=3))
    assert Controller.pace(idle, now=1020.0) is None  # type: ignore[arg-type]
    few = SimpleNamespace(passes=_passes(40, deferred=300, ended=0))
    assert Controller.pace(few, now=1020.0) is None  # type: ignore[arg-type]
    # only the last minute counts: busy long ago, idle now
    old_then_idle = SimpleNamespace(passes=_passes(40, deferred=300, ended=3) + _passes(40, deferred=0, ended=3,
                                                                                       start=1100.0))  # fmt: skip
    assert Controller.pace(old_then_idle, now=1120.0) is None  # type: ignore[arg-type]


def test_a_pass_counts_the_migrations_it_ended_and_the_store_keeps_the_replicas_pace(tmp_path: Path) -> None:
    """A pass records how many of its steps ended a migration (what the pace is made of), and a
    replica's claim carries its pace to the store, which scales it to the replicas driving now."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(3):
        store.add_migration(validating(i))

    async def scenario() -> Controller:
        async with async_http() as http:
            controller = Controller(Services.build(store, http), replica="lmo-1")

            async def step(m: Migration) -> bool:
                if m.id != "m00":
                    m.transition(Phase.ABORTING, "no")
                    m.transition(Phase.ROLLING_BACK, "back")
                    m.transition(Phase.ABORTED, "rolled back")
                return True

            controller._step = step  # type: ignore[method-assign]
            await controller.pass_once()
            return controller

    controller = asyncio.run(scenario())
    assert controller.recent_passes()[-1].ended == 2
    assert store.lmo_pace(3600) is None  # measured by nobody yet
    store.claim("lmo-1", ttl_s=30, capacity=100, pace=(6.0, 900))
    store.claim("lmo-1", ttl_s=30, capacity=100)  # a pass without a measurement keeps the last one
    store.claim("lmo-2", ttl_s=30, capacity=100)
    store.claim("api-1", ttl_s=30, capacity=0)  # drives nothing
    pace = store.lmo_pace(3600)
    assert pace is not None and (pace.ended_per_s, pace.held, pace.replica) == (12.0, 1800, "lmo-1")
    assert store.lmo_pace(0) is None  # too old
