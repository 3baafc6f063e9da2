"""blockd's core: volumes + attachments/fencing, seen by the NBD server as exports.

Export names and secrets (why this shape: real, unmodified NBD clients - qemu, qemu-img, nbdinfo,
nbdcopy - can only send an export name, so the per-attachment secret travels inside it)::

    <volume>/<attachment-id>.<secret>        e.g.  db1/5f0c2a9e1b7d4c33.9a1f...e2 (32 hex digits)
    nbd://127.0.0.1:10809/<volume>/<attachment-id>.<secret>

* unknown volume, unknown or detached attachment, or an attachment of another volume
  -> ``NBD_REP_ERR_UNKNOWN`` with a message saying which;
* known attachment, wrong secret -> ``NBD_REP_ERR_POLICY`` ("secret does not match");
* ``NBD_OPT_LIST`` is refused (``NBD_REP_ERR_POLICY``): listing would print the secrets.

Only the SHA-256 of a secret is stored; the secret itself is returned once, by the attach call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from livemig.errors import Conflict, LivemigError
from livemig.storage.fencing import Attachment, FenceRegistry, fencing_enabled_from_env
from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.server import ExportRefused, ExportSession, NbdServer
from livemig.storage.volumes import Volume, VolumeStore, validate_name

log = logging.getLogger(__name__)


def export_name(volume: str, attachment_id: str, secret: str) -> str:
    return f"{volume}/{attachment_id}.{secret}"


def parse_export_name(name: str) -> tuple[str, str, str]:
    """Split ``<volume>/<attachment-id>.<secret>``; anything else is an unknown export."""
    volume, slash, rest = name.rpartition("/")
    attachment_id, dot, secret = rest.partition(".")
    if not slash or not dot or not volume or not attachment_id or not secret:
        raise ExportRefused(
            f"unknown export {name[:80]!r}: blockd exports are named <volume>/<attachment-id>.<secret>, "
            "as returned by POST /volumes/{name}/attachments"
        )
    return volume, attachment_id, secret


@dataclass(frozen=True)
class AttachResult:
    attachment: Attachment
    secret: str
    export_name: str
    nbd_uri: str


class _Session:
    """One NBD connection's view of an attachment (implements ``ExportSession``)."""

    def __init__(self, blockd: Blockd, attachment: Attachment, fd: int, size: int) -> None:
        self._blockd = blockd
        self.attachment = attachment
        self._fd = fd
        self._size = size
        self._label = f"{attachment.volume}/{attachment.id} (vm {attachment.vm} on {attachment.host})"
        self._fences = blockd.fences
        self._counters = attachment.counters

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def label(self) -> str:
        return self._label

    def try_begin_write(self) -> bool | None:
        return self._fences.try_begin_write(self.attachment)

    async def begin_write(self) -> bool:
        return await self._fences.begin_write(self.attachment)

    def end_write(self, nbytes: int) -> None:
        self._fences.end_write(self.attachment)
        self._counters.writes += 1
        self._counters.bytes_written += nbytes

    def record_read(self, nbytes: int) -> None:
        self._counters.reads += 1
        self._counters.bytes_read += nbytes

    def record_flush(self) -> None:
        self._counters.flushes += 1

    def close(self) -> None:
        self._blockd._sessions.discard(self)
        os.close(self._fd)


class Blockd:
    """Volumes, attachments and fencing behind one object; the NBD server's ExportProvider."""

    def __init__(self, data_dir: Path, *, fencing: bool | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.volumes = VolumeStore(data_dir)
        enabled = fencing_enabled_from_env() if fencing is None else fencing
        self.fences = FenceRegistry(data_dir / "attachments.json", enabled=enabled)
        self.server: NbdServer | None = None
        self.nbd_host = "127.0.0.1"
        self.nbd_port = 0
        self._sessions: set[_Session] = set()

    def bind_server(self, server: NbdServer, host: str, port: int) -> None:
        """Remember the NBD server (to drop detached clients) and the address for ``nbd_uri``."""
        self.server = server
        self.nbd_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self.nbd_port = port

    def nbd_uri(self, name: str) -> str:
        """``nbd://`` or, when the server requires TLS, ``nbds://`` (libnbd's and the NBD URI spec's scheme)."""
        host = f"[{self.nbd_host}]" if ":" in self.nbd_host else self.nbd_host
        scheme = "nbds" if self.server is not None and self.server.tls is not None else "nbd"
        return f"{scheme}://{host}:{self.nbd_port}/{name}"

    # --- ExportProvider --------------------------------------------------------------------------

    def open_export(self, name: str) -> ExportSession:
        volume_name, attachment_id, secret = parse_export_name(name)
        try:
            validate_name(volume_name)
            attachment = self.fences.get(attachment_id)
        except LivemigError:
            raise ExportRefused(
                f"unknown export: no attachment {attachment_id[:40]!r} of volume {volume_name[:64]!r}"
            ) from None
        if attachment.volume != volume_name:
            raise ExportRefused(f"unknown export: attachment {attachment_id} is not an attachment of {volume_name!r}")
        if attachment.detached:
            raise ExportRefused(f"unknown export: attachment {attachment_id} of {volume_name!r} was detached")
        if not self.fences.check_secret(attachment, secret):
            raise ExportRefused(
                f"access denied: the secret in the export name does not match attachment {attachment_id}",
                p.OptionReply.ERR_POLICY,
            )
        try:
            volume = self.volumes.get(volume_name)
            fd = os.open(self.volumes.path(volume_name), os.O_RDWR | os.O_CLOEXEC)
        except (LivemigError, OSError) as exc:
            raise ExportRefused(f"volume {volume_name!r} cannot be opened: {exc}") from None
        session = _Session(self, attachment, fd, volume.size_bytes)
        self._sessions.add(session)
        return session

    def connections_of(self, attachment_id: str) -> int:
        return sum(1 for s in self._sessions if s.attachment.id == attachment_id)

    # --- volumes ---------------------------------------------------------------------------------

    def create_volume(self, name: str, size_bytes: int) -> Volume:
        return self.volumes.create(name, size_bytes)

    def resize_volume(self, name: str, size_bytes: int) -> Volume:
        """Grow a volume. Connected clients keep the size they negotiated until they reconnect."""
        return self.volumes.resize(name, size_bytes)

    def delete_volume(self, name: str) -> None:
        self.volumes.get(name)
        active = self.fences.of_volume(name)
        if active:
            raise Conflict(
                f"volume {name!r} is attached ({', '.join(a.id for a in active)}); detach first",
                volume=name,
                attachments=[a.id for a in active],
            )
        self.volumes.delete(name)
        self.fences.forget_volume(name)

    # --- attachments -----------------------------------------------------------------------------

    def attach(self, volume: str, vm: str, host: str) -> AttachResult:
        self.volumes.get(volume)
        attachment, secret = self.fences.attach(volume, vm, host)
        name = export_name(volume, attachment.id, secret)
        return AttachResult(attachment, secret, name, self.nbd_uri(name))

    async def detach(self, attachment_id: str) -> Attachment:
        attachment = await self.fences.detach(attachment_id)
        if self.server is not None:
            dropped = self.server.disconnect(lambda s: isinstance(s, _Session) and s.attachment.id == attachment_id)
            if dropped:
                log.info("dropped %d NBD connection(s) of detached attachment %s", dropped, attachment_id)
        return attachment

    async def fence(self, attachment_id: str) -> Attachment:
        return await self.fences.fence(attachment_id)
