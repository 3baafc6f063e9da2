"""Build (and cache) a real Debian 12 guest disk image: GPT, UEFI and BIOS bootable, cloud-init.

Why this exists: livemig's own test guest boots a kernel and an initramfs directly; users' VMs
boot their own distribution from a disk under firmware, and cloud-init configures them from a
seed. This image stands in for such a cloud image in tests, built offline from Debian packages
only (the recipe, and why each choice, is in :mod:`livemig.guest.distro_recipe`).

How, without mounts or loop devices:

1. ``mmdebstrap`` installs the system into a directory (root mode as root; as another user,
   unshare mode, and every later step that must see true ownership runs under
   ``mmdebstrap --unshare-helper``). Hooks copy the configuration in, enable and mask units,
   drop the host keys, and copy the kernel and initrd out. Downloaded packages are kept in
   ``<cache>/distro/debs`` so a rebuild after a recipe change downloads nothing new.
2. ``mkfs.ext4 -d`` turns the directory into the root file system image.
3. ``mkfs.vfat`` + mtools fill the ESP (systemd-boot, syslinux, kernel, initrd);
   ``syslinux --install`` writes the FAT boot sector and ``ldlinux.sys``.
4. ``sgdisk`` partitions a sparse raw disk; syslinux's ``gptmbr.bin`` goes into the MBR; the two
   file system images are copied in at their offsets, holes kept.
5. ``qemu-img convert -c`` makes the compact qcow2 (zstd-compressed clusters), published with a stamp under
   ``<cache>/distro/<recipe-hash>/`` (build in a temporary directory, ``os.replace`` under a
   lock, stamp last: a crash or a concurrent builder never leaves a half image that looks valid).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from livemig.guest import distro_recipe as recipe
from livemig.guest.errors import ImageBuildError

__all__ = [
    "DiskImage",
    "ImageBuildError",
    "Tool",
    "build_disk_image",
    "find_tools",
]

Progress = Callable[[str], None]

_STAMP = "image.json"
_QCOW2 = "disk.qcow2"
_SBIN = ("/usr/sbin", "/sbin")
_MMDEBSTRAP_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Tool:
    """A host file the build needs, and the Debian package that ships it."""

    name: str
    package: str
    path: str | None = None  # a data file rather than a program on $PATH


#: Everything the build runs or copies. Checked up front so a missing one fails in a second,
#: with one apt-get line, not ten minutes into a build.
TOOLS: tuple[Tool, ...] = (
    Tool("mmdebstrap", "mmdebstrap"),
    Tool("mkfs.ext4", "e2fsprogs"),
    Tool("mkfs.vfat", "dosfstools"),
    Tool("mcopy", "mtools"),
    Tool("mmd", "mtools"),
    Tool("sgdisk", "gdisk"),
    Tool("syslinux", "syslinux"),
    Tool("qemu-img", "qemu-utils"),
    Tool("gptmbr.bin", "syslinux-common", "/usr/lib/syslinux/mbr/gptmbr.bin"),
    Tool("ldlinux.c32", "syslinux-common", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
    Tool("systemd-bootx64.efi", "systemd-boot-efi", "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
)


@dataclass(frozen=True)
class DiskImage:
    """A built disk image: a compressed qcow2 of a GPT disk of ``virtual_size`` bytes.

    Callers never boot ``path`` itself: they convert it into a volume, or put a qcow2 overlay on
    top of it (it is shared by every test and every later call).
    """

    path: Path
    virtual_size: int  # bytes of the raw disk (what a volume for it must hold)
    file_size: int  # bytes of the qcow2 file
    allocated: int  # bytes of the raw disk that hold data (the rest are holes)
    recipe: str
    kernel_version: str
    kernel_cmdline: str
    default_user: str
    build_seconds: float  # how long the build that made it took


def _search_path() -> str:
    """``$PATH`` plus the sbin directories: mkfs and sgdisk live there, off a user's PATH."""
    parts = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join(parts + [d for d in _SBIN if d not in parts])


