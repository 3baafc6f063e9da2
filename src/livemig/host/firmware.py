"""The firmware builds a host offers (SeaBIOS, OVMF), found on disk and named by their checksum.

Why checksums: QEMU migrates the firmware's flash (or ROM) contents as RAM, so a VM that started
under one OVMF build keeps running that build's code after a migration, while its variable store
and anything it reloads come from the destination's files. A destination with a different build
of the same firmware would run mismatched code. So hostd pins the build's name and the SHA-256
of its CODE (or ROM) file in the VM's spec when it creates the VM, every host reports its builds
(``HostInfo.firmware``), and the pre-flight check refuses a destination whose build differs.

Which files (Debian 12's ``ovmf`` and ``seabios`` packages):

* ``ovmf-4m``: ``OVMF_CODE_4M.fd`` with the empty store ``OVMF_VARS_4M.fd`` (540,672 bytes).
  Never the 2 MB ``OVMF_CODE.fd``: mixing its 128 KiB store with 4M code silently loses variables.
* ``ovmf-4m-secboot``: ``OVMF_CODE_4M.secboot.fd`` (needs SMM) with ``OVMF_VARS_4M.ms.fd``
  (Microsoft's keys enrolled, Secure Boot on).
* ``seabios``: ``bios-256k.bin``; SeaBIOS keeps no variables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from livemig.errors import InvalidRequest
from livemig.model.vm import FIRMWARE_PACKAGES, NVRAM_BYTES, FirmwareSpec

DEFAULT_OVMF_DIR = Path("/usr/share/OVMF")
DEFAULT_SEABIOS = Path("/usr/share/seabios/bios-256k.bin")

#: build name -> (CODE or ROM file, variable store template) under the OVMF directory
_OVMF_FILES: dict[str, tuple[str, str]] = {
    "ovmf-4m": ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    "ovmf-4m-secboot": ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
}


@dataclass(frozen=True)
class FirmwareBuild:
    """One firmware build on this host: its code (or ROM) and, for OVMF, its empty variable store."""

    name: str
    code: Path
    sha256: str
    vars_template: Path | None = None

    @property
    def uefi(self) -> bool:
        return self.vars_template is not None


@lru_cache(maxsize=32)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Checksum of a firmware file; cached per (size, mtime) so a replaced file is read again."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


class FirmwareCatalog:
    """The builds found in an OVMF directory and a SeaBIOS ROM; missing files mean missing builds."""

    def __init__(self, builds: dict[str, FirmwareBuild]) -> None:
        self.builds = builds

    @classmethod
    def scan(cls, ovmf_dir: Path = DEFAULT_OVMF_DIR, seabios: Path = DEFAULT_SEABIOS) -> FirmwareCatalog:
        builds: dict[str, FirmwareBuild] = {}
        for name, (code_name, vars_name) in _OVMF_FILES.items():
            code, template = ovmf_dir / code_name, ovmf_dir / vars_name
            if code.is_file() and template.is_file() and template.stat().st_size == NVRAM_BYTES:
                builds[name] = FirmwareBuild(name, code, file_sha256(code), template)
        if seabios.is_file():
            builds["seabios"] = FirmwareBuild("seabios", seabios, file_sha256(seabios))
        return cls(builds)

    def report(self) -> dict[str, str]:
        """Build name -> SHA-256 of its code: what a host tells the LMO (``HostInfo.firmware``)."""
        return {name: build.sha256 for name, build in sorted(self.builds.items())}

    def for_new_vm(self, firmware: FirmwareSpec) -> FirmwareBuild:
        """The build a new VM gets for what its spec asks (InvalidRequest naming the package if absent)."""
        return self._named(firmware.wanted_build)

    def pinned(self, firmware: FirmwareSpec, host: str) -> FirmwareBuild:
        """The build a VM was created with, refused unless this host has the very same file."""
        why = firmware.mismatch(self.report(), host)
        if why is not None or firmware.build is None:
            raise InvalidRequest(f"firmware: {why}", build=firmware.build, host=host)
        return self.builds[firmware.build]

    def _named(self, name: str) -> FirmwareBuild:
        build = self.builds.get(name)
        if build is None:
            raise InvalidRequest(
                f"firmware {name} is not installed on this host (Debian package {FIRMWARE_PACKAGES.get(name, '?')})",
                build=name,
            )
        return build
