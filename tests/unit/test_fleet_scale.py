"""Scale stays honest: creating a VM costs about the same with 1,000 simulated hosts as with 10.

The LMO app runs in-process against the fake fleet (the real hostd over simulated QEMU). Creates
alternate between the two fleets so the machine's noise hits both alike, and medians are
compared: an O(hosts) step per create (asking every host, reading every host's registration) is
tens of times slower with 1,000 hosts, an O(hosts²) one hopeless; the bound allows 2.5x.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import VmSpec
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet

CREATES = 40


class Lmo:
    def __init__(self, tmp: Path, hosts: int) -> None:
        tmp.mkdir()
        self.fleet = FakeFleet(*[f"h{i:04d}" for i in range(hosts)], memory_mib=65536, state_dir=tmp / "fleet",
                               record_calls=False, tls=False)  # fmt: skip
        self.store = Store(f"sqlite:///{tmp / 'lmo.db'}")
        for host in self.fleet.hosts.values():
            self.store.upsert_host(host.registration())
        self.app = create_app(self.store, controller_interval_s=0.1, transport=self.fleet.transport())
        self.times: list[float] = []

    def client(self, base_url: str) -> httpx.AsyncClient:
        """An admin reaching this LMO in-process, as over TLS."""
        transport = httpx.ASGITransport(app=lmo_over_tls(self.app))
        return httpx.AsyncClient(transport=transport, base_url=base_url, headers=bearer(self.store))

    async def create(self, client: httpx.AsyncClient, name: str) -> None:
        started = time.perf_counter()
        reply = await client.post("/vms", json={"spec": VmSpec(name=name, memory_mib=512).model_dump()})
        self.times.append(time.perf_counter() - started)
        assert reply.status_code == 201, reply.text


def test_creating_a_vm_does_not_grow_with_the_fleet(tmp_path: Path) -> None:
    small, large = Lmo(tmp_path / "small", 10), Lmo(tmp_path / "large", 1000)

    async def scenario() -> None:
        async with (
            small.app.router.lifespan_context(small.app),
            large.app.router.lifespan_context(large.app),
            small.client("http://small") as to_small,
            large.client("http://large") as to_large,
        ):
            for i in range(5):  # warm both up (imports, first connections, caches)
                await small.create(to_small, f"warm{i}")
                await large.create(to_large, f"warm{i}")
            small.times.clear()
            large.times.clear()
            for i in range(CREATES):
                await small.create(to_small, f"vm{i}")
                await large.create(to_large, f"vm{i}")

    asyncio.run(scenario())
    ratio = statistics.median(large.times) / statistics.median(small.times)
    assert ratio < 2.5, f"create VM: median {statistics.median(large.times) * 1000:.1f} ms with 1,000 hosts vs " \
                        f"{statistics.median(small.times) * 1000:.1f} ms with 10"  # fmt: skip
    placed = [h for h in large.fleet.hosts.values() if h.agent.vms]
    assert len(placed) == CREATES + 5, "each VM went to the most free host: all on different hosts"
