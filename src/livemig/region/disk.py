"""A size-limited filesystem for blockd's data (root): a tmpfs of a given size mounted on its
data directory, so "the block service's disk is full" is a state a test or a chaos run can reach
by filling it, instead of a host's whole disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from livemig.errors import BootstrapError, Conflict


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def mount_tmpfs(path: Path, size_mib: int) -> None:
    """Mount a tmpfs of ``size_mib`` on ``path`` (created if missing); quiet if already mounted."""
    if os.geteuid() != 0:
        raise BootstrapError("a size-limited disk for blockd needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    if is_mounted(path):
        return
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise Conflict(f"cannot mount a {size_mib} MiB tmpfs on {path}: {result.stderr.strip()}")


def unmount(path: Path) -> None:
    """Unmount ``path`` if something is mounted there (lazily: a dying process may still hold it)."""
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
