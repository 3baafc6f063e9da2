"""QEMU's native TLS on a live migration, driven over QMP by ``livemig.security.qemu_tls``.

Two plain QEMU processes run the livemig guest (TCG): a source, and a destination started with
``-incoming defer``. Each gets a ``tls-creds-x509`` directory from ``pki.qemu_tls_dir``; the
destination verifies the peer and allows, through ``tls-authz``, only host-a's QEMU certificate.

1. The source presents host-c's certificate (same CA, so the TLS handshake itself is fine, but
   not the identity the destination allows): the destination refuses it ("authz check ... is
   denied"), the source's migration fails, and the VM keeps running on the source with its
   memory intact.
2. The same VM then migrates with host-a's certificate to a fresh destination and arrives intact.

Run with the shared lock::

    flock /tmp/livemig-heavy.lock .venv/bin/pytest tests/integration/security/test_migration_tls.py
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from livemig.guest.image import GuestImage
from livemig.host.qmp import QmpSession
from livemig.region.freeport import free_ports
from livemig.security import pki, qemu_tls
from livemig.security.pki import Identity, Role

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

#: 256 MiB less 8 KiB: off QEMU 7.2's 256 KiB grid, where TCG's dirty tracking is exact (see host/qemu.py).
MEMORY = "262136K"


class Vm:
    """One QEMU process: serial console read line by line in a thread, QMP on a unix socket, stderr to a file."""

    def __init__(self, workdir: Path, image: GuestImage, *, incoming: bool) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.qmp_path = workdir / "qmp.sock"
        self.stderr = workdir / "qemu.err"
        console = workdir / "console.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", MEMORY, "-nodefaults", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.kernel_cmdline(wss_mib=32, rate_mib_s=5),
            "-chardev", f"socket,id=ser0,path={console},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if incoming:
            argv += ["-incoming", "defer"]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._sock = self._connect(console)
        threading.Thread(target=self._read, daemon=True).start()

    def _connect(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.proc.returncode}: {self.stderr.read_text()}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
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
                return
            if not data:
                return
            buf += data
            *complete, buf = buf.split(b"\n")
            with self._cond:
                self.lines.extend(line.decode(errors="replace").strip("\r") for line in complete)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 90.0, after: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = after
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no console line matching {pattern!r}; last: {self.lines[-20:]}")
                self._cond.wait(min(remaining, 0.5))

    def check(self, token: str) -> str:
        """The guest workload's memory self-check: "ok" when every page holds what it last wrote."""
        with self._cond:
            mark = len(self.lines)
        self._sock.sendall(f"check {token}\n".encode())
        return self.wait_for(rf"^LIVEMIG CHECK {token} (\S+)", timeout=60, after=mark).group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._sock.close()


async def qmp(vm: Vm) -> QmpSession:
    session = QmpSession(vm.workdir.name)
    await session.connect(vm.qmp_path)
    return session


async def wait_migration(session: QmpSession, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = await session.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        await asyncio.sleep(0.1)
    raise AssertionError(f"migration did not finish in {timeout}s: {info}")


def test_tls_authz_refuses_an_unauthorised_source_and_admits_the_authorised_one(
    tmp_path: Path, guest_image: GuestImage
) -> None:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "r1")
    creds: dict[str, Path] = {}
    identities: dict[str, Identity] = {}
    for host, address in (("host-a", "10.1.0.1"), ("host-b", "10.1.0.2"), ("host-c", "10.1.0.3")):
        # the SAN names the host and its migration address; the URI below dials 127.0.0.1, so
        # tls-hostname (not the address) is what the source checks against the destination
        identities[host] = pki.issue(directory, host, Role.QEMU, [host, address]).identity
        creds[host] = pki.qemu_tls_dir(directory, host, tmp_path / f"{host}-tls")
    assert qemu_tls.authz_identity(identities["host-a"]) == "O=r1,OU=qemu,CN=host-a"

    source = Vm(tmp_path / "source", guest_image, incoming=False)
    destinations: list[Vm] = []
    try:
        source.wait_for(r"^LIVEMIG READY ")
        assert source.check("before") == "ok"
        asyncio.run(_scenario(tmp_path, guest_image, source, destinations, creds, identities))
    finally:
        for vm in [source, *destinations]:
            vm.stop()


async def _scenario(
    tmp_path: Path,
    image: GuestImage,
    source: Vm,
    destinations: list[Vm],
    creds: dict[str, Path],
    identities: dict[str, Identity],
) -> None:
    port_1, port_2 = free_ports(2)
    src = await qmp(source)
    try:
        # --- 1. host-c's certificate: valid, but not the identity the destination allows ------------
        refusing = Vm(tmp_path / "dest-1", image, incoming=True)
        destinations.append(refusing)
        dst = await qmp(refusing)
        await qemu_tls.prepare_destination(dst.execute, creds["host-b"], source=identities["host-a"])
        await dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port_1}"})
        await qemu_tls.prepare_source(src.execute, creds["host-c"], destination_hostname="host-b")
        parameters = await src.execute("query-migrate-parameters")
        assert parameters["tls-creds"] == qemu_tls.CREDS_ID and parameters["tls-hostname"] == "host-b"
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port_1}"})
        failed = await wait_migration(src)
        assert failed["status"] == "failed", failed
        assert (await src.execute("query-status"))["status"] == "running"
        denied = f"TLS x509 authz check for {qemu_tls.authz_identity(identities['host-c'])} is denied"
        deadline = time.monotonic() + 10
        while denied not in refusing.stderr.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert denied in refusing.stderr.read_text(), refusing.stderr.read_text()
        assert (await dst.execute("query-status"))["status"] == "inmigrate"  # never got the VM
        await dst.close()
        refusing.stop()  # a refused destination stays inmigrate: it must be destroyed
        assert await asyncio.to_thread(source.check, "after-refusal") == "ok"

        # --- 2. the same VM with host-a's certificate: admitted ------------------------------------
        await qemu_tls.clear(src.execute)
        accepting = Vm(tmp_path / "dest-2", image, incoming=True)
        destinations.append(accepting)
        dst = await qmp(accepting)
        await qemu_tls.prepare_destination(dst.execute, creds["host-b"], source=identities["host-a"])
        await dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port_2}"})
        await qemu_tls.prepare_source(src.execute, creds["host-a"], destination_hostname="host-b")
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port_2}"})
        done = await wait_migration(src)
        assert done["status"] == "completed", done
        deadline = time.monotonic() + 30
        while (await dst.execute("query-status"))["status"] != "running":
            assert time.monotonic() < deadline, "destination did not resume"
            await asyncio.sleep(0.1)
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        assert await asyncio.to_thread(accepting.check, "arrived") == "ok"
        await qemu_tls.clear(dst.execute)
        await qemu_tls.clear(src.execute)
        cleared = await src.execute("query-migrate-parameters")
        assert cleared["tls-creds"] == "" and cleared["tls-hostname"] == ""
        await dst.close()
    finally:
        await src.close()
