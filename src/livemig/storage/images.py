"""Disk images in and out of blockd volumes, through ``qemu-img`` over NBD.

Why ``qemu-img``: it reads every image format QEMU boots (raw, qcow2 with compressed clusters),
detects zeros and sends them as NBD ``WRITE_ZEROES`` (blockd punches holes, so a sparse image
stays sparse on the volume), speaks NBD with TLS when given credentials, and prints progress.
Its ``--image-opts`` name the NBD server, export and TLS object explicitly, so nothing is guessed.

Three rules keep an import honest:

* The format is the user's or ``qemu-img info``'s, and every later command is given it (``-f``):
  QEMU never probes a format while copying.
* Only self-contained images of a known format are taken: no backing file, no external data
  file, not marked corrupt, no corruption ``qemu-img check`` can find (a truncated qcow2 shows up
  there as references past the end of the file). Each refusal says what to do instead.
* Every NBD connection is built by :func:`nbd_target`, the one place that knows how to reach an
  attachment's export, so TLS credentials are added there and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import BootstrapError, InvalidRequest, LivemigError
from livemig.model.vm import NbdExport

#: What ``livemig volume import`` accepts; anything else must be converted first.
FORMATS = ("raw", "qcow2")
SECTOR = 512
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_TLS_OBJECT_ID = "livemig-nbd-client"

Progress = Callable[[float], None]


@dataclass(frozen=True)
class NbdClientTls:
    """Client credentials for a forced-TLS blockd, as QEMU's ``tls-creds-x509`` object reads them:
    a directory holding ``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` of a role
    blockd admits. ``hostname`` is the name blockd's certificate must carry; by default the
    export's own ``tls_hostname`` (what blockd's ``nbds://`` URI names)."""

    creds_dir: Path
    hostname: str | None = None


@dataclass(frozen=True)
class NbdTarget:
    """What ``qemu-img`` needs to reach one export: ``--object`` arguments and an image-opts string."""

    objects: list[str] = field(default_factory=list)
    image_opts: str = ""

    def object_args(self) -> list[str]:
        return [arg for obj in self.objects for arg in ("--object", obj)]


def _opt(value: str) -> str:
    """An image-opts value: commas are doubled (QEMU's option syntax), nothing else changes."""
    return value.replace(",", ",,")


def nbd_target(export: NbdExport, tls: NbdClientTls | None = None, *, size: int | None = None) -> NbdTarget:
    """How ``qemu-img`` reaches ``export``: the one function that turns an attachment into an NBD
    connection. ``size`` puts a ``raw`` node of exactly that many bytes on top (the NBD export
    may be larger than what is copied)."""
    nbd = [
        "driver=nbd",
        "server.type=inet",
        f"server.host={_opt(export.host)}",
        f"server.port={export.port}",
        f"export={_opt(export.export)}",
    ]
    objects: list[str] = []
    if tls is not None:
        objects.append(f"tls-creds-x509,id={_TLS_OBJECT_ID},dir={_opt(str(tls.creds_dir))},endpoint=client,"
                       "verify-peer=on")  # fmt: skip
        nbd.append(f"tls-creds={_TLS_OBJECT_ID}")
        hostname = tls.hostname or export.tls_hostname
        if hostname:
            nbd.append(f"tls-hostname={_opt(hostname)}")
    if size is None:
        return NbdTarget(objects, ",".join(nbd))
    return NbdTarget(objects, ",".join([f"driver=raw,size={size}", *(f"file.{o}" for o in nbd)]))


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageInfo:
    """A local image that passed every check: its format and the bytes a volume needs for it."""

    path: Path
    format: str
    virtual_size: int
    file_size: int


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise BootstrapError("qemu-img not found: install the Debian package qemu-utils")
    return path


def _run(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LivemigError(f"{argv[0]} {argv[1]} did not finish within {timeout:.0f}s") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("qemu-img: ") if lines else "no message"


def inspect_image(path: Path, fmt: str | None = None) -> ImageInfo:
    """Check that ``path`` is an image livemig can copy into a volume, and what it needs.

    Raises :class:`InvalidRequest` with what is wrong and what to do about it: an unknown format,
    a backing file, an external data file, an encrypted, corrupt or truncated image."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest(f"unknown image format {fmt!r}: livemig imports {' or '.join(FORMATS)}", format=fmt)
    if not path.exists():
        raise InvalidRequest(f"{path}: no such file")
    if not path.is_file() and not path.is_block_device():
        raise InvalidRequest(f"{path} is not a file")
    argv = [qemu_img(), "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    proc = _run(argv)
    if proc.returncode != 0:
        what = f"a {fmt} image" if fmt else "a disk image qemu-img can read"
        raise InvalidRequest(f"{path} is not {what}: {_last_line(proc.stderr)}", path=str(path))
    info: dict[str, Any] = json.loads(proc.stdout)
    if info.get("format") == "raw" and path.is_file():
        info["virtual-size"] = path.stat().st_size  # qemu-img rounds a raw file up to whole sectors
    return check_info(path, info, _qcow2_check(path) if info.get("format") == "qcow2" else None)


def _qcow2_check(path: Path) -> tuple[int, dict[str, Any], str]:
    """``qemu-img check``: (exit status, its JSON report, its last error line)."""
    proc = _run([qemu_img(), "check", "-f", "qcow2", "--output=json", str(path)], timeout=600)
    try:
        report: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        report = {}
    return proc.returncode, report, _last_line(proc.stderr)


def check_info(path: Path, info: dict[str, Any], check: tuple[int, dict[str, Any], str] | None) -> ImageInfo:
    """The refusal rules over ``qemu-img info``'s (and, for qcow2, ``check``'s) output; pure."""
    fmt = str(info.get("format", ""))
    if fmt not in FORMATS:
        raise InvalidRequest(
            f"{path} is a {fmt or 'unknown'} image: livemig imports raw or qcow2; convert it first "
            f"(qemu-img convert -f {fmt or 'FORMAT'} -O qcow2 {path} {path.stem}.qcow2)",
            format=fmt,
        )
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise InvalidRequest(
            f"{path} has a backing file ({backing}): import a self-contained image; flatten it first "
            f"(qemu-img convert -O qcow2 {path} flat.qcow2)",
            backing_file=str(backing),
        )
    specific = (info.get("format-specific") or {}).get("data") or {}
    data_file = specific.get("data-file")
    if data_file:
        raise InvalidRequest(
            f"{path} keeps its data in an external data file ({data_file}): import a self-contained image "
            f"(qemu-img convert -O qcow2 {path} whole.qcow2)",
            data_file=str(data_file),
        )
    if info.get("encrypted"):
        raise InvalidRequest(f"{path} is encrypted: decrypt it first (qemu-img convert --object secret,… -O qcow2)")
    if specific.get("corrupt"):
        raise InvalidRequest(f"{path} is marked corrupt by QEMU: repair it first (qemu-img check -r all {path})")
    size = int(info.get("virtual-size") or 0)
    if size <= 0:
        raise InvalidRequest(f"{path} is empty (virtual size 0)")
    if fmt == "raw" and size % SECTOR:
        raise InvalidRequest(f"{path} is {size} bytes, not whole {SECTOR}-byte sectors: a raw disk image "
                             "of that size is truncated or not a disk image")  # fmt: skip
    if check is not None:
        status, report, last = check
        corruptions = int(report.get("corruptions", 0) or 0)
        if status == 2 or corruptions:
            raise InvalidRequest(
                f"{path} is corrupt or truncated: qemu-img check found {corruptions or 'some'} corruption(s) "
                f"({last}); a truncated download looks like this, fetch the image again",
                corruptions=corruptions,
            )
        if status not in (0, 3):  # 3: leaked clusters only, which lose no data
            raise InvalidRequest(f"{path} could not be checked: {last}")
    return ImageInfo(path=path, format=fmt, virtual_size=size, file_size=int(info.get("actual-size") or 0))


# ---------------------------------------------------------------------------------------------- copying


def _convert(argv: list[str], progress: Progress | None) -> None:
    """Run one ``qemu-img convert -p``, feeding its percentages to ``progress``."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        buffer = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            for line in done:
                match = _PROGRESS.search(line)
                if match and progress is not None:
                    progress(float(match.group(1)))
        err = proc.stderr.read().decode(errors="replace")
        status = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    if status != 0:
        raise LivemigError(f"qemu-img convert failed: {_last_line(err)}")


def copy_to_volume(
    image: ImageInfo, export: NbdExport, tls: NbdClientTls | None = None, *, volume_is_empty: bool = False,
    progress: Progress | None = None,
) -> None:  # fmt: skip
    """Write ``image`` into the export, from its first byte; zero runs go out as WRITE_ZEROES.

    ``volume_is_empty``: the volume holds nothing yet (nothing allocated), so zero runs need not
    be sent at all (``--target-is-zero``)."""
    target = nbd_target(export, tls)
    argv = [qemu_img(), "convert", "-p", "-n", "-f", image.format, *target.object_args(), str(image.path),
            "--target-image-opts", target.image_opts]  # fmt: skip
    if volume_is_empty:
        argv.insert(argv.index("-n") + 1, "--target-is-zero")
    _convert(argv, progress)


def copy_from_volume(
    export: NbdExport, size: int, destination: Path, fmt: str, tls: NbdClientTls | None = None, *,
    progress: Progress | None = None,
) -> None:  # fmt: skip
    """Read ``size`` bytes of the export into a new image file ``destination`` of format ``fmt``.

    The image is written beside ``destination`` and renamed into place only when complete, so a
    failed or interrupted export never leaves a half image under the name asked for."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown image format {fmt!r}: livemig exports {' or '.join(FORMATS)}", format=fmt)
    source = nbd_target(export, tls, size=size)
    destination = destination.absolute()
    if not destination.parent.is_dir():
        raise InvalidRequest(f"{destination.parent} is not a directory")
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.", dir=destination.parent) as tmp:
        partial = Path(tmp) / destination.name
        argv = [qemu_img(), "convert", "-p", *source.object_args(), "--image-opts", source.image_opts,
                "-O", fmt, str(partial)]  # fmt: skip
        _convert(argv, progress)
        partial.replace(destination)


def read_volume(export: NbdExport, size: int, tls: NbdClientTls | None = None) -> bytes:
    """The first ``size`` bytes of the export (small volumes: a variable store, a seed disk)."""
    with tempfile.TemporaryDirectory(prefix="livemig-read-") as tmp:
        out = Path(tmp) / "volume.raw"
        source = nbd_target(export, tls, size=size)
        argv = [qemu_img(), "convert", *source.object_args(), "--image-opts", source.image_opts,
                "-O", "raw", str(out)]  # fmt: skip
        proc = _run(argv)
        if proc.returncode != 0:
            raise LivemigError(f"reading volume {export.export.split('/')[0]} failed: {_last_line(proc.stderr)}")
        return out.read_bytes()


def write_volume(export: NbdExport, source: Path, tls: NbdClientTls | None = None) -> None:
    """Write the raw file ``source`` at the start of the export and flush it (small volumes)."""
    target = nbd_target(export, tls, size=source.stat().st_size)
    argv = [qemu_img(), "convert", "-n", "-f", "raw", *target.object_args(), str(source),
            "--target-image-opts", target.image_opts]  # fmt: skip
    proc = _run(argv)
    if proc.returncode != 0:
        raise LivemigError(f"writing volume {export.export.split('/')[0]} failed: {_last_line(proc.stderr)}")
