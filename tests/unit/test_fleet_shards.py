"""The fleet simulator's shards: a migration stream from one shard's simulated QEMU to another's.

Two fleets stand for two shards of a four-host fleet, in one process: each serves its hosts'
stream routes, and each shard's client reaches the other's app in-process by its port, as over
loopback. What crosses is what QEMU's stream meets of its destination: the handshake (refusals
included) and the resume at the end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from livemig.host.qemu import VmPaths
from livemig.model.vm import RunState
from livemig.testing.fakehost import FakeFleet
from livemig.testing.fakeqemu import MIB, FakeQemu, QemuBehaviour
from livemig.testing.fleetshards import ShardMap, ShardStreams, add_stream_routes, address_of, index_of

SHARDS = ShardMap(hosts=4, shards=2, host="127.0.0.1", base_port=7000)


class Shards:
    #: what the transport does to the next resume ("refuse": it never reaches the other shard;
    #: "lose the answer": it does, and its answer is lost on the way back)
    accept_fault: str | None = None

    def __init__(self, tmp: Path) -> None:
        self.streams = [ShardStreams(SHARDS, shard) for shard in range(2)]
        self.fleets = [FakeFleet(state_dir=tmp / f"shard{s}", speed=200, tls=False, insecure=True,
                                 remote=self.streams[s]) for s in range(2)]  # fmt: skip
        for fleet in self.fleets:
            add_stream_routes(fleet.app, fleet.world)
        routes = {SHARDS.base_port + s: httpx.ASGITransport(app=f.app) for s, f in enumerate(self.fleets)}

        async def route(request: httpx.Request) -> httpx.Response:
            fault = self.accept_fault if request.url.path.endswith("/accept") else None
            if fault == "refuse":
                raise httpx.ConnectError("Connection refused", request=request)
            reply = await routes[request.url.port or 80].handle_async_request(request)
            if fault == "lose the answer":
                raise httpx.ReadError("Connection reset by peer", request=request)
            return reply

        self.http = httpx.AsyncClient(transport=httpx.MockTransport(route))
        for streams in self.streams:
            streams.http = self.http
        self.tmp = tmp

    def qemu(self, shard: int, index: int, incoming: bool) -> FakeQemu:
        paths = VmPaths(self.tmp / f"vm-{shard}-{index}-{incoming}")
        paths.root.mkdir(parents=True)
        return self.fleets[shard].world.start("vm", paths, 256 * MIB, incoming, QemuBehaviour(), address_of(index))

    async def listening(self, shard: int, index: int) -> tuple[FakeQemu, str]:
        qemu = self.qemu(shard, index, incoming=True)
        await qemu.execute("migrate-incoming", {"uri": f"tcp:{address_of(index)}:0"})
        assert qemu.listening is not None
        return qemu, qemu.listening


async def ended(qemu: FakeQemu) -> dict[str, object]:
    for _ in range(500):
        if qemu.migration.get("status") in ("completed", "failed", "cancelled"):
            return qemu.migration
        await asyncio.sleep(0.01)
    raise AssertionError(f"the migration did not end: {qemu.migration}")


async def migrate_across(shards: Shards) -> tuple[FakeQemu, FakeQemu, dict[str, object]]:
    """A guest on shard 0's first host migrated to shard 1's last: the source, the destination, and
    the source's migration as it ended."""
    destination, uri = await shards.listening(1, 3)
    source = shards.qemu(0, 0, incoming=False)
    await source.execute("migrate-set-parameters", {"max-bandwidth": 1024 * MIB})
    await source.execute("migrate", {"uri": uri})
    return source, destination, await ended(source)


def test_the_shard_map_names_each_hosts_shard_from_its_address() -> None:
    assert [list(SHARDS.indices(s)) for s in range(2)] == [[0, 1], [2, 3]]
    assert [index_of(address_of(i)) for i in (0, 249, 250, 9999)] == [0, 249, 250, 9999]
    assert SHARDS.peer_of(f"tcp:{address_of(3)}:49152") == 1
    assert SHARDS.peer_of(f"tcp:{address_of(1)}:49152") == 0
    # not a simulated host's address, or beyond the fleet: no shard (the connection is refused)
    assert SHARDS.peer_of("tcp:10.0.0.1:49152") is None and SHARDS.peer_of(f"tcp:{address_of(4)}:1") is None
    assert SHARDS.url(1) == "http://127.0.0.1:7001"


