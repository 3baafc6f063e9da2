"""The fencing state machine, without sockets: who may write, who is rejected, what persists."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from livemig.errors import Conflict, InvalidRequest, NotFound
from livemig.storage.fencing import Attachment, Decision, FenceRegistry


def write(registry: FenceRegistry, attachment: Attachment) -> bool:
    """One complete write-class request through the gate; True if it was admitted."""

    async def go() -> bool:
        admitted = await registry.begin_write(attachment)
        if admitted:
            registry.end_write(attachment)
        return admitted

    return asyncio.run(go())


@pytest.fixture
def registry(tmp_path: Path) -> FenceRegistry:
    return FenceRegistry(tmp_path / "attachments.json")


def test_first_write_makes_writer(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v", "vm", "A")
    assert registry.writer_of("v") is None
    assert registry.decide(a) is Decision.TAKEOVER
    assert write(registry, a)
    assert registry.writer_of("v") == a.id and registry.is_writer(a)
    assert registry.decide(a) is Decision.ALLOW


def test_newer_attachment_takes_over_and_stale_writes_are_rejected_and_counted(registry: FenceRegistry) -> None:
    source, _ = registry.attach("v", "vm", "A")
    dest, _ = registry.attach("v", "vm", "B")
    assert write(registry, source)
    assert write(registry, source)  # source keeps writing while the destination only reads
    assert registry.is_writer(source)
    assert write(registry, dest)  # destination's first write takes over
    assert registry.is_writer(dest) and not registry.is_writer(source)
    assert not write(registry, source)
    assert not write(registry, source)
    assert source.counters.rejected_writes == 2
    assert dest.counters.rejected_writes == 0
    assert registry.try_begin_write(source) is False
    assert source.counters.rejected_writes == 3
    assert registry.rejected_writes == 3, "blockd's own total (/metrics: livemig_blockd_fenced_writes_total)"


def test_older_attachment_never_takes_over(registry: FenceRegistry) -> None:
    source, _ = registry.attach("v", "vm", "A")
    dest, _ = registry.attach("v", "vm", "B")
    assert write(registry, dest)  # destination writes first
    assert not write(registry, source)
    assert registry.is_writer(dest)


def test_volumes_are_independent(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v1", "vm", "A")
    b, _ = registry.attach("v2", "vm", "B")
    assert write(registry, b)
    assert write(registry, a)
    assert registry.writer_of("v1") == a.id and registry.writer_of("v2") == b.id


def test_explicit_fence(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v", "vm", "A")
    assert write(registry, a)
    asyncio.run(registry.fence(a.id, "operator said so"))
    assert a.fenced and a.fence_reason == "operator said so"
    assert not write(registry, a)
    assert a.counters.rejected_writes == 1
    asyncio.run(registry.fence(a.id))  # idempotent
    b, _ = registry.attach("v", "vm", "B")
    assert write(registry, b)
    assert not write(registry, a)


def test_fenced_newer_attachment_never_becomes_writer(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    assert write(registry, a)
    asyncio.run(registry.fence(b.id))
    assert not write(registry, b)
    assert registry.is_writer(a)
    assert write(registry, a)


def test_detached_never_writer_again(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    assert write(registry, b)
    asyncio.run(registry.detach(b.id))
    asyncio.run(registry.detach(b.id))  # idempotent
    assert not write(registry, b)
    # the writer's generation never goes down: the older source cannot win back either
    assert not write(registry, a)
    c, _ = registry.attach("v", "vm", "C")
    assert write(registry, c)
    with pytest.raises(Conflict):
        asyncio.run(registry.fence(b.id))


def test_reads_are_not_gated(registry: FenceRegistry) -> None:
    """The gate is only for write-class requests: a fenced attachment still has no read gate at all."""
    a, _ = registry.attach("v", "vm", "A")
    asyncio.run(registry.fence(a.id))
    assert a.counters.reads == 0 and a.counters.rejected_writes == 0


def test_state_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "attachments.json"
    registry = FenceRegistry(path)
    a, secret_a = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    c, _ = registry.attach("v", "vm", "C")
    assert write(registry, a)
    assert write(registry, b)
    asyncio.run(registry.fence(c.id))

    again = FenceRegistry(path)
    a2, b2, c2 = (again.get(x.id) for x in (a, b, c))
    assert again.writer_of("v") == b.id
    assert c2.fenced
    assert not write(again, a2)  # still stale after restart
    assert not write(again, c2)  # still fenced
    assert write(again, b2)
    assert again.check_secret(a2, secret_a) and not again.check_secret(a2, "wrong")
    d, _ = again.attach("v", "vm", "D")
    assert d.generation > c.generation  # generations keep increasing across restarts


def test_a_fence_or_detach_whose_save_failed_is_acknowledged_only_once_it_persists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk fails the save: the call errs (the LMO retries), the fence or detach holds in
    memory meanwhile, and the retry saves it before answering. Found by the chaos matrix: a detach
    that met a full disk was answered on its retry from the flag in memory, never written, and
    the attachment was back after blockd restarted."""
    path = tmp_path / "attachments.json"
    registry = FenceRegistry(path)
    a, _ = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    state = registry._state
    assert state is not None
    real_save = state.save
    full = [True]

    def save(data: dict[str, object]) -> None:
        if full[0]:
            raise OSError(28, "No space left on device")
        real_save(data)

    monkeypatch.setattr(state, "save", save)
    for call in (lambda: registry.fence(a.id), lambda: registry.detach(b.id)):
        with pytest.raises(OSError):
            asyncio.run(call())
    assert a.fenced and b.detached  # in effect at once: no write of theirs is admitted meanwhile
    assert not write(registry, a) and not write(registry, b)
    full[0] = False
    asyncio.run(registry.fence(a.id))
    asyncio.run(registry.detach(b.id))
    again = FenceRegistry(path)
    assert again.get(a.id).fenced and again.get(b.id).detached


