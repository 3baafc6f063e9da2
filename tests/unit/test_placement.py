"""Placement claims room on a worker thread (so the LMO's other requests go on meanwhile); a
request cancelled while the claim runs must not keep the room: the thread finishes the claim, and
it is given back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from livemig.control.placement import place_and_start
from livemig.control.store import Store
from livemig.errors import NotFound
from livemig.model import VmSpec
from livemig.model.host import HostRegistration


def test_a_request_cancelled_while_its_room_is_claimed_gives_the_room_back(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    store.upsert_host(HostRegistration(name="A", api_url="http://a:1", migration_address="10.0.0.1",
                                       memory_mib=4096, memory_used_mib=0))  # fmt: skip
    claiming, release = threading.Event(), threading.Event()
    place_vm = store.place_vm

    def slow_place_vm(*args: Any, **kwargs: Any) -> HostRegistration:
        claiming.set()
        release.wait(10)
        return place_vm(*args, **kwargs)

    store.place_vm = slow_place_vm  # type: ignore[method-assign]
    started: list[str] = []

    async def start(host: str) -> str:
        started.append(host)
        return host

    async def cancel_while_claiming() -> None:
        request = asyncio.create_task(place_and_start(SimpleNamespace(store=store), VmSpec(name="vm1", memory_mib=1024),
                                                      None, start))  # type: ignore[arg-type]  # fmt: skip
        await asyncio.to_thread(claiming.wait, 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        release.set()  # the thread claims the room only now, after the request was cancelled
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.capacity("A").placed_mib == 0:
                return

    asyncio.run(cancel_while_claiming())
    assert started == [], "the VM was never started"
    with pytest.raises(NotFound):
        store.vm("vm1")
    assert store.capacity("A").placed_mib == 0, "the room claimed after the cancel was given back"