def test_a_stream_crosses_to_another_shards_destination_which_resumes(tmp_path: Path) -> None:
    shards = Shards(tmp_path)

    async def scenario() -> None:
        async with shards.http:
            source, destination, migration = await migrate_across(shards)
            assert migration["status"] == "completed"
            assert source.runstate is RunState.POSTMIGRATE
            assert destination.runstate is RunState.RUNNING and not shards.fleets[1].world.listening

    asyncio.run(scenario())


@pytest.mark.parametrize("case", ["nobody listens", "multifd on one side only"])
def test_a_stream_another_shard_refuses_fails_the_source_as_qemu_does(tmp_path: Path, case: str) -> None:
    shards = Shards(tmp_path)

    async def scenario() -> None:
        async with shards.http:
            destination, uri = await shards.listening(1, 2)
            if case == "nobody listens":
                await destination.execute("quit", {})
            else:
                await destination.execute("migrate-set-capabilities",
                                          {"capabilities": [{"capability": "multifd", "state": True}]})  # fmt: skip
            source = shards.qemu(0, 1, incoming=False)
            await source.execute("migrate", {"uri": uri})
            migration = await ended(source)
            assert migration["status"] == "failed"
            wanted = "Connection refused" if case == "nobody listens" else "multifd is off here but on"
            assert wanted in str(migration["error-desc"])
            assert source.runstate is RunState.RUNNING

    asyncio.run(scenario())


def test_a_destination_gone_before_the_last_state_fails_the_source_which_runs_on(tmp_path: Path) -> None:
    """The destination's shard answered the handshake, then its QEMU exited: the resume finds
    nobody, and the source fails and runs its guest again (it had stopped it for the switchover)."""
    shards = Shards(tmp_path)

    async def scenario() -> None:
        async with shards.http:
            destination, uri = await shards.listening(1, 3)
            end = await shards.streams[0].connect(uri)
            assert end is not None and end.alive
            await destination.execute("quit", {})
            assert not await end.accept()
            source = shards.qemu(0, 0, incoming=False)
            pause = {"capabilities": [{"capability": "pause-before-switchover", "state": True}]}
            await source.execute("migrate-set-capabilities", pause)
            other, uri = await shards.listening(1, 2)
            await source.execute("migrate", {"uri": uri})
            for _ in range(500):
                if source.migration.get("status") == "pre-switchover":
                    break
                await asyncio.sleep(0.01)
            assert source.runstate is RunState.FINISH_MIGRATE
            await other.execute("quit", {})
            await source.execute("migrate-continue", {"state": "pre-switchover"})
            migration = await ended(source)
            assert migration["status"] == "failed" and "Connection reset" in str(migration["error-desc"])
            assert source.runstate.value == "running"  # stopped for the switchover, running again

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["refuse", "lose the answer"])
def test_a_resume_the_transport_breaks_leaves_the_guest_running_on_exactly_one_side(tmp_path: Path, fault: str) -> None:
    """The other shard cannot be reached for the resume: the last state cannot have arrived, the
    source fails and runs on. The resume reached it but its answer was lost: the state was
    written, the source completes (as QEMU's does once it has sent it) and the destination runs.
    Either way exactly one of the two runs the guest, and the migration ends."""
    shards = Shards(tmp_path)
    shards.accept_fault = fault

    async def scenario() -> None:
        async with shards.http:
            source, destination, migration = await migrate_across(shards)
            if fault == "refuse":
                assert migration["status"] == "failed" and "Connection reset" in str(migration["error-desc"])
                assert source.runstate is RunState.RUNNING and destination.runstate is not RunState.RUNNING
            else:
                assert migration["status"] == "completed"
                assert source.runstate is RunState.POSTMIGRATE and destination.runstate is RunState.RUNNING

    asyncio.run(scenario())