def find_tools(tools: Sequence[Tool] = TOOLS) -> dict[str, Path]:
    """Where each tool is; raises :class:`ImageBuildError` naming the apt-get line for the missing ones."""
    found: dict[str, Path] = {}
    missing: list[Tool] = []
    path = _search_path()
    for tool in tools:
        if tool.path is not None:
            location: str | None = tool.path if os.path.isfile(tool.path) else None
        else:
            location = shutil.which(tool.name, path=path)
        if location is None:
            missing.append(tool)
        else:
            found[tool.name] = Path(location)
    if missing:
        names = ", ".join(t.name for t in missing)
        packages = " ".join(dict.fromkeys(t.package for t in missing))
        raise ImageBuildError(
            f"building the Debian disk image needs {names}: apt-get install -y {packages}",
            missing=[t.name for t in missing],
            packages=packages.split(),
        )
    return found


# --------------------------------------------------------------------------- running tools


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "PATH": _search_path()}


def _run(argv: Sequence[str | os.PathLike[str]], what: str, *, timeout: float = 600.0) -> str:
    """Run one build step; any failure is an :class:`ImageBuildError` with the tool's last words."""
    try:
        proc = subprocess.run(
            [os.fspath(a) for a in argv],
            capture_output=True,
            env=_env(),
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what} failed: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise ImageBuildError(f"{what} failed: cannot run {argv[0]}: {exc}") from None
    if proc.returncode != 0:
        words = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        tail = "\n".join(words[-8:]) or f"exit status {proc.returncode}"
        raise ImageBuildError(f"{what} failed: {tail}")
    return proc.stdout.decode(errors="replace")


