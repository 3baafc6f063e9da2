"""The guest image boots under real QEMU (TCG) and its workload keeps its console contract.

Why end to end: the image is only useful if the kernel, the modules, busybox, /init and the
workload cooperate inside a real VM, and the migration tests rely on the exact console lines
(READY, HB, CHECK, RATE) and on ``check`` really failing when memory is wrong. Each test boots
its own small VM and talks to the serial console over QEMU's unix socket.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from livemig.guest.image import GuestImage, build_image, default_cache_dir, kernel_cmdline

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 90.0  # TCG boots in ~3 s here; leave room for a loaded CI machine
READY = re.compile(r"^LIVEMIG READY wss_mib=(\d+) rate_mib_s=(\d+) pages=(\d+)$")
HB = re.compile(r"^LIVEMIG HB seq=(\d+) uptime_ms=(\d+) dirtied_mib=(\d+) live_errors=(\d+)$")


def image_cache() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(image_cache())


class Guest:
    """One QEMU guest with its serial console on a unix socket, read line by line in a thread.

    A client must keep reading the console socket: if it stopped, QEMU would stop draining the
    guest's UART and the workload would block on its next line.
    """

    def __init__(self, workdir: Path, image: GuestImage, append: str, memory_mib: int = 512,
                 extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.workdir = workdir
        self.console_sock = workdir / "console.sock"
        self.console_log = workdir / "console.log"
        argv = [
            QEMU, "-accel", "tcg", "-machine", "q35", "-m", str(memory_mib), "-nodefaults", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-chardev", f"socket,id=ser0,path={self.console_sock},server=on,wait=off,logfile={self.console_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
            *extra_args,
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._sock = self._connect()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise AssertionError(f"QEMU exited with {self.proc.returncode}: {out}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.console_sock))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *complete, buf = buf.split(b"\n")
            with self._cond:
                self.lines.extend(line.decode(errors="replace").strip("\r") for line in complete)
                self._cond.notify_all()

    def mark(self) -> int:
        """Index of the next line: wait_for(after=mark) ignores everything printed before."""
        with self._cond:
            return len(self.lines)

    def send(self, line: str) -> int:
        mark = self.mark()
        self._sock.sendall(line.encode() + b"\n")
        return mark

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        """The first line at index ``after`` or later matching ``pattern`` (waits up to ``timeout``)."""
        return self.wait_for_index(pattern, timeout, after)[1]

    def wait_for_index(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, after: int = 0
    ) -> tuple[int, re.Match[str]]:
        """Like :meth:`wait_for`, plus the index of the matching line."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = after
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return index - 1, match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(
                        f"no console line matching {regex.pattern!r} in {timeout}s; last lines:\n{tail}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def command(self, line: str, reply: str, timeout: float = 30.0) -> re.Match[str]:
        return self.wait_for(reply, timeout, after=self.send(line))

    def heartbeats(self, count: int, timeout: float = 30.0) -> list[tuple[int, int, int, int]]:
        """The next ``count`` heartbeats as (seq, uptime_ms, dirtied_mib, live_errors)."""
        after = self.mark()
        beats = []
        for _ in range(count):
            index, match = self.wait_for_index(HB, timeout, after=after)
            after = index + 1
            beats.append((int(match[1]), int(match[2]), int(match[3]), int(match[4])))
        return beats

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Boot(Protocol):
    def __call__(self, append: str, memory_mib: int = 512, extra_args: tuple[str, ...] = ()) -> Guest: ...


@pytest.fixture
def boot(tmp_path: Path, image: GuestImage) -> Iterator[Boot]:
    """``boot(append=..., ...)`` starts a guest that is always stopped at the end of the test."""
    guests: list[Guest] = []

    def start(append: str, memory_mib: int = 512, extra_args: tuple[str, ...] = ()) -> Guest:
        workdir = tmp_path / f"vm{len(guests)}"
        workdir.mkdir()
        guest = Guest(workdir, image, append, memory_mib, extra_args)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.close()


def test_build_is_cached_and_idempotent(image: GuestImage) -> None:
    stat_before = (image.kernel.stat().st_mtime_ns, image.initrd.stat().st_mtime_ns)
    started = time.monotonic()
    again = build_image(image_cache())
    elapsed = time.monotonic() - started
    assert again == image
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == stat_before
    assert elapsed < 5, f"a cached build took {elapsed:.1f}s"
    assert image.kernel_version.endswith("cloud-amd64")
    cmdline = kernel_cmdline(64, 20)
    assert cmdline.split()[0] == "console=ttyS0"
    assert "livemig.wss=64" in cmdline.split() and "livemig.rate=20" in cmdline.split()


def test_boot_heartbeat_check_and_rate(boot: Boot) -> None:
    guest = boot(append=kernel_cmdline(64, 20))
    ready = guest.wait_for(READY, BOOT_TIMEOUT)
    assert ready.groups() == ("64", "20", str(64 * 256))
    beats = guest.heartbeats(2)
    assert beats[1][0] == beats[0][0] + 1
    assert 500 <= beats[1][1] - beats[0][1] <= 3000
    assert beats[1][2] > beats[0][2] or beats[1][2] > 0, "the workload dirties memory"
    assert all(b[3] == 0 for b in beats)

    ok = guest.command("check 1", r"^LIVEMIG CHECK 1 (.*)$")
    assert ok[1] == f"ok pages={64 * 256} live_errors=0"

    assert guest.command("rate 0", r"^LIVEMIG RATE (\d+)$")[1] == "0"
    idle = guest.heartbeats(3)
    assert idle[1][2] == idle[2][2], "rate 0 stops dirtying"

    assert guest.command("frobnicate", r"^LIVEMIG ERR (.*)$")[1] == "unknown command"
    assert guest.command("rate 35", r"^LIVEMIG RATE (\d+)$")[1] == "35"
    busy = guest.heartbeats(3)
    assert busy[2][2] > busy[1][2], "dirtying resumes"
    assert guest.command("check tok-2", r"^LIVEMIG CHECK tok-2 (\S+)")[1] == "ok"


def test_check_detects_corruption_and_live_errors(boot: Boot) -> None:
    """``corrupt`` (a test hook) damages a page behind the workload's back; both checks notice."""
    guest = boot(append=kernel_cmdline(16, 0))
    guest.wait_for(READY, BOOT_TIMEOUT)

    # A damaged word in the body of an idle page: only the full check can see it.
    assert guest.command("corrupt 100", r"^LIVEMIG CORRUPT (\d+) word=(\d+)$").groups() == ("100", "256")
    fail = guest.command("check 10", r"^LIVEMIG CHECK 10 (.*)$")[1]
    assert fail == "fail pages=4096 bad=1 first_bad=100 expected_gen=1 found_gen=1 live_errors=0"

    # The dirtier rewrites every page (its header is intact), which heals the damage.
    guest.command("rate 50", r"^LIVEMIG RATE 50$")
    guest.heartbeats(2)
    guest.command("rate 0", r"^LIVEMIG RATE 0$")
    assert guest.command("check 11", r"^LIVEMIG CHECK 11 (\S+)")[1] == "ok"

    # A damaged header (generation word) is caught live by the dirtier, and stays a failure.
    guest.command("corrupt 7 0", r"^LIVEMIG CORRUPT 7 word=0$")
    after = guest.send("rate 50")
    live = guest.wait_for(r"^LIVEMIG LIVE_ERROR page=(\d+) expected_gen=(\d+) found_gen=(\d+)$", 30, after)
    assert live[1] == "7" and int(live[2]) >= 2 and int(live[3]) == int(live[2]) ^ 1
    check = guest.command("check 12", r"^LIVEMIG CHECK 12 (.*)$")[1]
    assert check.startswith("fail pages=4096 ") and check.endswith(" live_errors=1")
    assert guest.heartbeats(1)[0][3] == 1


def test_exit_drops_to_a_shell_with_virtio_loaded(boot: Boot) -> None:
    extra = ("-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
             "-device", "virtio-rng-pci")  # fmt: skip
    guest = boot(append=kernel_cmdline(8, 5), memory_mib=256, extra_args=extra)
    guest.wait_for(READY, BOOT_TIMEOUT)
    after = guest.send("exit 3")
    assert guest.wait_for(r"^LIVEMIG EXIT (\d+)$", 30, after)[1] == "3"
    guest.wait_for(r"^LIVEMIG SHELL$", 30, after)
    time.sleep(0.5)  # let the shell start reading the console
    mods = guest.command("echo MODS $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ,)", r"MODS (\S+)$", 30)
    loaded = set(mods[1].strip(",").split(","))
    assert {"virtio", "virtio_ring", "virtio_pci", "virtio_net", "virtio_blk", "virtio_rng"} <= loaded
    assert guest.command("echo NET $(ls /sys/class/net | tr '\\n' ,)", r"NET (\S+)$", 30)[1].startswith("eth0,")


def test_workload_off_gives_a_shell(boot: Boot, image: GuestImage) -> None:
    guest = boot(append=kernel_cmdline(1, 0, workload=False), memory_mib=256)
    guest.wait_for(r"^LIVEMIG SHELL$", BOOT_TIMEOUT)
    time.sleep(0.5)
    assert guest.command("echo SUM-$((40+2))", r"SUM-(\d+)$", 30)[1] == "42"
    assert not any(line.startswith("LIVEMIG READY") for line in guest.lines)


@pytest.mark.slow
def test_high_dirty_rate_under_tcg(boot: Boot) -> None:
    """200 MiB/s must be reachable under TCG: the 'migration does not converge' test needs it."""
    guest = boot(append=kernel_cmdline(256, 200))
    guest.wait_for(READY, BOOT_TIMEOUT)
    beats = guest.heartbeats(7, timeout=30)[1:]  # skip the first: it may include start-up
    rate = (beats[-1][2] - beats[0][2]) * 1000 / (beats[-1][1] - beats[0][1])
    assert rate >= 170, f"the workload reached only {rate:.0f} MiB/s of 200"
    assert guest.command("check 1", r"^LIVEMIG CHECK 1 (\S+)", timeout=60)[1] == "ok"
