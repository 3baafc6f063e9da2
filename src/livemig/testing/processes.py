"""Looking at the machine's processes, for tests that prove "the VM runs on exactly one host"."""

from __future__ import annotations

from pathlib import Path


def qemu_pids_running(vm: str) -> list[int]:
    """Every QEMU process on this machine that runs ``vm`` (by its ``-name guest=...`` argument)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"guest={vm},".encode() in b" ".join(argv):
            pids.append(int(proc.name))
    return pids
