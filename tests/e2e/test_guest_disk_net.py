"""The guest workload's disk and network modes, under real QEMU (TCG).

Why end to end: the disk witness is only worth something if its records really reach the
virtual disk (virtio-blk, the guest page cache, fdatasync, QEMU's flush) and its check really
reads them back from there; the network witness only if init brings up eth0 and the workload's
sockets work through a real NIC. A local raw file stands in for an NBD volume and QEMU's slirp
for the vswitch: what is tested here is the guest side. The host re-reads the raw file with
:mod:`livemig.guest.disklog`, so the guest's writer and its own checker are not the only judges.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import pytest

from livemig.guest.disklog import read_disk_log
from livemig.guest.image import GuestImage, build_image, kernel_cmdline
from livemig.region.freeport import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]


def _console_helpers() -> ModuleType:
    """The serial-console client of test_guest_image.py (tests/ is not a package: load it by path)."""
    spec = importlib.util.spec_from_file_location(
        "livemig_e2e_guest_console", Path(__file__).with_name("test_guest_image.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _console_helpers()
Guest = _helpers.Guest
BOOT_TIMEOUT: float = _helpers.BOOT_TIMEOUT
READY = r"^LIVEMIG READY wss_mib=\d+ rate_mib_s=\d+ pages=\d+$"
DISK_LINE = re.compile(
    r"^LIVEMIG DISK dev=/dev/vda mode=(\w+) log_id=([0-9a-f]{16}) records=(\d+) capacity=(\d+) diskrate=(\d+) "
    r"tail=(\w+)$"
)
DISK_HB = re.compile(
    r"^LIVEMIG HB seq=(\d+) uptime_ms=(\d+) dirtied_mib=(\d+) live_errors=(\d+) disk_acked=(\d+) disk_state=(\w+)$"
)
NET_HB = re.compile(r"^LIVEMIG HB seq=\d+ uptime_ms=\d+ dirtied_mib=\d+ live_errors=0 net=10\.0\.2\.15$")


class Console(Protocol):
    """What these tests use of test_guest_image.Guest."""

    proc: subprocess.Popen[bytes]

    def mark(self) -> int: ...
    def send(self, line: str) -> int: ...
    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0, after: int = 0) -> re.Match[str]: ...
    def wait_for_index(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, after: int = 0
    ) -> tuple[int, re.Match[str]]: ...
    def command(self, line: str, reply: str, timeout: float = 30.0) -> re.Match[str]: ...
    def close(self) -> None: ...


class Boot(Protocol):
    def __call__(self, append: str, memory_mib: int = 256, extra_args: tuple[str, ...] = ()) -> Console: ...


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(_helpers.image_cache())


@pytest.fixture
def boot(tmp_path: Path, image: GuestImage) -> Iterator[Boot]:
    """``boot(append=..., ...)`` starts a guest that is always stopped at the end of the test."""
    guests: list[Console] = []

    def start(append: str, memory_mib: int = 256, extra_args: tuple[str, ...] = ()) -> Console:
        workdir = tmp_path / f"vm{len(guests)}"
        workdir.mkdir()
        guest: Console = Guest(workdir, image, append, memory_mib, extra_args)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.close()


def raw_disk(path: Path, size: int) -> tuple[str, ...]:
    """A zeroed raw file of ``size`` bytes, as QEMU arguments for a virtio-blk disk (/dev/vda)."""
    with path.open("wb") as f:
        f.truncate(size)
    return ("-drive", f"file={path},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0")


def disk_beats(guest: Console, count: int, timeout: float = 30.0) -> list[tuple[int, int, int, str]]:
    """The next ``count`` heartbeats of a disk-mode guest as (uptime_ms, dirtied_mib, disk_acked, disk_state)."""
    after = guest.mark()
    beats = []
    for _ in range(count):
        index, match = guest.wait_for_index(DISK_HB, timeout, after=after)
        after = index + 1
        assert match[4] == "0", "no memory errors"
        beats.append((int(match[2]), int(match[3]), int(match[5]), match[6]))
    return beats


def kill_hard(guest: Console) -> None:
    """SIGKILL QEMU: the guest gets no chance to flush anything (what a host crash looks like to it)."""
    guest.proc.kill()
    guest.proc.wait(timeout=15)


# --------------------------------------------------------------------------- disk mode


def test_disk_log_acks_checks_and_detects_corruption(boot: Boot, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    guest = boot(append=kernel_cmdline(16, 50, disk="/dev/vda", disk_rate=100), extra_args=raw_disk(disk, 64 << 20))
    mode, log_id, records, capacity, rate, tail = guest.wait_for(DISK_LINE, BOOT_TIMEOUT).groups()
    assert (mode, records, capacity, rate, tail) == ("format", "0", str((64 << 20) // 4096 - 1), "100", "none")
    guest.wait_for(READY, BOOT_TIMEOUT)

    # Records are acknowledged as batches are flushed, and the memory dirtier keeps its rate meanwhile.
    beats = disk_beats(guest, 4)[1:]
    assert all(state == "ok" for *_, state in beats)
    assert beats[0][2] < beats[1][2] < beats[2][2]
    records_s = (beats[2][2] - beats[0][2]) * 1000 / (beats[2][0] - beats[0][0])
    mib_s = (beats[2][1] - beats[0][1]) * 1000 / (beats[2][0] - beats[0][0])
    assert 70 <= records_s <= 130, f"{records_s:.0f} records/s of 100"
    assert mib_s >= 42, f"the dirtier reached {mib_s:.0f} MiB/s of 50 while the log was written"

    # diskrate 0 pauses the log; diskcheck flushes first, so everything written is acknowledged.
    assert guest.command("diskrate 0", r"^LIVEMIG DISKRATE (\d+)$")[1] == "0"
    assert guest.command("diskrate x", r"^LIVEMIG ERR (.*)$")[1] == "bad disk rate"
    ok = guest.command("diskcheck c1", r"^LIVEMIG DISKCHECK c1 ok records=(\d+) acked=(\d+)$")
    checked, acked = int(ok[1]), int(ok[2])
    assert acked >= beats[2][2] and checked == acked
    assert [beat[2] for beat in disk_beats(guest, 2)] == [acked, acked]
    assert guest.command("check m1", r"^LIVEMIG CHECK m1 (\S+)")[1] == "ok"

    # A damaged record on the device (behind the page cache) fails the check, naming it.
    assert guest.command("diskcorrupt 3", r"^LIVEMIG DISKCORRUPT (\d+) offset=(\d+)$")[1] == "3"
    fail = guest.command("diskcheck c2", r"^LIVEMIG DISKCHECK c2 (.*)$")[1]
    assert fail == f"fail records=2 acked={acked} first_bad=3 why=crc"
    assert guest.command("diskcorrupt 999999", r"^LIVEMIG ERR (.*)$")[1] == "bad record"

    # The host sees the same log in the raw file: written by the guest, readable with zlib.
    kill_hard(guest)
    on_host = read_disk_log(disk)
    assert on_host.log_id == int(log_id, 16)
    assert (on_host.records, on_host.end) == (2, "crc")


def test_disk_log_continues_after_a_hard_kill(boot: Boot, tmp_path: Path) -> None:
    """A VM that comes back on the same volume continues its log instead of formatting it."""
    disk = tmp_path / "disk.raw"
    drive = raw_disk(disk, 64 << 20)
    append = kernel_cmdline(8, 10, disk="/dev/vda", disk_rate=200)
    first = boot(append=append, extra_args=drive)
    log_id = first.wait_for(DISK_LINE, BOOT_TIMEOUT)[2]
    first.wait_for(READY, BOOT_TIMEOUT)
    disk_beats(first, 1)
    acked = int(first.command("diskcheck k1", r"^LIVEMIG DISKCHECK k1 ok records=\d+ acked=(\d+)$")[1])
    acked = max(acked, disk_beats(first, 1)[0][2])
    kill_hard(first)  # records written after the last flush die with the guest's page cache

    on_host = read_disk_log(disk)
    assert on_host.log_id == int(log_id, 16) and on_host.holds(acked), (on_host, acked)

    second = boot(append=append, extra_args=drive)
    resumed = second.wait_for(DISK_LINE, BOOT_TIMEOUT)
    assert resumed.group(1, 2, 3) == ("resume", log_id, str(on_host.records))
    assert resumed[6] == on_host.end == "zero"
    second.wait_for(READY, BOOT_TIMEOUT)
    later = disk_beats(second, 2)[-1]
    assert later[2] > on_host.records, "the log grows past the records of the first boot"
    ok = second.command("diskcheck k2", r"^LIVEMIG DISKCHECK k2 ok records=(\d+) acked=(\d+)$")
    assert int(ok[1]) == int(ok[2]) >= later[2]
    kill_hard(second)
    assert read_disk_log(disk).holds(int(ok[2]))


def test_disk_full_stops_the_log_and_keeps_answering(boot: Boot, tmp_path: Path) -> None:
    disk = tmp_path / "tiny.raw"
    guest = boot(append=kernel_cmdline(8, 5, disk="/dev/vda", disk_rate=1000), extra_args=raw_disk(disk, 16 * 4096))
    assert guest.wait_for(DISK_LINE, BOOT_TIMEOUT)[4] == "15"
    full = guest.wait_for(r"^LIVEMIG DISKFULL records=(\d+) acked=(\d+)$", 30)
    assert full.groups() == ("15", "15")
    assert disk_beats(guest, 1)[0][2:] == (15, "full")
    assert guest.command("diskcheck f", r"^LIVEMIG DISKCHECK f (.*)$")[1] == "ok records=15 acked=15"
    assert guest.command("check f", r"^LIVEMIG CHECK f (\S+)")[1] == "ok"
    kill_hard(guest)
    assert (read_disk_log(disk).records, read_disk_log(disk).end) == (15, "end")


# --------------------------------------------------------------------------- network mode


class HostEchoServer:
    """A line echo server on the host's loopback: slirp maps the guest's 10.0.2.2 to it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


