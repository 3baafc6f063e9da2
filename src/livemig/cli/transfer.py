"""``livemig volume import`` and ``export``: disk images into and out of blockd volumes.

The image is checked on this machine first (``storage.images.inspect_image``), so a refused
image changes nothing. The copy runs through a *transfer*: a short-lived attachment of the volume
the LMO opens for this client and detaches afterwards, whatever happens (the client renews its
lease while it copies; if the client dies, the LMO detaches it when the lease runs out). A volume
the import created is deleted again if the copy fails.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from livemig import errors
from livemig.errors import InvalidRequest
from livemig.model.vm import NbdExport
from livemig.storage.images import ImageInfo, NbdClientTls, copy_from_volume, copy_to_volume, inspect_image
from livemig.wire import lmo as wire_lmo
from livemig.wire.lmo import LmoClient, Transfer, TransferMode

MIB = 1 << 20
#: how long a transfer lives without renewal; the client renews it four times per lease
TRANSFER_TTL_S = 60.0

Progress = Callable[[float], None]


@contextlib.contextmanager
def nbd_client_tls(export: NbdExport, state_dir: Path | None = None) -> Iterator[NbdClientTls | None]:
    """This client's NBD credentials for ``export``: None while blockd serves it plain.

    blockd admits the LMO's certificate on NBD (a transfer is the LMO's attachment, made for this
    client), so an import or export over TLS runs where that certificate is: the machine holding
    the region (``livemig up``'s ``STATE_DIR/pki``). The files are laid out as QEMU's
    ``tls-creds-x509`` reads them, in a private directory removed afterwards. Every copy below
    passes what this yields to ``storage.images``, whose :func:`~livemig.storage.images.nbd_target`
    adds the ``tls-creds-x509`` object."""
    if not export.tls_hostname:
        yield None
        return
    from livemig.region.local import Region
    from livemig.security import pki
    from livemig.security.pki import Role

    region = Region(state_dir)
    if region.load() is None or not region.pki_dir.is_dir():
        raise InvalidRequest("blockd serves NBD over TLS: run `livemig volume import|export` on the machine that "
                             f"holds the region's certificates (none in {region.state_dir}; "
                             "--state-dir names it)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="livemig-nbd-tls-") as tmp:
        directory = pki.qemu_tls_dir(region.pki_dir, "lmo", Path(tmp) / "creds", role=Role.LMO)
        yield NbdClientTls(directory)


@contextlib.contextmanager
def open_transfer(
    client: LmoClient, volume: str, mode: TransferMode, ttl_s: float = TRANSFER_TTL_S
) -> Iterator[Transfer]:
    """A transfer on ``volume`` for the duration of the block; renewed meanwhile, always closed."""
    transfer = client.run(wire_lmo.open_transfer(volume, mode, ttl_s))
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(ttl_s / 4):
            with contextlib.suppress(errors.LivemigError):  # a missed renewal: the next one may land
                client.run(wire_lmo.renew_transfer(transfer.id, ttl_s))

    renewer = threading.Thread(target=keep_alive, name=f"renew-{transfer.id}", daemon=True)
    renewer.start()
    try:
        yield transfer
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(errors.NotFound):
            client.run(wire_lmo.close_transfer(transfer.id))


def _round_up(size: int, unit: int = MIB) -> int:
    return -(-size // unit) * unit


@dataclass(frozen=True)
class ImportResult:
    volume: str
    image: ImageInfo
    volume_bytes: int
    created: bool
    grown: bool


def import_image(
    client: LmoClient, volume: str, path: Path, *, fmt: str | None = None, grow: bool = False,
    size_mib: int | None = None, progress: Progress | None = None, state_dir: Path | None = None,
) -> ImportResult:  # fmt: skip
    """Copy the image at ``path`` into ``volume`` (created if missing: ``size_mib`` or the image's size)."""
    image = inspect_image(path, fmt)  # every refusal about the image comes before anything changes
    wanted = _round_up(image.virtual_size)
    if size_mib is not None and size_mib * MIB < image.virtual_size:
        raise InvalidRequest(f"--size-mib {size_mib} is smaller than the image ({image.virtual_size / MIB:.1f} MiB)")
    created = grown = False
    try:
        size = client.run(wire_lmo.volume(volume)).volume.size_bytes
    except errors.NotFound:
        size = max(wanted, (size_mib or 0) * MIB)
        client.run(wire_lmo.create_volume(volume, size))
        created = True
    if image.virtual_size > size:
        if not grow:
            raise InvalidRequest(
                f"image {path} is {image.virtual_size} bytes ({image.virtual_size / MIB:.1f} MiB) but volume {volume} "
                f"holds {size} ({size / MIB:.1f} MiB): pass --grow to grow the volume to fit",
                image_bytes=image.virtual_size, volume_bytes=size,
            )  # fmt: skip
        size = client.run(wire_lmo.resize_volume(volume, wanted)).size_bytes
        grown = True
    try:
        with (
            open_transfer(client, volume, TransferMode.WRITE) as transfer,
            nbd_client_tls(transfer.export, state_dir) as tls,
        ):
            copy_to_volume(image, transfer.export, tls, volume_is_empty=transfer.allocated_bytes == 0,
                           progress=progress)  # fmt: skip
    except BaseException:
        if created:  # nothing half-imported is left behind under the name asked for
            with contextlib.suppress(errors.LivemigError):
                client.run(wire_lmo.delete_volume(volume))
        raise
    return ImportResult(volume, image, size, created, grown)


def export_image(
    client: LmoClient, volume: str, path: Path, *, fmt: str = "qcow2", force: bool = False,
    progress: Progress | None = None, state_dir: Path | None = None,
) -> int:  # fmt: skip
    """Copy ``volume`` into a new image file at ``path``; returns the volume's size in bytes."""
    if path.exists() and not force:
        raise InvalidRequest(f"{path} exists: pass --force to replace it")
    with open_transfer(client, volume, TransferMode.READ) as transfer:
        with nbd_client_tls(transfer.export, state_dir) as tls:
            copy_from_volume(transfer.export, transfer.size_bytes, path, fmt, tls, progress=progress)
        return transfer.size_bytes
