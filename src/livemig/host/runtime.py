"""What hostd asks of the machine to run QEMU: the seam between the host agent and the host.

Why a seam: everything above it (``agent.py``, ``source.py``, the REST API) is the real hostd in
every test. The fast controller tests and the fleet simulator replace only this object with a
simulated QEMU (``livemig.testing.fakeqemu``), so the fake hostd *is* the real hostd app and
cannot drift from it. The real implementation, :class:`LocalQemu`, starts daemonized QEMU
processes, talks QMP to them over their sockets and reaches the guest workload over its console
and command port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from livemig.errors import QemuError
from livemig.guest.image import GuestImage, build_image, default_cache_dir
from livemig.host import console
from livemig.host.firmware import DEFAULT_OVMF_DIR, DEFAULT_SEABIOS, FirmwareCatalog
from livemig.host.qemu import VmPaths, machine_aliases, qemu_binary, qemu_version
from livemig.host.qmp import QmpSession
from livemig.model.vm import NbdExport
from livemig.region.proc import pid_alive
from livemig.storage import images
from livemig.storage.images import NbdClientTls


@runtime_checkable
class Qmp(Protocol):
    """One QMP session to one QEMU (``host.qmp.QmpSession``, or the simulated one)."""

    @property
    def connected(self) -> bool: ...

    async def connect(self, socket_path: Path, timeout: float = 10.0) -> None: ...

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def listener(self, *names: str) -> AbstractContextManager[AsyncIterator[Any]]: ...

    async def close(self) -> None: ...


class QemuRuntime(Protocol):
    """Start, watch and stop QEMU processes; reach the guest workload inside them."""

    def version(self) -> str:
        """QEMU's version, e.g. ``7.2.19``."""
        ...

    def machines(self) -> dict[str, str]:
        """Every machine type this QEMU knows, mapped to its versioned type."""
        ...

    def binary(self) -> str: ...

    def guest_image(self) -> GuestImage:
        """The livemig guest image (kernel, initrd) for VMs that name no boot files."""
        ...

    def firmware(self) -> FirmwareCatalog:
        """The firmware builds (SeaBIOS, OVMF) this host offers VMs that boot from a disk."""
        ...

    async def read_volume(self, export: NbdExport, size: int, tls_dir: Path | None = None) -> bytes:
        """The first ``size`` bytes of a volume, through this host's attachment (its NBD export);
        ``tls_dir``: the host's QEMU certificate directory when blockd serves NBD over TLS."""
        ...

    async def write_volume(self, export: NbdExport, source: Path, tls_dir: Path | None = None) -> None:
        """Write a small raw file at the start of a volume, through this host's attachment."""
        ...

    async def launch(self, argv: list[str], pass_fds: list[int], paths: VmPaths) -> int:
        """Start a daemonized QEMU; its pid once it runs. ``QemuError`` with QEMU's words if not."""
        ...

    def owns(self, pid: int, paths: VmPaths) -> bool:
        """True if ``pid`` is the QEMU started for this VM (guards against pid reuse)."""
        ...

    def alive(self, pid: int) -> bool: ...

    def kill(self, pid: int) -> None:
        """SIGKILL: for a QEMU that did not quit when asked."""
        ...

    def qmp(self, name: str) -> Qmp:
        """A new, unconnected QMP session (``name`` labels its errors)."""
        ...

    async def memory_check(self, paths: VmPaths) -> tuple[bool, str]:
        """The guest workload's full memory check: (passed, the guest's own words)."""
        ...

    async def disk_check(self, paths: VmPaths) -> tuple[bool, str]: ...

    async def send_line(self, paths: VmPaths, line: str) -> None:
        """One line to the guest (its command port if it has one, else the serial console)."""
        ...


class LocalQemu:
    """The real machine: ``qemu-system-x86_64`` processes, their QMP and console sockets.

    ``ovmf_dir``/``seabios``: where the firmware files are (Debian's packages by default)."""

    def __init__(self, ovmf_dir: Path | None = None, seabios: Path | None = None) -> None:
        self.ovmf_dir = ovmf_dir or DEFAULT_OVMF_DIR
        self.seabios = seabios or DEFAULT_SEABIOS

    def version(self) -> str:
        return qemu_version()

    def machines(self) -> dict[str, str]:
        return machine_aliases()

    def binary(self) -> str:
        return qemu_binary()

    def guest_image(self) -> GuestImage:
        return build_image(default_cache_dir())

    def firmware(self) -> FirmwareCatalog:
        return FirmwareCatalog.scan(self.ovmf_dir, self.seabios)

    async def read_volume(self, export: NbdExport, size: int, tls_dir: Path | None = None) -> bytes:
        return await asyncio.to_thread(images.read_volume, export, size, _client_tls(tls_dir))

    async def write_volume(self, export: NbdExport, source: Path, tls_dir: Path | None = None) -> None:
        await asyncio.to_thread(images.write_volume, export, source, _client_tls(tls_dir))

    async def launch(self, argv: list[str], pass_fds: list[int], paths: VmPaths) -> int:
        # umask 077: every file and socket QEMU creates is its (hostd's) user's alone
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds, umask=0o077,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            said = (err or out).decode(errors="replace").strip()
            if not said and paths.qemu_log.exists():  # daemonizing with -D sends its errors there
                said = paths.qemu_log.read_text(errors="replace").strip()
            raise QemuError(said or f"exit status {proc.returncode}")
        return int(paths.pidfile.read_text().strip())

    def owns(self, pid: int, paths: VmPaths) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return str(paths.qmp) in cmdline and pid_alive(pid)

    def alive(self, pid: int) -> bool:
        return pid_alive(pid)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def qmp(self, name: str) -> Qmp:
        return QmpSession(name)

    async def memory_check(self, paths: VmPaths) -> tuple[bool, str]:
        return await console.memory_check(paths.console, paths.console_log)

    async def disk_check(self, paths: VmPaths) -> tuple[bool, str]:
        return await console.disk_check(paths.console, paths.console_log)

    async def send_line(self, paths: VmPaths, line: str) -> None:
        port = paths.command_port
        await console.send_line(port if port.exists() else paths.console, line)


def _client_tls(tls_dir: Path | None) -> NbdClientTls | None:
    """The host's QEMU certificate as NBD client credentials (blockd admits role qemu)."""
    return None if tls_dir is None else NbdClientTls(tls_dir)
