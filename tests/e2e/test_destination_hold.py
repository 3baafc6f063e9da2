"""What the LMO's hold of a destination relies on, checked against the real QEMU: ``stop`` while
``inmigrate`` is accepted and keeps the guest from starting once the migration's last state is
loaded (``paused``, never ``running``), and a source that completed the migration (``postmigrate``)
runs again on ``cont``. The fake QEMU of the unit tests (``testing/fakeqemu.py``) does the same."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QEMU = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]


async def _status(qmp: QMPClient) -> str:
    return str((await qmp.execute("query-status"))["status"])  # type: ignore[index]


def test_a_held_incoming_qemu_loads_the_guest_paused_and_the_source_runs_again(tmp_path: Path) -> None:
    assert shutil.which(QEMU[0]), "bootstrap installs qemu-system-x86"
    source = subprocess.Popen([*QEMU, "-qmp", f"unix:{tmp_path}/src.sock,server=on,wait=off"])
    destination = subprocess.Popen(
        [*QEMU, "-incoming", "defer", "-qmp", f"unix:{tmp_path}/dst.sock,server=on,wait=off"]
    )

    async def scenario() -> None:
        src, dst = QMPClient("source"), QMPClient("destination")
        for qmp, sock in ((src, "src.sock"), (dst, "dst.sock")):
            for _ in range(100):
                if (tmp_path / sock).exists():
                    break
                await asyncio.sleep(0.05)
            await qmp.connect(str(tmp_path / sock))
        assert await _status(dst) == "inmigrate"
        await dst.execute("stop")  # the hold
        assert await _status(dst) == "inmigrate"
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        status = ""
        for _ in range(300):
            status = str((await src.execute("query-migrate"))["status"])  # type: ignore[index]
            if status in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        assert status == "completed"
        assert await _status(src) == "postmigrate"
        for _ in range(50):  # the destination finishes loading: paused, never running
            if await _status(dst) != "inmigrate":
                break
            await asyncio.sleep(0.1)
        assert await _status(dst) == "paused"
        await src.execute("cont")
        assert await _status(src) == "running"
        for qmp in (src, dst):
            await qmp.disconnect()

    try:
        asyncio.run(scenario())
    finally:
        for proc in (source, destination):
            proc.kill()
            proc.wait()
