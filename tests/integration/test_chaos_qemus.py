"""The invariant checker's view of QEMU processes, on a real (guestless) QEMU: it finds the daemon,
not the ``-daemonize`` parent; asks the daemon its runstate on the observer monitor while hostd's
monitor is taken; and counts a SIGSTOPped QEMU as what it last said, since it would run on in that
state the moment it is continued."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.chaos import qemus
from livemig.chaos.invariants import RunstateSampler

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    vm = f"probe{os.getpid()}"
    root = tmp_path / "hosts" / "H" / "vms" / vm  # the layout hostd gives a VM's files
    root.mkdir(parents=True)
    subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                    "-name", f"guest={vm},debug-threads=on", "-qmp", f"unix:{root / 'qmp.sock'},server=on,wait=off",
                    "-qmp", f"unix:{root / 'qmp-observe.sock'},server=on,wait=off",
                    "-pidfile", str(root / "qemu.pid"), "-daemonize"], check=True, timeout=30)  # fmt: skip
    pid = int((root / "qemu.pid").read_text())
    try:
        yield vm, root, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)


def test_the_daemon_its_host_and_its_runstate_while_another_client_holds_the_first_monitor(
    daemon: tuple[str, Path, int],
) -> None:
    vm, root, pid = daemon
    found = qemus.qemu_daemons(vm)
    assert [(p.pid, p.vm, p.host, p.observe, p.stopped) for p in found] == [
        (pid, vm, "H", root / "qmp-observe.sock", False)
    ]
    with socket.socket(socket.AF_UNIX) as hostd:  # hostd's session on the first monitor
        hostd.connect(str(root / "qmp.sock"))
        assert qemus.runstate(root / "qmp-observe.sock") == "running"


def test_a_stopped_qemu_counts_as_what_it_last_said(daemon: tuple[str, Path, int]) -> None:
    vm, _root, pid = daemon
    sampler = RunstateSampler(vm)
    assert sampler.sample().states == {f"H:{pid}": "running"}
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5  # the group stop reaches every QEMU thread a moment later
        while not qemus.qemu_daemons(vm)[0].stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert qemus.qemu_daemons(vm)[0].stopped
        assert sampler.sample().states == {f"H:{pid}": "running"}, "frozen in running: it would run on"
        assert RunstateSampler(vm).sample().states == {f"H:{pid}": "unknown"}, "never seen answering"
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_daemonizing_parent_is_not_counted() -> None:
    """While ``-daemonize`` waits for its child, both have the same command line: only the child counts.
    (A Python process named like QEMU forks the way QEMU does: the parent waits, the child lives on.)"""
    vm = f"twin{os.getpid()}"
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nelse:\n    time.sleep(30)"
    parent = subprocess.Popen(["qemu-system-x86_64", "-c", code, "-name", f"guest={vm},debug-threads=on"],
                              executable=sys.executable)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while len(found := qemus.qemu_daemons(vm)) != 1 or found[0].pid == parent.pid:
            assert time.monotonic() < deadline, f"one daemon, the child: {found}"
            time.sleep(0.05)
        assert found[0].pid != parent.pid and found[0].observe is None and found[0].host is None
    finally:
        for process in qemus.qemu_daemons(vm):
            os.kill(process.pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
