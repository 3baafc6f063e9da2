"""A real QEMU guest (TCG) formats a blockd volume through QEMU's NBD client; the host then checks it."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from livemig.errors import LivemigError
from livemig.guest.image import default_cache_dir
from livemig.testing.blockd import MIB, BlockdProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("real_clients")]
MARKER = b"LIVEMIG-BLOCKD-GUEST-MARKER"


def guest_image() -> tuple[Path, Path]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    try:
        from livemig.guest.image import build_image
    except ImportError:
        pytest.skip("livemig.guest is not available")
    cache = default_cache_dir()
    try:
        image = build_image(cache)
    except (LivemigError, OSError) as exc:
        pytest.skip(f"guest image unavailable: {exc}")
    return image.kernel, image.initrd


class Console:
    """The guest's serial console on QEMU's stdio, read by a thread so waits can time out."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip())

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"guest never printed {text!r}; console:\n" + "\n".join(self.seen[-40:]))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()


def test_guest_formats_a_volume_over_nbd(blockd: BlockdProcess) -> None:
    kernel, initrd = guest_image()
    blockd.create_volume("guestdisk", 64 * MIB)
    att = blockd.attach("guestdisk", vm="guest", host="local")
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet livemig.workload=off",
            "-drive", f"file={att['nbd_uri']},format=raw,if=virtio,cache=writeback,discard=unmap",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    console = Console(proc)
    try:
        console.wait_for("LIVEMIG SHELL", 120)
        time.sleep(0.5)
        console.send(
            "mke2fs -q /dev/vda && echo " + MARKER.decode()
            + " | dd of=/dev/vda bs=512 seek=65536 conv=fsync 2>/dev/null && sync && echo GUEST-DONE-$((6*7))"
        )  # fmt: skip
        console.wait_for("GUEST-DONE-42", 120)
        console.send("poweroff -f")
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    status = blockd.attachments("guestdisk")[att["id"]]
    assert status["writes"] > 0 and status["flushes"] > 0 and status["is_writer"]
    with blockd.client(att) as client:
        superblock = client.read(1024, 1024)
        assert superblock[56:58] == b"\x53\xef", "no ext2 superblock: the guest's mke2fs did not reach the volume"
        assert client.read(65536 * 512, len(MARKER)) == MARKER
