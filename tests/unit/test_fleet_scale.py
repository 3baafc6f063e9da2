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
from collections.abc import Iterable
from pathlib import Path

import httpx

from livemig.control.api import create_app
from livemig.control.services import Registrations
from livemig.control.store import Store
from livemig.model import VmSpec
from livemig.model.host import HostRegistration
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet
from livemig.wire import timing

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


def test_creating_a_vm_and_a_migration_reads_no_host_registration_on_its_own(tmp_path: Path) -> None:
    """The API's two busiest calls at scale call hosts whose registrations they have just read
    with the rows they needed anyway (the placement's claim, the pre-flight's facts): with 10,000
    hosts a replica's cache of registrations mostly misses, and each miss was one more round trip
    to the store on the event loop (two on PostgreSQL, with its liveness ping)."""
    lmo = Lmo(tmp_path / "lmo", 4)
    lookups: list[str] = []
    host = lmo.store.host

    def counted(name: str) -> HostRegistration:
        lookups.append(name)
        return host(name)

    lmo.store.host = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        async with lmo.app.router.lifespan_context(lmo.app), lmo.client("http://lmo") as client:
            await lmo.create(client, "vm1")
            source = lmo.store.vm("vm1")[1]
            destination = next(h for h in lmo.fleet.hosts if h != source)
            reply = await client.post("/migrations", json={"vm": "vm1", "destination": destination})
            assert reply.status_code == 201, reply.text

    asyncio.run(scenario())
    assert lookups == []


def test_a_pass_reads_the_registrations_it_lacks_in_one_query(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for i in range(5):
        store.upsert_host(HostRegistration(name=f"h{i}", api_url=f"http://h{i}:1", migration_address="10.0.0.1"))
    registrations = Registrations(store, ttl_s=30.0)
    queries: list[set[str]] = []
    hosts_named = store.hosts_named

    def counted(names: Iterable[str]) -> dict[str, HostRegistration]:
        queries.append(set(names))
        return hosts_named(names)

    store.hosts_named = counted  # type: ignore[method-assign]
    store.host = None  # type: ignore[assignment,method-assign]  # a single read would fail the test
    registrations.prefetch(["h0", "h1", "h2"])
    registrations.prefetch(["h1", "h2", "h3", "unknown"])  # only what it lacks
    assert queries == [{"h0", "h1", "h2"}, {"h3", "unknown"}]
    assert [registrations.get(f"h{i}").api_url for i in range(4)] == [f"http://h{i}:1" for i in range(4)]
    registrations.ttl_s = 0.0  # all held too long now: read again, still in one query
    registrations.prefetch(["h0", "h3"])
    assert queries[-1] == {"h0", "h3"}


def test_an_answer_says_where_its_time_went(tmp_path: Path) -> None:
    """Server-Timing: creating a VM spends its time in the store, in the host's hostd, and in the
    LMO itself; the parts come back with the answer (errors too), so a slow call says which of
    them was slow. The store and the host are called one after the other: their sum is within
    the total."""
    lmo = Lmo(tmp_path / "lmo", 4)
    answers: list[httpx.Response] = []

    async def scenario() -> None:
        async with lmo.app.router.lifespan_context(lmo.app), lmo.client("http://lmo") as client:
            for name in ("vm1", "vm1"):  # the second: a taken name
                answers.append(await client.post("/vms", json={"spec": VmSpec(name=name, memory_mib=512).model_dump()}))

    asyncio.run(scenario())
    created, refused = (timing.parse(a.headers["server-timing"]) for a in answers)
    assert answers[0].status_code == 201 and answers[1].status_code == 409
    assert set(created) == {"store", "hostd", "total"} and min(created.values()) > 0
    assert created["store"] + created["hostd"] <= created["total"] + 0.2  # rounded to 0.1 ms each
    assert set(refused) == {"store", "total"}  # refused by the store, before any host was called


def test_timing_outside_a_request_costs_nothing_and_the_header_reads_back() -> None:
    with timing.timed("store"):  # the controller's work: no request, nothing recorded, no error
        pass
    assert timing.CURRENT.get() is None
    recorded = timing.RequestTiming()
    recorded.add("store", 0.0021)
    recorded.add("store", 0.001)
    recorded.add("hostd", 0.0314)
    parsed = timing.parse(recorded.header())
    assert parsed["store"] == 3.1 and parsed["hostd"] == 31.4 and parsed["total"] >= 0
    assert timing.parse('cache;desc="Cache Read";dur=23.2, miss, db;dur=x') == {"cache": 23.2}