def _run_streaming(argv: Sequence[str], what: str, progress: Progress, *, timeout: float) -> None:
    """Run a long step, passing its ``I:`` status lines to ``progress`` as they come.

    A timer kills the step at the deadline, so a stalled mirror cannot hang the caller even when
    the step stops printing.
    """
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,  # its own process group: apt and dpkg stop with it
        )
    except OSError as exc:
        raise ImageBuildError(f"{what} failed: cannot run {argv[0]}: {exc}") from None
    expired = threading.Event()

    def stop() -> None:
        # SIGTERM first: mmdebstrap then unmounts what it mounted in the chroot; SIGKILL if it hangs.
        expired.set()
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 0.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace or None)
                return

    watchdog = threading.Timer(timeout, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = [*tail[-19:], line]
            if line.startswith("I: "):
                progress(line[3:])
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # interrupted while reading: take the whole group down
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if expired.is_set():
        raise ImageBuildError(f"{what} failed: not done within {timeout:.0f}s")
    if code != 0:
        errors = [line for line in tail if line.startswith("E: ")] or tail[-8:]
        raise ImageBuildError(f"{what} failed (exit status {code}): " + "\n".join(errors))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- cache


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder at a time per cache; the others wait, then find the image built."""
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(image_dir: Path, recipe_id: str) -> DiskImage | None:
    """The image in ``image_dir`` if its stamp matches the recipe and its file is whole."""
    try:
        stamp = json.loads((image_dir / _STAMP).read_text())
        path = image_dir / _QCOW2
        if stamp["recipe"] != recipe_id or path.stat().st_size != stamp["file_size"]:
            return None
        return DiskImage(
            path=path,
            virtual_size=int(stamp["virtual_size"]),
            file_size=int(stamp["file_size"]),
            allocated=int(stamp["allocated"]),
            recipe=recipe_id,
            kernel_version=str(stamp["kernel_version"]),
            kernel_cmdline=str(stamp["kernel_cmdline"]),
            default_user=str(stamp["default_user"]),
            build_seconds=float(stamp["build_seconds"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recipe_id(tools: dict[str, Path]) -> str:
    """The recipe hash, including the loader binaries copied from this machine."""
    loaders = ("gptmbr.bin", "ldlinux.c32", "systemd-bootx64.efi")
    return recipe.recipe_hash({name: _sha256_file(tools[name]) for name in loaders})


# --------------------------------------------------------------------------- build steps


def _overlay_tar(path: Path) -> None:
    """The recipe's config files as a tarball owned by root (mmdebstrap's ``tar-in`` unpacks it)."""
    with tarfile.open(path, "w") as tar:
        made: set[str] = set()
        for config in recipe.CONFIG_FILES:
            parts = config.path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            data = config.content.encode()
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(data), config.mode, 0
            tar.addfile(info, io.BytesIO(data))


def _mmdebstrap(root: Path, boot_out: Path, debs: Path, overlay: Path, progress: Progress) -> str:
    """Install the system into ``root``; return the kernel version. Kernel + initrd land in ``boot_out``."""
    mode = "root" if os.geteuid() == 0 else "unshare"
    q = shlex.quote
    hooks = [
        f'--setup-hook=mkdir -p {q(str(debs))} "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=tar-in {overlay} /",
        *(f'--customize-hook=chroot "$1" systemctl enable {q(unit)}' for unit in recipe.ENABLE_UNITS),
        *(f'--customize-hook=chroot "$1" systemctl mask {q(unit)}' for unit in recipe.MASK_UNITS),
        '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
        f'--customize-hook=readlink "$1"/vmlinuz > {q(str(boot_out / "kernel-file"))}',
        f"--customize-hook=download /vmlinuz {boot_out / 'vmlinuz'}",
        f"--customize-hook=download /initrd.img {boot_out / 'initrd.img'}",
        # keep the package cache for the next build, minus packages the archive no longer has
        '--customize-hook=chroot "$1" apt-get -qq autoclean',
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
    ]
    argv = [
        "mmdebstrap",
        f"--mode={mode}",
        f"--variant={recipe.VARIANT}",
        "--include=" + ",".join(recipe.PACKAGES),
        *(f"--dpkgopt={opt}" for opt in recipe.DPKG_OPTIONS),
        "--skip=essential/unlink",
        *hooks,
        recipe.SUITE,
        str(root),
    ]
    progress(f"installing Debian {recipe.SUITE} with mmdebstrap ({mode} mode; takes minutes)")
    _run_streaming(argv, "mmdebstrap", progress, timeout=_MMDEBSTRAP_TIMEOUT)
    kernel_file = (boot_out / "kernel-file").read_text().strip()  # boot/vmlinuz-<version>
    prefix = "boot/vmlinuz-"
    if not kernel_file.startswith(prefix):
        raise ImageBuildError(f"mmdebstrap left /vmlinuz pointing at {kernel_file!r}, not {prefix}<version>")
    return kernel_file[len(prefix) :]


def _as_chroot_owner(argv: list[str]) -> list[str]:
    """Run in mmdebstrap's user namespace when not root, so files owned by root look like it."""
    return argv if os.geteuid() == 0 else ["mmdebstrap", "--unshare-helper", *argv]


def _make_root_fs(root: Path, image: Path) -> None:
    layout = recipe.DISK
    argv = [
        "mkfs.ext4", "-q", "-F", "-d", str(root), "-L", layout.root_label, "-U", layout.root_fs_uuid,
        str(image), f"{layout.root_mib}M",
    ]  # fmt: skip
    _run(_as_chroot_owner(argv), "making the root file system (mkfs.ext4 -d)")


def _make_esp(esp: Path, boot: Path, tools: dict[str, Path], work: Path) -> None:
    layout = recipe.DISK
    _run(
        ["mkfs.vfat", "-F", "32", "-n", layout.esp_label, "-i", layout.esp_volume_id, "-C", esp,
         str(layout.esp_mib * 1024)],
        "making the ESP (mkfs.vfat)",
    )  # fmt: skip
    image = f"{esp}"
    for directory in ("EFI", "EFI/BOOT", "loader", "loader/entries", "syslinux"):
        _run(["mmd", "-i", image, f"::/{directory}"], f"making {directory} on the ESP (mmd)")
    copies: list[tuple[Path, str]] = [
        (tools["systemd-bootx64.efi"], "EFI/BOOT/BOOTX64.EFI"),
        (tools["ldlinux.c32"], "syslinux/ldlinux.c32"),
        (boot / "vmlinuz", "vmlinuz"),
        (boot / "initrd.img", "initrd.img"),
    ]
    for name, content in recipe.BOOT_LOADER_FILES.items():
        local = work / name.replace("/", "_")
        local.write_text(content)
        copies.append((local, name))
    for source, target in copies:
        _run(["mcopy", "-o", "-i", image, source, f"::/{target}"], f"copying {target} to the ESP (mcopy)")
    _run(["syslinux", "--install", "--directory", "/syslinux", image], "installing syslinux on the ESP")


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent of a sparse file (SEEK_DATA/SEEK_HOLE; all of it if unsupported)."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        position = end


