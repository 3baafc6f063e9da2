"""Process liveness checks shared by hostd (its QEMUs) and the region (its services), and the
parent-death signal of processes that must not outlive the one that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

#: prctl(2)'s option that sets the parent-death signal
PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit (reaping it if it is our child); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def die_with_parent() -> None:
    """In a child's process, as ``Popen``'s ``preexec_fn``: SIGTERM when the thread that started it
    ends, however it ends (Linux's parent-death signal). A simulator shard does not outlive shard 0
    with its VM records on tmpfs, nor a benchmark's LMO replicas and fleet the benchmark, killed."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
