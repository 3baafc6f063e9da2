"""blockd's fault points, armed at run time through its API, on a real blockd process.

The stale write, made inside blockd: a source write is *held* at ``blockd.nbd.write`` (before the
fencing gate), the destination writes, the held write is released and meets the gate as it stands
then. With fencing it is rejected and counted; with the test-only unsafe switch it lands, which is
what proves the scenario produces a stale write at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from livemig.storage.fencing import UNSAFE_ENV
from livemig.storage.nbd import protocol as p
from livemig.testing.blockd import MIB, BlockdProcess

Factory = Callable[..., BlockdProcess]


def arm(blockd: BlockdProcess, **body: object) -> dict[str, object]:
    reply = blockd.api.post("/faults", json=body)
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def wait_waiting(blockd: BlockdProcess, arm_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arms = {a["id"]: a for a in blockd.api.get("/faults").json()["armed"]}
        if arms.get(arm_id, {}).get("waiting"):
            return
        time.sleep(0.02)
    raise AssertionError("the request did not reach the hold")


@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "unsafe-no-fencing"])
def test_a_held_source_write_released_after_the_destination_wrote(blockd_factory: Factory, fencing: bool) -> None:
    blockd = blockd_factory("faults", env=None if fencing else {UNSAFE_ENV: "1"})
    blockd.create_volume("vol", 4 * MIB)
    source = blockd.attach("vol", vm="web", host="A")
    dest = blockd.attach("vol", vm="web", host="B")
    with blockd.client(source) as src, blockd.client(dest) as dst:
        src.write(0, b"\x11" * 4096)  # the source VM writes normally before the migration
        hold = arm(blockd, point="blockd.nbd.write", action="hold", scope={"vm": "web", "host": "A"})
        handle = src.submit(p.Command.WRITE, 0, data=b"\xaa" * 4096)
        wait_waiting(blockd, str(hold["id"]))
        assert dst.read(0, 4096) == b"\x11" * 4096, "held: not applied"
        dst.write(0, b"\xbb" * 4096)  # switchover: the destination takes over as writer
        assert blockd.api.post(f"/faults/{hold['id']}/release").status_code == 200
        reply = src.receive()
        assert reply.handle == handle
        landed = dst.read(0, 4096)
    attachments = blockd.attachments("vol")
    firing = blockd.api.get("/faults/firings").json()[0]
    assert (firing["point"], firing["vm"], firing["host"], firing["action"]) == ("blockd.nbd.write", "web", "A", "hold")
    if fencing:
        assert reply.error == p.Errno.EPERM, "the stale write is rejected"
        assert landed == b"\xbb" * 4096
        assert attachments[source["id"]]["rejected_writes"] == 1
    else:
        assert reply.error == 0 and landed == b"\xaa" * 4096, "without fencing the stale write lands"


def test_error_and_delay_on_the_data_path_and_the_admin_api(blockd_factory: Factory) -> None:
    blockd = blockd_factory("errors")
    blockd.create_volume("vol", MIB)
    attachment = blockd.attach("vol", vm="web", host="A")
    with blockd.client(attachment) as client:
        arm(blockd, point="blockd.nbd.read", action="error", scope={"host": "A"})
        handle = client.submit(p.Command.READ, 0, 4096)
        reply = client.receive()
        assert (reply.handle, reply.error) == (handle, p.Errno.EIO)
        assert client.read(0, 4096) == bytes(4096), "count 1: the next read is served"
        arm(blockd, point="blockd.nbd.flush", action="delay", seconds=0.3)
        started = time.monotonic()
        client.flush()
        assert time.monotonic() - started >= 0.3
    arm(blockd, point="blockd.fence", action="error")
    refused = blockd.api.post(f"/attachments/{attachment['id']}/fence")
    assert refused.status_code == 500 and refused.json()["error"] == "InjectedFault"
    assert not blockd.attachments("vol")[attachment["id"]]["fenced"], "an error before the fence: not fenced"
    wrong = blockd.api.post("/faults", json={"point": "hostd.switchover", "action": "crash"})
    assert wrong.status_code == 422 and "blockd has no fault point" in wrong.json()["message"]


def test_crash_kills_blockd_and_the_firing_survives_it(blockd_factory: Factory, tmp_path) -> None:
    log_path = tmp_path / "blockd-faults.jsonl"
    blockd = blockd_factory("crash", env={"LIVEMIG_FAULT_LOG": str(log_path)})
    blockd.create_volume("vol", MIB)
    attachment = blockd.attach("vol", vm="web", host="A")
    arm(blockd, point="blockd.detach", action="crash")
    with pytest.raises(Exception):  # noqa: B017 - the connection dies with the process
        blockd.api.delete(f"/attachments/{attachment['id']}")
    assert blockd.proc is not None and blockd.proc.wait(10) == -9
    blockd.proc = None
    blockd.start()
    firings = blockd.api.get("/faults/firings").json()
    assert [f["point"] for f in firings] == ["blockd.detach"]
    assert not blockd.attachments("vol")[attachment["id"]]["detached"], "it crashed before it acted"
