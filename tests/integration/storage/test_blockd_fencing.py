"""Fencing with real clients: a stale source write, held back by the fault-point proxy, must not land.

The same scenario runs with the test-only unsafe switch, where the stale write *does* land: that
proves the scenario really produces a stale write, so the fenced variant passing means something.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from livemig.storage.fencing import UNSAFE_ENV
from livemig.storage.nbd.client import NbdError
from livemig.storage.nbd.protocol import Errno
from livemig.testing.blockd import MIB, BlockdProcess
from livemig.testing.nbdproxy import ThreadedHoldingProxy

pytestmark = pytest.mark.usefixtures("real_clients")
Factory = Callable[..., BlockdProcess]


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)


def volume_bytes(blockd: BlockdProcess, name: str, length: int) -> bytes:
    with open(blockd.data_dir / "volumes" / f"{name}.vol", "rb") as f:
        return f.read(length)


@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "unsafe-no-fencing"])
def test_stale_source_write_after_destination_write(blockd_factory: Factory, fencing: bool) -> None:
    blockd = blockd_factory("fence", env=None if fencing else {UNSAFE_ENV: "1"})
    blockd.create_volume("mig", 4 * MIB)
    source = blockd.attach("mig", vm="web", host="A")
    dest = blockd.attach("mig", vm="web", host="B")
    assert qemu_io(source["nbd_uri"], "write -P 0x11 0 1M").returncode == 0  # the source VM runs normally

    with ThreadedHoldingProxy("127.0.0.1", blockd.nbd_port) as proxy:
        proxy.arm()
        stale = subprocess.Popen(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xaa 0 64k",
                f"nbd://127.0.0.1:{proxy.port}/{source['export_name']}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        held = proxy.wait_held(30)
        assert held is not None and (held.offset, held.length) == (0, 64 * 1024), "source write was not held"
        # switchover: the destination writes first
        assert qemu_io(dest["nbd_uri"], "write -P 0xbb 0 64k").returncode == 0
        proxy.release()
        stale_out, _ = stale.communicate(timeout=30)

    attachments = blockd.attachments("mig")
    on_disk = volume_bytes(blockd, "mig", 64 * 1024)
    with blockd.client(dest) as client:
        via_nbd = client.read(0, 64 * 1024)
    assert on_disk == via_nbd
    if fencing:
        assert stale.returncode != 0 and "Operation not permitted" in stale_out, stale_out
        assert on_disk == b"\xbb" * 64 * 1024, "the volume must hold exactly what the destination wrote"
        assert attachments[source["id"]]["rejected_writes"] == 1
        assert attachments[dest["id"]]["rejected_writes"] == 0
        assert attachments[dest["id"]]["is_writer"] and not attachments[source["id"]]["is_writer"]
        assert "rejected write #1 from stale attachment" in blockd.log_text()
        # reads from the stale source stay allowed
        assert "Pattern verification failed" not in qemu_io(source["nbd_uri"], "read -P 0xbb 0 64k").stdout
    else:
        assert stale.returncode == 0, stale_out
        assert on_disk == b"\xaa" * 64 * 1024, "without fencing the stale write lands (the corruption fencing stops)"
        assert attachments[source["id"]]["rejected_writes"] == 0


def test_explicit_fence_and_detach(blockd: BlockdProcess) -> None:
    blockd.create_volume("fx", MIB)
    att = blockd.attach("fx", vm="db", host="A")
    assert qemu_io(att["nbd_uri"], "write -P 0x42 0 4k").returncode == 0
    with blockd.client(att) as client:
        client.write(0, b"\x43" * 512)
        reply = blockd.api.post(f"/attachments/{att['id']}/fence")
        assert reply.status_code == 200 and reply.json()["fenced"]
        with pytest.raises(NbdError) as refused:
            client.write(0, b"\x44" * 512)
        assert refused.value.error == Errno.EPERM
        with pytest.raises(NbdError):
            client.trim(0, 4096)
        with pytest.raises(NbdError):
            client.write_zeroes(0, 4096)
        assert client.read(0, 512) == b"\x43" * 512  # reads stay allowed
    assert "Operation not permitted" in qemu_io(att["nbd_uri"], "write -P 0x45 0 4k").stdout
    status = blockd.attachments("fx")[att["id"]]
    assert status["fenced"] and status["rejected_writes"] == 3 + 1

    # detach drops open connections and refuses new ones
    client = blockd.client(att)
    assert blockd.api.delete(f"/attachments/{att['id']}").status_code == 204
    with pytest.raises((ConnectionError, OSError)):
        client.read(0, 512)
    client.sock.close()
    again = qemu_io(att["nbd_uri"], "read 0 512")
    assert again.returncode != 0 and "detached" in again.stderr + again.stdout


def test_fencing_state_survives_restart(blockd_factory: Factory) -> None:
    blockd = blockd_factory("restart")
    blockd.create_volume("r", MIB)
    source = blockd.attach("r", host="A")
    dest = blockd.attach("r", host="B")
    with blockd.client(source) as client:
        client.write(0, b"s" * 512)
    with blockd.client(dest) as client:
        client.write(0, b"d" * 512)
        client.flush()
    blockd.kill9()
    blockd.start()
    status: dict[str, Any] = blockd.attachments("r")
    assert status[dest["id"]]["is_writer"]
    with blockd.client(source) as client:
        with pytest.raises(NbdError) as refused:
            client.write(0, b"s" * 512)
        assert refused.value.error == Errno.EPERM
        assert client.read(0, 512) == b"d" * 512
