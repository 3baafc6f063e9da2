"""The QEMU processes that run a VM on this machine, and what each says its runstate is.

Why from ``/proc`` and QEMU itself, not from hostd or the LMO: the invariant "at most one QEMU
runs the VM" must hold even when a hostd is dead, stopped or wrong, so the checker looks at every
``qemu-system`` process whose ``-name guest=<vm>,`` names the VM, on every host, and asks each one
over its observer monitor (``VmPaths.qmp_observe``; hostd holds the first monitor, and a QMP socket
serves one client at a time). Only daemons count: ``-daemonize`` forks, and for a moment the
parent (waiting for its child to be ready) has the same command line; a process whose child is
another QEMU of the same VM is that parent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    vm: str
    host: str | None  # from the path of its QMP socket: <state>/hosts/<host>/vms/<vm>/qmp.sock
    observe: Path | None  # its observer QMP socket, if it has one
    stopped: bool  # SIGSTOPped (state T): it runs nothing, whatever its runstate says

    def label(self) -> str:
        return f"{self.host or '?'}:{self.pid}"


def _argv(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _stat(pid: str) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/<pid>/stat."""
    try:
        after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return after[0], int(after[1])


def _vm_of(argv: list[str]) -> str | None:
    for flag, value in itertools.pairwise(argv):
        if flag == "-name" and value.startswith("guest="):
            return value.removeprefix("guest=").split(",", 1)[0]
    return None


def _qmp_paths(argv: list[str]) -> list[Path]:
    return [Path(v.removeprefix("unix:").split(",", 1)[0]) for f, v in itertools.pairwise(argv)
            if f == "-qmp" and v.startswith("unix:")]  # fmt: skip


def qemu_daemons(vm: str | None = None) -> list[QemuProcess]:
    """Every QEMU daemon on this machine (running ``vm``, if given), parents of ``-daemonize`` left out."""
    found: dict[int, tuple[QemuProcess, int, tuple[str, ...]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _argv(entry.name)
        if not argv or "qemu-system" not in argv[0]:
            continue
        name = _vm_of(argv)
        if name is None or (vm is not None and name != vm):
            continue
        stat = _stat(entry.name)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        qmps = _qmp_paths(argv)
        host = None
        if qmps and qmps[0].parent.parent.name == "vms":
            host = qmps[0].parent.parent.parent.name
        observe = next((q for q in qmps if q.name == "qmp-observe.sock"), None)
        process = QemuProcess(int(entry.name), name, host, observe, stat[0] == "T")
        found[process.pid] = (process, stat[1], tuple(argv))
    parents = {ppid for _process, ppid, _argv_ in found.values()}
    return sorted((p for pid, (p, _ppid, _a) in found.items() if pid not in parents), key=lambda p: p.pid)


def runstate(observe: Path, timeout: float = 1.0) -> str | None:
    """QEMU's runstate (``running``, ``paused``, ``inmigrate``, ``postmigrate``, ...) over its
    observer monitor; None if it does not answer in time (stopped, busy, or gone)."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError, ValueError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(observe))
        reader = sock.makefile("rb")
        reader.readline()  # the greeting
        sock.sendall(b'{"execute":"qmp_capabilities"}\n')
        _reply(reader, deadline)
        sock.sendall(b'{"execute":"query-status"}\n')
        reply = _reply(reader, deadline)
        if reply is not None:
            answer = reply.get("return")
            return str(answer.get("status")) if isinstance(answer, dict) else None
    return None


def _reply(reader: object, deadline: float) -> dict[str, object] | None:
    """The next reply (events QEMU sends meanwhile are skipped)."""
    while time.monotonic() < deadline:
        line = reader.readline()  # type: ignore[attr-defined]
        if not line:
            return None
        message = json.loads(line)
        if "return" in message or "error" in message:
            return dict(message)
    return None