def _copy_sparse(source: Path, target: Path, offset: int) -> int:
    """Copy ``source`` into ``target`` at ``offset``, keeping holes and all-zero blocks out; bytes written."""
    block = 1 << 20
    written = 0
    with source.open("rb") as src, target.open("r+b") as dst:
        fd = src.fileno()
        for start, end in _data_extents(fd, os.fstat(fd).st_size):
            position = start
            while position < end:
                chunk = os.pread(fd, min(block, end - position), position)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    os.pwrite(dst.fileno(), chunk, offset + position)
                    written += len(chunk)
                position += len(chunk)
    return written


def _assemble_disk(disk: Path, esp: Path, rootfs: Path, tools: dict[str, Path]) -> int:
    """A sparse raw GPT disk with both file systems in place and gptmbr in the MBR; bytes of data."""
    layout = recipe.DISK
    with disk.open("wb") as f:
        f.truncate(layout.disk_bytes)
    per_mib = (1 << 20) // layout.sector
    esp_first = layout.esp_start_mib * per_mib
    root_first = layout.root_start_mib * per_mib
    _run(
        ["sgdisk", "--clear", f"--disk-guid={layout.disk_guid}",
         f"--new=1:{esp_first}:{esp_first + layout.esp_mib * per_mib - 1}", "--typecode=1:ef00",
         "--change-name=1:EFI system partition", f"--partition-guid=1:{layout.esp_partuuid}",
         "--attributes=1:set:2",  # legacy BIOS bootable: gptmbr.bin boots this partition
         f"--new=2:{root_first}:{root_first + layout.root_mib * per_mib - 1}", "--typecode=2:8304",
         "--change-name=2:root", f"--partition-guid=2:{layout.root_partuuid}",
         str(disk)],
        "partitioning the disk (sgdisk)",
    )  # fmt: skip
    mbr = tools["gptmbr.bin"].read_bytes()
    if len(mbr) != 440:
        raise ImageBuildError(f"{tools['gptmbr.bin']} is {len(mbr)} bytes, not the 440 of MBR boot code")
    with disk.open("r+b") as f:
        os.pwrite(f.fileno(), mbr, 0)
    _run(["sgdisk", "--verify", str(disk)], "checking the partition table (sgdisk --verify)")
    data = _copy_sparse(esp, disk, layout.esp_start_mib << 20)
    data += _copy_sparse(rootfs, disk, layout.root_start_mib << 20)
    return data


def _to_qcow2(disk: Path, qcow2: Path) -> None:
    _run(
        [
            "qemu-img",
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "-o",
            recipe.QCOW2_OPTIONS,
            str(disk),
            str(qcow2),
        ],
        "compressing the disk into qcow2 (qemu-img convert)",
        timeout=1800.0,
    )
    _run(["qemu-img", "check", "-q", "-f", "qcow2", str(qcow2)], "checking the qcow2 (qemu-img check)")


