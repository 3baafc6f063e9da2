"""Volumes: sparse files under ``<data_dir>/volumes/`` plus their metadata in ``volumes.json``.

Why the metadata is the source of truth and the file follows it: a volume exists, and has the
size it has, once ``volumes.json`` says so (atomically, durably). Every change touches the file
first and the metadata second, so after a crash at any point :meth:`VolumeStore.__init__` can
bring the files back in line with the metadata (remove a half-created file, redo a resize) and
nothing a client was told about is lost.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from livemig.errors import Conflict, InvalidRequest, LivemigError, NotFound
from livemig.statefile import StateFile, fsync_dir

log = logging.getLogger(__name__)

#: Lower-case letters, digits, '.', '_' and '-'; starts with a letter or digit; at most 63 chars.
#: No '/' (the name is a file name and the first part of an export name) and no "..".
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: Sizes are whole 512-byte sectors: QEMU's block layer cannot address a partial last sector.
SECTOR = 512
#: 8 TiB: far below ext4's and XFS's file size limits, far above any test.
MAX_SIZE = 8 << 40
VOLUME_SUFFIX = ".vol"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid volume name, else raise InvalidRequest saying why."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"invalid volume name {name!r}: use 1-63 of a-z 0-9 . _ -, starting with a letter or digit, no '..'",
            field="name",
        )
    return name


def validate_size(size_bytes: int) -> int:
    """Return ``size_bytes`` if it is a usable volume size, else raise InvalidRequest saying why."""
    if size_bytes <= 0 or size_bytes % SECTOR:
        raise InvalidRequest(
            f"size_bytes must be a positive multiple of {SECTOR}, got {size_bytes}", field="size_bytes"
        )
    if size_bytes > MAX_SIZE:
        raise InvalidRequest(f"size_bytes {size_bytes} exceeds the {MAX_SIZE}-byte maximum", field="size_bytes")
    return size_bytes


@dataclass(frozen=True)
class Volume:
    """What blockd remembers about one volume."""

    name: str
    size_bytes: int
    created_at: float


class VolumeStore:
    """Create, resize (up), list and delete volumes; survives restart and ``kill -9``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dir = data_dir / "volumes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state = StateFile(data_dir / "volumes.json")
        self._volumes: dict[str, Volume] = {}
        saved = self._state.load() or {}
        for entry in saved.get("volumes", []):
            volume = Volume(str(entry["name"]), int(entry["size_bytes"]), float(entry["created_at"]))
            self._volumes[volume.name] = volume
        self._reconcile()

    # --- queries ---------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.dir / f"{validate_name(name)}{VOLUME_SUFFIX}"

    def get(self, name: str) -> Volume:
        validate_name(name)
        try:
            return self._volumes[name]
        except KeyError:
            raise NotFound(f"no volume named {name!r}", volume=name) from None

    def list(self) -> list[Volume]:
        return sorted(self._volumes.values(), key=lambda v: v.name)

    def allocated_bytes(self, name: str) -> int:
        """Bytes the sparse file really occupies on disk (what TRIM gives back)."""
        try:
            return self.path(name).stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    # --- changes ---------------------------------------------------------------------------------

    def create(self, name: str, size_bytes: int, preallocate: bool = False) -> Volume:
        """A new volume: a sparse file, or with ``preallocate`` one whose blocks are all reserved
        now (so a guest's write can never meet ENOSPC, which QEMU answers by pausing the VM)."""
        validate_name(name)
        validate_size(size_bytes)
        if name in self._volumes:
            raise Conflict(f"volume {name!r} already exists", volume=name)
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.creating")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            if preallocate:
                os.posix_fallocate(fd, 0, size_bytes)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise LivemigError(f"cannot create volume file for {name!r}: {exc}") from exc
        os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.dir)
        volume = Volume(name, size_bytes, time.time())
        self._volumes[name] = volume
        self._save()
        log.info("created volume %s (%d bytes)", name, size_bytes)
        return volume

    def resize(self, name: str, size_bytes: int) -> Volume:
        """Grow a volume; shrinking is refused (it would cut off data a guest may still use)."""
        volume = self.get(name)
        validate_size(size_bytes)
        if size_bytes < volume.size_bytes:
            raise InvalidRequest(
                f"volume {name!r} can only grow: {size_bytes} < current {volume.size_bytes} bytes",
                volume=name,
                size_bytes=volume.size_bytes,
            )
        if size_bytes == volume.size_bytes:
            return volume
        self._truncate(self.path(name), size_bytes)
        grown = Volume(name, size_bytes, volume.created_at)
        self._volumes[name] = grown
        self._save()
        log.info("resized volume %s to %d bytes", name, size_bytes)
        return grown

    def delete(self, name: str) -> None:
        self.get(name)
        del self._volumes[name]
        self._save()
        self.path(name).unlink(missing_ok=True)
        fsync_dir(self.dir)
        log.info("deleted volume %s", name)

    # --- internals -------------------------------------------------------------------------------

    def _save(self) -> None:
        self._state.save({"volumes": [asdict(v) for v in self.list()]})

    @staticmethod
    def _truncate(path: Path, size_bytes: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _reconcile(self) -> None:
        """Bring the files in line with the metadata after a crash."""
        for leftover in self.dir.glob(".*.creating"):
            log.warning("removing half-created volume file %s", leftover.name)
            leftover.unlink(missing_ok=True)
        for path in self.dir.glob(f"*{VOLUME_SUFFIX}"):
            name = path.name.removesuffix(VOLUME_SUFFIX)
            if name not in self._volumes:
                log.warning("removing volume file %s that no metadata mentions (crash during create/delete)", path)
                path.unlink(missing_ok=True)
        for volume in list(self._volumes.values()):
            path = self.path(volume.name)
            if not path.exists():
                log.error("volume %s has metadata but no file; recreating it empty", volume.name)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
            if path.stat().st_size != volume.size_bytes:
                log.warning(
                    "volume %s file size differs from metadata; truncating to %d", volume.name, volume.size_bytes
                )
                self._truncate(path, volume.size_bytes)