def test_takeover_waits_for_older_writes_in_flight(registry: FenceRegistry) -> None:
    """An older write already admitted must land before the newer writer's first write is applied."""
    a, _ = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    order: list[str] = []

    async def scenario() -> None:
        assert await registry.begin_write(a)  # A's write is in flight (e.g. in the thread pool)

        async def b_writes(tag: str) -> None:
            assert await registry.begin_write(b)
            order.append(tag)
            registry.end_write(b)

        first = asyncio.create_task(b_writes("b1"))
        await asyncio.sleep(0.01)
        assert registry.is_writer(b)  # takeover happened (and was persisted) ...
        second = asyncio.create_task(b_writes("b2"))  # ... and B's later writes queue behind the barrier
        await asyncio.sleep(0.01)
        assert order == []  # ... but nothing of B is applied while A's write is in flight
        assert registry.try_begin_write(a) is False  # new writes from A are rejected meanwhile
        assert registry.try_begin_write(b) is None  # inline path must take the slow path during the barrier
        order.append("a")
        registry.end_write(a)
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert order[0] == "a" and sorted(order[1:]) == ["b1", "b2"]


def test_fence_waits_for_writes_in_flight(registry: FenceRegistry) -> None:
    a, _ = registry.attach("v", "vm", "A")

    async def scenario() -> list[str]:
        events: list[str] = []
        assert await registry.begin_write(a)
        fence = asyncio.create_task(registry.fence(a.id))
        await asyncio.sleep(0.01)
        assert not fence.done()
        events.append("write landed")
        registry.end_write(a)
        await fence
        events.append("fence returned")
        return events

    assert asyncio.run(scenario()) == ["write landed", "fence returned"]


def test_unsafe_switch_allows_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_BLOCKD_UNSAFE_NO_FENCING", "1")
    from livemig.storage.fencing import fencing_enabled_from_env

    registry = FenceRegistry(tmp_path / "s.json", enabled=fencing_enabled_from_env())
    a, _ = registry.attach("v", "vm", "A")
    b, _ = registry.attach("v", "vm", "B")
    assert write(registry, b)
    assert write(registry, a)  # the stale write gets through: this is what fencing prevents
    assert a.counters.rejected_writes == 0


def test_bad_input(registry: FenceRegistry) -> None:
    with pytest.raises(InvalidRequest):
        registry.attach("v", " ", "A")
    with pytest.raises(NotFound):
        registry.get("nope")
    a, _ = registry.attach("v", "vm", "A")
    with pytest.raises(Conflict):
        registry.forget_volume("v")
    asyncio.run(registry.detach(a.id))
    registry.forget_volume("v")
    with pytest.raises(NotFound):
        registry.get(a.id)