def _mount_points_below(path: Path) -> list[str]:
    """Mount points inside ``path`` (from /proc/self/mountinfo, whose paths escape blanks as octal)."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point.startswith(prefix):
                    found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    """Remove a chroot directory; as non-root its files belong to the namespace's users.

    A chroot that still has something mounted in it (an mmdebstrap killed in the middle) is left
    alone: deleting through a bind mount would delete the host's files.
    """
    if not path.exists():
        return
    if os.geteuid() == 0:
        if not _mount_points_below(path):
            shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(ImageBuildError):
            _run(["mmdebstrap", "--unshare-helper", "rm", "-rf", str(path)], "removing the build chroot")


def _build(distro_dir: Path, recipe_id: str, tools: dict[str, Path], progress: Progress) -> DiskImage:
    started = time.monotonic()
    debs = distro_dir / "debs"
    debs.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=distro_dir))
    root = tmp / "root"
    try:
        boot = tmp / "boot"
        boot.mkdir()
        overlay = tmp / "overlay.tar"
        _overlay_tar(overlay)
        kernel_version = _mmdebstrap(root, boot, debs, overlay, progress)
        progress("making the root file system (mkfs.ext4 -d)")
        rootfs = tmp / "root.img"
        _make_root_fs(root, rootfs)
        _remove_tree(root)
        progress("making the ESP: systemd-boot, syslinux, kernel, initrd")
        esp = tmp / "esp.img"
        _make_esp(esp, boot, tools, tmp)
        progress("assembling the GPT disk")
        disk = tmp / "disk.raw"
        allocated = _assemble_disk(disk, esp, rootfs, tools)
        rootfs.unlink()
        esp.unlink()
        progress("compressing the disk into qcow2")
        qcow2_tmp = tmp / _QCOW2
        _to_qcow2(disk, qcow2_tmp)
        disk.unlink()
        os.chmod(qcow2_tmp, 0o644)

        # Publish: stamp removed first and written last, so a crash never pairs a stamp with
        # another build's file.
        image_dir = distro_dir / recipe_id
        image_dir.mkdir(exist_ok=True)
        (image_dir / _STAMP).unlink(missing_ok=True)
        path = image_dir / _QCOW2
        os.replace(qcow2_tmp, path)
        image = DiskImage(
            path=path,
            virtual_size=recipe.DISK.disk_bytes,
            file_size=path.stat().st_size,
            allocated=allocated,
            recipe=recipe_id,
            kernel_version=kernel_version,
            kernel_cmdline=recipe.KERNEL_COMMAND_LINE,
            default_user=recipe.DEFAULT_USER,
            build_seconds=round(time.monotonic() - started, 1),
        )
        stamp = {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in image.__dict__.items()},
            "suite": recipe.SUITE,
            "packages": list(recipe.PACKAGES),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        stamp_tmp = image_dir / f".{_STAMP}.tmp"
        stamp_tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(stamp_tmp, image_dir / _STAMP)
        return image
    finally:
        _remove_tree(root)
        if not _mount_points_below(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(distro_dir: Path, keep: str) -> None:
    """Drop images of older recipes (hundreds of MB each); open files stay readable until closed."""
    for entry in distro_dir.iterdir():
        if entry.is_dir() and entry.name not in (keep, "debs") and not entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)


def build_disk_image(cache_dir: Path, progress: Progress | None = None) -> DiskImage:
    """Build the Debian 12 disk image under ``cache_dir/distro/`` (or return the cached one).

    A second call with the same recipe returns at once without touching the file. Safe to call
    concurrently (one builds, the others wait and get its image). Raises :class:`ImageBuildError`
    (a :class:`livemig.errors.BootstrapError`) when a tool is missing or a step fails; a failed
    build leaves the cache as it was.
    """
    report: Progress = progress if progress is not None else (lambda _msg: None)
    distro_dir = Path(cache_dir).expanduser().absolute() / "distro"
    if any(c.isspace() for c in str(distro_dir)):  # mmdebstrap's copy hooks split on white space
        raise ImageBuildError(f"the image cache path must not contain white space: {distro_dir}")
    tools = find_tools()
    recipe_id = _recipe_id(tools)
    cached = _cached(distro_dir / recipe_id, recipe_id)
    if cached is not None:
        return cached
    try:
        distro_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create the image cache {distro_dir}: {exc}") from None
    with _locked(distro_dir):
        cached = _cached(distro_dir / recipe_id, recipe_id)
        if cached is not None:
            return cached
        try:
            image = _build(distro_dir, recipe_id, tools, report)
        except OSError as exc:
            raise ImageBuildError(f"building the Debian disk image failed: {exc}") from exc
        _prune(distro_dir, recipe_id)
    report(f"Debian disk image ready: {image.path}")
    return image
