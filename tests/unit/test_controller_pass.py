"""A controller pass at scale: it holds only its replica's fair part of the active migrations, and
steps them concurrently, never more than its bound at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from livemig.control.controller import Controller
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.model import Migration, Phase
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
