"""Faults from outside the processes: signals, a partitioned migration link, the database going
away, blockd's disk filling up. Each one has an undo, and every undo is safe to call twice (a
chaos run cleans up after itself even when a scenario failed half-way).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from livemig.errors import Conflict, LivemigError
from livemig.region import disk
from livemig.region.hostns import MIGRATION_DEVICE
from livemig.region.netplumb import iproute2

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- signals


def send(pid: int, sig: int) -> bool:
    """Signal ``pid``; False if it is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def kill(pid: int) -> bool:
    return send(pid, signal.SIGKILL)


def stop(pid: int) -> bool:
    return send(pid, signal.SIGSTOP)


def cont(pid: int) -> bool:
    return send(pid, signal.SIGCONT)


# ---------------------------------------------------------------------- the migration link


#: the HTB class partitioned traffic is sent to (above hostd's per-migration minors), and the
#: priority of its filter (before any of hostd's, whose priorities are their class minors)
PARTITION_MINOR = 0xFFFE
PARTITION_PRIO = 1


class Partition:
    """Drop everything between two namespace hosts' migration interfaces, both ways.

    How, without ``tc netem`` or a drop action (neither is in these kernels): on each ``mig0``, a
    u32 filter sends packets for the other host to an HTB class whose only queue is a ``pfifo`` of
    length 0, so every packet is dropped on the way out; established connections see silence, as
    across a failed switch, and resume when :meth:`heal` removes the filters."""

    def __init__(self, ends: list[tuple[str, str]]) -> None:
        """``ends``: (netns, the other host's migration address) for each side."""
        self.ends = ends
        self.active = False

    def _tc(self, netns: str, *args: str, check: bool = True) -> str:
        return iproute2("tc", "-n", netns, *args, check=check)

    def cut(self) -> None:
        for netns, other in self.ends:
            if "qdisc htb 1: root" not in self._tc(netns, "qdisc", "show", "dev", MIGRATION_DEVICE):
                self._tc(netns, "qdisc", "replace", "dev", MIGRATION_DEVICE, "root", "handle", "1:", "htb", "default",
                         "0")  # fmt: skip
            self._tc(netns, "class", "replace", "dev", MIGRATION_DEVICE, "parent", "1:", "classid",
                     f"1:{PARTITION_MINOR:x}", "htb", "rate", "8bit", "ceil", "8bit")  # fmt: skip
            self._tc(netns, "qdisc", "replace", "dev", MIGRATION_DEVICE, "parent", f"1:{PARTITION_MINOR:x}", "handle",
                     f"{PARTITION_MINOR:x}:", "pfifo", "limit", "0")  # fmt: skip
            self._tc(netns, "filter", "replace", "dev", MIGRATION_DEVICE, "parent", "1:", "protocol", "ip", "prio",
                     str(PARTITION_PRIO), "u32", "match", "ip", "dst", f"{other}/32", "flowid",
                     f"1:{PARTITION_MINOR:x}")  # fmt: skip
        self.active = True
        log.info("migration link partitioned: %s", self.ends)

    def dropped(self) -> int:
        """Packets the partition dropped so far (both sides)."""
        total = 0
        for netns, _other in self.ends:
            text = self._tc(netns, "-s", "class", "show", "dev", MIGRATION_DEVICE, check=False)
            block = text.split(f"class htb 1:{PARTITION_MINOR:x} ", 1)
            if len(block) == 2 and (match := re.search(r"dropped (\d+)", block[1])):
                total += int(match.group(1))
        return total

    def heal(self) -> None:
        for netns, _other in self.ends:
            self._tc(netns, "filter", "del", "dev", MIGRATION_DEVICE, "parent", "1:", "prio", str(PARTITION_PRIO),
                     check=False)  # fmt: skip
            self._tc(netns, "class", "del", "dev", MIGRATION_DEVICE, "classid", f"1:{PARTITION_MINOR:x}",
                     check=False)  # fmt: skip
        if self.active:
            log.info("migration link healed: %s", self.ends)
        self.active = False


# ---------------------------------------------------------------------- PostgreSQL


class PostgresCluster:
    """The local PostgreSQL cluster (Debian's ``pg_ctlcluster``) serving the LMO's store."""

    def __init__(self, version: str, name: str) -> None:
        self.version = version
        self.name = name
        self.stopped = False  # by us

    @classmethod
    def for_url(cls, db_url: str | None) -> PostgresCluster | None:
        """The cluster on this machine listening on ``db_url``'s port, if it is one we can drive."""
        if not db_url or not db_url.startswith("postgresql") or shutil.which("pg_lsclusters") is None:
            return None
        match = re.search(r"@[^:/]+:(\d+)/", db_url)
        port = match.group(1) if match else "5432"
        out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == port:
                return cls(fields[0], fields[1])
        return None

    def _ctl(self, action: str) -> None:
        argv = ["pg_ctlcluster", self.version, self.name, action, *(["-m", "fast"] if action == "stop" else [])]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0 and "already" not in (result.stderr + result.stdout):
            raise Conflict(f"pg_ctlcluster {self.version} {self.name} {action}: {result.stderr.strip()}")

    def stop(self) -> None:
        self._ctl("stop")
        self.stopped = True
        log.info("PostgreSQL %s/%s stopped", self.version, self.name)

    def start(self) -> None:
        self._ctl("start")
        self.stopped = False
        log.info("PostgreSQL %s/%s started", self.version, self.name)

    def restore(self) -> None:
        """Start it again if we stopped it (the undo of a scenario)."""
        if self.stopped:
            self.start()


# ---------------------------------------------------------------------- blockd's disk


class DiskFill:
    """Fill blockd's (size-limited) data filesystem, and empty it again."""

    FILLER = ".chaos-filler"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / self.FILLER

    def possible(self) -> bool:
        """Only on a filesystem of its own (``livemig up --blockd-disk-mib``): filling the
        machine's own disk is not a fault a chaos run may inject."""
        return disk.is_mounted(self.data_dir)

    def fill(self) -> int:
        """Take every free byte; returns how many."""
        free = disk.free_bytes(self.data_dir)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = free
            while size > 0:
                try:
                    os.posix_fallocate(fd, 0, size)
                    break
                except OSError:
                    size -= 64 * 1024  # what tmpfs keeps for itself
        finally:
            os.close(fd)
        left = disk.free_bytes(self.data_dir)
        log.info("blockd's disk filled: %d bytes taken, %d left", free - left, left)
        return free - left

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def undo_all(*undos: object) -> list[str]:
    """Run every undo (``heal``, ``start``, ``free``, ...) even if some fail; their errors, as text."""
    errors: list[str] = []
    for undo in undos:
        try:
            undo()  # type: ignore[operator]
        except (LivemigError, OSError) as exc:
            errors.append(exc.message if isinstance(exc, LivemigError) else str(exc))
    return errors