def test_network_mode_echo_udp_sink_and_tcp_client(boot: Boot) -> None:
    tcp_port, udp_port = free_port(kind=socket.SOCK_STREAM), free_port(kind=socket.SOCK_DGRAM)
    netdev = f"user,id=n0,restrict=off,hostfwd=tcp:127.0.0.1:{tcp_port}-:7,hostfwd=udp:127.0.0.1:{udp_port}-:9"
    append = kernel_cmdline(8, 5, ip="10.0.2.15/24", gateway="10.0.2.2")
    guest = boot(append=append, extra_args=("-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"))
    guest.wait_for(r"^LIVEMIG NET ip=10\.0\.2\.15 tcp_echo=7 udp_sink=9$", BOOT_TIMEOUT)
    guest.wait_for(READY, BOOT_TIMEOUT)
    guest.wait_for(NET_HB, 30, after=guest.mark())
    assert guest.command("diskcheck x", r"^LIVEMIG ERR (.*)$")[1] == "disk mode is off"

    # TCP echo on port 7: several connections at once, one of them with more than a buffer's worth.
    conns = [socket.create_connection(("127.0.0.1", tcp_port), timeout=20) for _ in range(6)]
    try:
        for index, conn in enumerate(conns):
            conn.sendall(f"hello {index}\n".encode())
        for index, conn in enumerate(conns):
            assert recv_exactly(conn, len(f"hello {index}\n")) == f"hello {index}\n".encode()
        bulk = bytes(range(256)) * 128  # 32 KiB: the echo must flow through its 4 KiB buffer
        conns[0].sendall(bulk)
        assert recv_exactly(conns[0], len(bulk)) == bulk
    finally:
        for conn in conns:
            conn.close()

    # UDP sink on port 9: 200 datagrams; 4 sequence numbers skipped, one duplicated, one pair swapped.
    assert guest.command("udpreset", r"^LIVEMIG (UDPRESET)$")[1] == "UDPRESET"
    seqs = [s for s in range(1, 204) if s not in (20, 77, 150, 190)]
    seqs.insert(seqs.index(100) + 1, 100)
    i60 = seqs.index(60)
    seqs[i60], seqs[i60 + 1] = seqs[i60 + 1], seqs[i60]
    assert len(seqs) == 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for seq in seqs:
            udp.sendto(struct.pack(">Q", seq) + b"x" * 56, ("127.0.0.1", udp_port))
            time.sleep(0.002)  # slirp queues only so much for a guest that TCG runs slowly
    deadline = time.monotonic() + 15
    while True:
        stats = guest.command("udpstats u", r"^LIVEMIG UDPSTATS u (.*)$")[1]
        if stats.startswith("received=200 ") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert stats == "received=200 lost=4 duplicated=1 reordered=1 max_seq=203"

    # Outbound TCP client to the host: pings flow and come back; a closed connection is an error,
    # counted once and not retried.
    server = HostEchoServer()
    try:
        started = guest.send(f"tcpclient 10.0.2.2 {server.port} 100")
        guest.wait_for(rf"^LIVEMIG TCPCLIENT state=connected peer=10\.0\.2\.2:{server.port}$", 20, started)
        time.sleep(1.5)
        first = tcp_stats(guest, "t1")
        time.sleep(1.0)
        second = tcp_stats(guest, "t2")
        assert first.connected == second.connected == 1
        assert first.errors == second.errors == 0 and second.last_error == "none"
        assert first.sent >= 5 and first.received >= 3
        assert second.sent >= first.sent + 5 and second.received >= first.received + 5
        assert second.sent - second.received <= 3, "echoes keep up with pings"

        closed = guest.mark()
        server.connections[0].close()
        guest.wait_for(r"^LIVEMIG TCPCLIENT state=closed error=eof$", 20, closed)
        time.sleep(1.0)
        after = tcp_stats(guest, "t3")
        assert (after.connected, after.errors, after.last_error) == (0, 1, "eof")
        assert len(server.connections) == 1, "the client must not reconnect silently"
    finally:
        server.close()

    refused = guest.send(f"tcpclient 10.0.2.2 {free_port(kind=socket.SOCK_STREAM)} 100")
    guest.wait_for(r"^LIVEMIG TCPCLIENT state=closed error=(refused|reset)$", 20, refused)
    assert tcp_stats(guest, "t4").errors == 1
    assert guest.command("tcpclient 10.0.2.2 0 5", r"^LIVEMIG ERR (usage)")[1] == "usage"


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True)
class TcpStats:
    connected: int
    sent: int
    received: int
    errors: int
    last_error: str


def tcp_stats(guest: Console, token: str) -> TcpStats:
    pattern = rf"^LIVEMIG TCPSTATS {token} connected=(\d) sent=(\d+) received=(\d+) errors=(\d+) last_error=(\w+)$"
    match = guest.command(f"tcpstats {token}", pattern)
    return TcpStats(int(match[1]), int(match[2]), int(match[3]), int(match[4]), match[5])
