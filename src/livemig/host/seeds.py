"""What hostd writes into a new VM's own volumes before QEMU starts: the UEFI variable store
and the cloud-init seed.

Why hostd, through the VM's own attachment: the store must start as the empty store *of the
OVMF build hostd pins* (a template from another build may not match the CODE's layout), and only
the host has that build's files; the LMO and blockd need no firmware installed. Writing through
the attachment QEMU is about to use keeps every byte on the one write path blockd fences and
counts, with no upload route that bypasses attachments. It happens only when a VM is created,
never on a migration's destination, and an existing store is kept, never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from livemig.errors import InvalidRequest
from livemig.guest.cidata import build_cidata
from livemig.host.firmware import FirmwareBuild
from livemig.host.runtime import QemuRuntime
from livemig.model.vm import CIDATA_SLOT, NVRAM_BYTES, NVRAM_SLOT, NbdExport, VmSpec

#: where an OVMF variable store (a UEFI firmware volume) carries its signature
FV_SIGNATURE_OFFSET = 0x28
FV_SIGNATURE = b"_FVH"


def store_state(content: bytes) -> str:
    """``empty`` (never written), ``store`` (an OVMF variable store) or ``foreign`` (anything else)."""
    if content.count(0) == len(content):
        return "empty"
    if content[FV_SIGNATURE_OFFSET : FV_SIGNATURE_OFFSET + len(FV_SIGNATURE)] == FV_SIGNATURE:
        return "store"
    return "foreign"


async def initialise_nvram(
    runtime: QemuRuntime, export: NbdExport, template: Path, volume: str, tls_dir: Path | None = None
) -> str:
    """Give an empty NVRAM volume the build's empty store; keep a store that is already there.

    Returns what was done (``initialised`` or ``kept``); refuses a volume of the wrong size or
    holding something else (it would be a data volume named by mistake)."""
    content = await runtime.read_volume(export, NVRAM_BYTES, tls_dir)
    if len(content) != NVRAM_BYTES:
        raise InvalidRequest(f"NVRAM volume {volume} holds {len(content)} bytes, the 4M OVMF store needs {NVRAM_BYTES}")
    state = store_state(content)
    if state == "store":
        return "kept"
    if state == "foreign":
        raise InvalidRequest(f"volume {volume} is neither empty nor an OVMF variable store: it is not this VM's NVRAM")
    await runtime.write_volume(export, template, tls_dir)
    return "initialised"


async def fill_new_vm_volumes(
    runtime: QemuRuntime,
    spec: VmSpec,
    exports: dict[str, NbdExport],
    firmware: FirmwareBuild | None,
    workdir: Path,
    tls_dir: Path | None = None,
) -> list[str]:
    """Initialise a new VM's variable store and write its seed; returns what was done, for the log.
    ``tls_dir``: the host's QEMU certificate directory, when blockd serves NBD over TLS."""
    done: list[str] = []
    if spec.firmware is not None and spec.firmware.kind == "uefi":
        export = exports.get(NVRAM_SLOT)
        if export is None or firmware is None or firmware.vars_template is None or not spec.firmware.nvram_volume:
            raise InvalidRequest(f"VM {spec.name}: a UEFI VM needs its NVRAM volume attached (the LMO creates it)")
        what = await initialise_nvram(runtime, export, firmware.vars_template, spec.firmware.nvram_volume, tls_dir)
        done.append(f"NVRAM {spec.firmware.nvram_volume} {what} ({firmware.vars_template.name})")
    if spec.cloud_init is not None:
        export = exports.get(CIDATA_SLOT)
        if export is None:
            raise InvalidRequest(f"VM {spec.name}: its cloud-init seed volume is not attached (the LMO creates it)")
        seed_path = workdir / "cidata.img"
        try:
            seed = await asyncio.to_thread(
                build_cidata, seed_path, hostname=spec.cloud_init.hostname,
                ssh_public_keys=spec.cloud_init.ssh_authorized_keys,
                instance_id=spec.cloud_init.instance_id or f"iid-{spec.name}",
            )  # fmt: skip
            await runtime.write_volume(export, seed, tls_dir)
        finally:
            with contextlib.suppress(OSError):
                seed_path.unlink()
        done.append(f"cloud-init seed {spec.cloud_init.volume} written (host name {spec.cloud_init.hostname})")
    return done
