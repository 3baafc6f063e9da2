"""Build (and cache) the livemig guest image: a Debian cloud kernel plus a tiny initramfs.

Why this design:

* The guest exists only to run the workload (``workload.c``: memory, plus optional disk and
  network witnesses) on its serial console, so the image is a kernel and an initramfs for QEMU's
  direct kernel boot: no disk image, no bootloader, boots in seconds even under TCG. A disk, if
  any, is a raw volume the workload writes its log to, never a root filesystem.
* The kernel is Debian's own ``linux-image-*-cloud-amd64`` (small, virtio drivers as modules),
  fetched with ``apt-get download`` so no network source beyond the Debian mirror is needed.
  Modules are ordered from their ``.modinfo`` sections (see :mod:`livemig.guest.modules`)
  because the build machine has no ``kmod``.
* Everything lands in ``<cache_dir>/guest/<kernel_version>/`` with a stamp holding a hash of all
  inputs; a rebuild happens only when an input changes. Builds happen in a temporary directory
  inside the cache and are moved into place with ``os.replace`` under a lock, so a crash or a
  concurrent builder never leaves a half-written image that looks valid.

``livemig image build [--cache DIR] [--force]`` builds it by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from livemig.guest.errors import ImageBuildError, ModuleDependencyError, ModuleInfoError
from livemig.guest.modules import module_load_order

__all__ = [
    "GUEST_MODULES",
    "KERNEL_META_PACKAGE",
    "MAX_DISK_RATE",
    "GuestImage",
    "ImageBuildError",
    "ModuleDependencyError",
    "ModuleInfoError",
    "build_image",
    "default_cache_dir",
    "kernel_cmdline",
]

#: Debian metapackage whose ``Depends:`` names the current versioned cloud kernel.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

#: Drivers the guest loads at boot (their dependencies are added automatically). Devices that are
#: absent are harmless: the driver just binds to nothing.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "virtio_balloon",
    "virtio_console",
)

#: Bump when the image layout changes in a way the other inputs do not capture.
BUILDER_VERSION = 1

#: How the workload is compiled: static (the initramfs has no C library), stripped, and warning
#: clean under these warnings (a unit test compiles it with ``-Werror``). Part of the inputs hash.
WORKLOAD_CFLAGS: tuple[str, ...] = ("-static", "-O2", "-s", "-Wall", "-Wextra")

_SOURCE_DIR = Path(__file__).resolve().parent
_WORKLOAD_SOURCE = _SOURCE_DIR / "workload.c"
_INIT_SCRIPT = _SOURCE_DIR / "init.sh"
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_APT_LISTS = Path("/var/lib/apt/lists")
_FIXED_MTIME = 1_700_000_000  # every file in the initramfs gets this mtime: reproducible archives
_STAMP = "stamp.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what QEMU's ``-kernel``/``-initrd`` need, plus the kernel release."""

    kernel: Path
    initrd: Path
    kernel_version: str


#: Highest ``disk_rate`` (records per second) the workload accepts; TCG reaches far less.
MAX_DISK_RATE = 100_000

_DEVICE_PATH = re.compile(r"/[A-Za-z0-9_./+-]+")


def kernel_cmdline(
    wss_mib: int = 64,
    rate_mib_s: int = 20,
    *,
    workload: bool = True,
    disk: str | None = None,
    disk_rate: int | None = None,
    ip: str | None = None,
    gateway: str | None = None,
) -> str:
    """Kernel command line for the guest image.

    ``console=ttyS0`` puts kernel messages and the workload on the first serial port (the only
    channel to the guest); ``quiet`` keeps the boot fast under TCG (a serial byte is expensive);
    ``panic=-1`` reboots at once on a panic instead of hanging a test.

    ``disk`` (e.g. ``/dev/vda``) turns on disk mode: the workload appends checksummed records to
    that raw device at ``disk_rate`` records per second (the guest's default is 40). ``ip``
    (``a.b.c.d/prefix``) turns on network mode: init addresses ``eth0`` and the workload serves
    TCP echo on port 7 and a UDP sequence sink on port 9; ``gateway`` adds a default route.
    Values are checked here because a bad one would only show up as a guest that misbehaves.
    """
    if wss_mib < 1:
        raise ValueError(f"wss_mib must be at least 1, got {wss_mib}")
    if rate_mib_s < 0:
        raise ValueError(f"rate_mib_s must not be negative, got {rate_mib_s}")
    parts = ["console=ttyS0", "panic=-1", "quiet", f"livemig.wss={wss_mib}", f"livemig.rate={rate_mib_s}"]
    if not workload:
        parts.append("livemig.workload=off")
    if disk is not None:
        if not _DEVICE_PATH.fullmatch(disk):
            raise ValueError(f"disk must be an absolute device path such as /dev/vda, got {disk!r}")
        parts.append(f"livemig.disk={disk}")
    if disk_rate is not None:
        if disk is None:
            raise ValueError("disk_rate needs disk")
        if isinstance(disk_rate, bool) or not 0 <= disk_rate <= MAX_DISK_RATE:
            raise ValueError(f"disk_rate must be 0..{MAX_DISK_RATE} records/s, got {disk_rate!r}")
        parts.append(f"livemig.diskrate={disk_rate}")
    if ip is not None:
        if "/" not in ip:
            raise ValueError(f"ip needs a prefix length (a.b.c.d/prefix), got {ip!r}")
        try:
            interface = ipaddress.IPv4Interface(ip)
        except ValueError as exc:
            raise ValueError(f"ip must be an IPv4 address with prefix, got {ip!r}: {exc}") from None
        parts.append(f"livemig.ip={interface.with_prefixlen}")
    if gateway is not None:
        if ip is None:
            raise ValueError("gateway needs ip")
        try:
            gw = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise ValueError(f"gateway must be an IPv4 address, got {gateway!r}: {exc}") from None
        # busybox `ip route add default via` needs the gateway on the connected subnet
        if gw not in interface.network or gw == interface.ip:
            raise ValueError(f"gateway {gw} is not another address in {interface.network}")
        parts.append(f"livemig.gw={gw}")
    return " ".join(parts)


def default_cache_dir() -> Path:
    """``$LIVEMIG_CACHE`` or ``~/.cache/livemig``: the same default the CLI and tests use."""
    env = os.environ.get("LIVEMIG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "livemig"


# --------------------------------------------------------------------------- subprocess helpers


def _run(
    argv: Sequence[str | os.PathLike[str]],
    what: str,
    *,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    stdout_file: Path | None = None,
    timeout: float = 600.0,
) -> str:
    """Run a tool; any failure becomes an :class:`ImageBuildError` naming the step and the tool's words.

    The timeout keeps a stalled mirror from hanging a test session or a hostd forever.
    """
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(stdout_file.open("wb")) if stdout_file is not None else subprocess.PIPE
            proc = subprocess.run(
                [os.fspath(a) for a in argv],
                cwd=cwd,
                input=stdin,
                stdout=out,
                stderr=subprocess.PIPE,
                env=env,
                check=False,
                timeout=timeout,
            )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what} failed: no answer within {timeout:.0f}s") from None
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what} failed: {argv[0]} is not installed ({exc.strerror})") from None
    except OSError as exc:
        raise ImageBuildError(f"{what} failed: cannot run {argv[0]}: {exc}") from None
    stderr = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-8:]) or f"exit status {proc.returncode}"
        raise ImageBuildError(f"{what} failed: {tail}")
    return proc.stdout.decode(errors="replace") if stdout_file is None else ""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- kernel package


def _apt_lists_fingerprint() -> str:
    """Changes whenever ``apt-get update`` changes the package lists (name, size, mtime of each)."""
    digest = hashlib.sha256()
    try:
        entries = sorted(p for p in _APT_LISTS.iterdir() if p.is_file() and p.name != "lock")
    except OSError:
        return "no-lists"
    for entry in entries:
        st = entry.stat()
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _parse_kernel_depends(output: str) -> str | None:
    """The versioned kernel package from ``apt-cache depends linux-image-cloud-amd64`` output."""
    for line in output.splitlines():
        match = re.match(r"\s*\|?Depends:\s*(linux-image-\d\S*)\s*$", line)
        if match:
            return match.group(1)
    return None


def _apt_cache_kernel_package() -> tuple[str | None, str]:
    """(package or None, why not) from ``apt-cache depends``; apt-cache is local and fast to fail."""
    try:
        output = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "apt-cache depends")
    except ImageBuildError as exc:
        return None, exc.message
    package = _parse_kernel_depends(output)
    return package, "" if package else f"apt-cache depends {KERNEL_META_PACKAGE} names no linux-image-<version>"


def _resolve_kernel_package(guest_dir: Path, progress: Progress) -> str:
    """``linux-image-<ver>-cloud-amd64``; remembered per state of the apt lists (apt-cache is slow)."""
    memo = guest_dir / "kernel-package.json"
    fingerprint = _apt_lists_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["lists"] == fingerprint and isinstance(saved["package"], str):
            return str(saved["package"])
    progress(f"resolving the kernel package ({KERNEL_META_PACKAGE})")
    package, why = _apt_cache_kernel_package()
    if package is None:
        progress("package lists missing or stale: apt-get update")
        try:
            _run(["apt-get", "update"], "apt-get update")
        except ImageBuildError as exc:
            raise ImageBuildError(f"cannot resolve the kernel package ({why}), and {exc.message}") from None
        fingerprint = _apt_lists_fingerprint()
        package, why = _apt_cache_kernel_package()
    if package is None:
        raise ImageBuildError(
            f"cannot resolve the kernel package: {why} even after apt-get update "
            "(is this a Debian machine with the main archive configured?)"
        )
    _atomic_write(memo, json.dumps({"lists": fingerprint, "package": package}).encode())
    return package


def _kernel_version_of(package: str) -> str:
    match = re.fullmatch(r"linux-image-(\d[\w.+~-]*)", package)
    if not match:
        raise ImageBuildError(f"unexpected kernel package name {package!r}")
    return match.group(1)


def _download_kernel(package: str, debs_dir: Path, progress: Progress, *, force: bool) -> Path:
    """The kernel ``.deb`` in ``debs_dir``, downloaded unless a valid copy is already there."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs_dir.glob(f"{package}_*.deb"))
    if cached and not force:
        return cached[-1]
    progress(f"downloading {package}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs_dir) as tmp:
        os.chmod(tmp, 0o755)
        argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package]
        try:
            _run(argv, "apt-get download", cwd=Path(tmp))
        except ImageBuildError:
            progress("apt-get download failed; refreshing the package lists (apt-get update) and retrying")
            _run(["apt-get", "update"], "apt-get update")
            _run(argv, "apt-get download", cwd=Path(tmp))
        downloaded = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not downloaded:
            raise ImageBuildError(f"apt-get download failed: no {package}_*.deb appeared")
        final = debs_dir / downloaded[-1].name
        os.replace(downloaded[-1], final)
    for old in debs_dir.glob("linux-image-*.deb"):  # keep only the current kernel's package
        if old != final:
            old.unlink(missing_ok=True)
    return final


# --------------------------------------------------------------------------- tools and inputs


def _elf_is_static(data: bytes) -> bool:
    """True when an ELF64 executable has no PT_INTERP (needs no dynamic loader in the initramfs)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    order = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(order + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    for index in range(phnum):
        start = phoff + index * phentsize
        if start + 4 > len(data):
            return False
        (p_type,) = struct.unpack_from(order + "I", data, start)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _find_busybox() -> Path:
    """A statically linked busybox: the initramfs has no C library for a dynamic one."""
    candidates = [Path(p) for p in _BUSYBOX_CANDIDATES]
    found = shutil.which("busybox")
    if found:
        candidates.insert(0, Path(found))
    for candidate in candidates:
        with contextlib.suppress(OSError):
            with candidate.open("rb") as f:
                head = f.read(1 << 16)
            if _elf_is_static(head):
                return candidate.resolve()
    raise ImageBuildError("no statically linked busybox found: apt-get install busybox-static")


def _inputs_hash(package: str, busybox: Path) -> str:
    """Hash of everything that determines the image; the stamp stores it."""
    digest = hashlib.sha256()
    try:
        parts = [
            f"builder={BUILDER_VERSION}",
            f"package={package}",
            f"modules={','.join(GUEST_MODULES)}",
            f"workload={_sha256_file(_WORKLOAD_SOURCE)}",
            f"cflags={' '.join(WORKLOAD_CFLAGS)}",
            f"init={_sha256_file(_INIT_SCRIPT)}",
            f"busybox={_sha256_file(busybox)}",
        ]
    except OSError as exc:
        raise ImageBuildError(f"cannot read a guest image input: {exc}") from None
    digest.update("\n".join(parts).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- cache


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(guest_dir: Path) -> Iterator[None]:
    """One builder per cache at a time (concurrent test sessions, hostd processes)."""
    guest_dir.mkdir(parents=True, exist_ok=True)
    with (guest_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_image(image_dir: Path, inputs_hash: str) -> GuestImage | None:
    """The image in ``image_dir`` if its stamp says it was built from exactly these inputs."""
    try:
        stamp = json.loads((image_dir / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("inputs") != inputs_hash:
        return None
    kernel, initrd = image_dir / "vmlinuz", image_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    if stamp.get("kernel_size") != kernel.stat().st_size or stamp.get("initrd_size") != initrd.stat().st_size:
        return None
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=str(stamp.get("kernel_version", image_dir.name)))


def _newest_cached_image(guest_dir: Path, busybox: Path) -> GuestImage | None:
    """Any valid cached image, newest kernel first: lets a machine without apt lists still boot guests."""
    try:
        stamps = list(guest_dir.glob(f"*/{_STAMP}"))
    except OSError:
        return None

    def version_key(path: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path.parent.name)]

    for stamp_path in sorted(stamps, key=version_key, reverse=True):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, ImageBuildError):
            package = str(json.loads(stamp_path.read_text())["package"])
            image = _cached_image(stamp_path.parent, _inputs_hash(package, busybox))
            if image is not None:
                return image
    return None


# --------------------------------------------------------------------------- build steps


def _compile_workload(output: Path) -> None:
    if shutil.which("gcc") is None:
        raise ImageBuildError("compiling the guest workload failed: gcc is not installed (apt-get install gcc)")
    _run(
        ["gcc", *WORKLOAD_CFLAGS, "-o", output, _WORKLOAD_SOURCE],
        "compiling the guest workload (gcc -static; needs libc6-dev)",
    )


def _write_initramfs(root: Path, output: Path) -> None:
    """A gzip'ed newc cpio of ``root``, owned by root, with fixed mtimes (same inputs, same bytes)."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        entries.append(rel)
        for name in sorted(filenames):
            entries.append(os.path.join(rel, name) if rel != "." else name)
        for name in dirnames:  # symlinks to directories are listed here but not walked
            full = Path(dirpath) / name
            if full.is_symlink():
                entries.append(os.path.join(rel, name) if rel != "." else name)
    for entry in entries:
        os.utime(root / entry, (_FIXED_MTIME, _FIXED_MTIME), follow_symlinks=False)
    cpio_file = output.with_suffix(".cpio")
    _run(
        ["cpio", "--quiet", "--null", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        "packing the initramfs (cpio)",
        cwd=root,
        stdin=b"\0".join(e.encode() for e in entries) + b"\0",
        stdout_file=cpio_file,
    )
    with (
        cpio_file.open("rb") as src,
        output.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)
    cpio_file.unlink()


def _extract_kernel(deb: Path, into: Path, kernel_version: str) -> tuple[Path, Path]:
    """(vmlinuz, lib/modules/<version>) from the kernel package."""
    _run(["dpkg-deb", "-x", deb, into], f"extracting {deb.name} (dpkg-deb -x)")
    vmlinuz = into / "boot" / f"vmlinuz-{kernel_version}"
    if not vmlinuz.is_file():
        found = sorted((into / "boot").glob("vmlinuz-*"))
        if not found:
            raise ImageBuildError(f"{deb.name} contains no boot/vmlinuz-*")
        vmlinuz = found[-1]
    for base in ("lib/modules", "usr/lib/modules"):
        modules = into / base / kernel_version
        if modules.is_dir():
            return vmlinuz, modules
    raise ImageBuildError(f"{deb.name} contains no lib/modules/{kernel_version}")


def _build(
    package: str, kernel_version: str, inputs_hash: str, guest_dir: Path, progress: Progress, *, force: bool
) -> GuestImage:
    image_dir = guest_dir / kernel_version
    deb = _download_kernel(package, guest_dir / "debs", progress, force=force)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=guest_dir) as tmp_name:
        tmp = Path(tmp_name)
        progress(f"extracting {deb.name}")
        try:
            vmlinuz, modules_dir = _extract_kernel(deb, tmp / "pkg", kernel_version)
        except ImageBuildError:
            if force:
                raise
            progress(f"{deb.name} looks damaged; downloading it again")
            shutil.rmtree(tmp / "pkg", ignore_errors=True)
            deb = _download_kernel(package, guest_dir / "debs", progress, force=True)
            vmlinuz, modules_dir = _extract_kernel(deb, tmp / "pkg", kernel_version)

        root = tmp / "root"
        for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "lib/modules"):
            (root / sub).mkdir(parents=True, exist_ok=True)

        progress("ordering kernel modules")
        order = module_load_order(modules_dir, GUEST_MODULES, kernel_version=kernel_version)
        load_lines = []
        for ko in order:
            rel = ko.relative_to(modules_dir)
            target = root / "lib" / "modules" / kernel_version / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ko, target)
            load_lines.append(f"/lib/modules/{kernel_version}/{rel.as_posix()}")
        (root / "lib" / "modules" / "load-order").write_text("\n".join(load_lines) + "\n")

        progress("compiling the guest workload")
        _compile_workload(root / "bin" / "livemig-workload")
        shutil.copyfile(_find_busybox(), root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        shutil.copyfile(_INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        info = {"kernel_version": kernel_version, "package": package, "inputs": inputs_hash}
        (root / "etc" / "livemig-image.json").write_text(json.dumps(info, indent=1) + "\n")

        progress("packing the initramfs")
        initrd_tmp = tmp / "initrd.img"
        _write_initramfs(root, initrd_tmp)
        kernel_tmp = tmp / "vmlinuz"
        shutil.copyfile(vmlinuz, kernel_tmp)
        for path in (initrd_tmp, kernel_tmp):
            os.chmod(path, 0o644)

        # Publish: drop the old stamp first, so a crash between the renames never pairs a stamp
        # with files of another build; the stamp is written last.
        image_dir.mkdir(parents=True, exist_ok=True)
        (image_dir / _STAMP).unlink(missing_ok=True)
        kernel, initrd = image_dir / "vmlinuz", image_dir / "initrd.img"
        os.replace(kernel_tmp, kernel)
        os.replace(initrd_tmp, initrd)
        stamp = {
            **info,
            "modules": load_lines,
            "kernel_size": kernel.stat().st_size,
            "initrd_size": initrd.stat().st_size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _atomic_write(image_dir / _STAMP, (json.dumps(stamp, indent=1) + "\n").encode())
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=kernel_version)


def build_image(cache_dir: Path, *, force: bool = False, progress: Progress | None = None) -> GuestImage:
    """Build the guest image under ``cache_dir`` (or return the cached one) and describe it.

    Idempotent and safe to run concurrently: with unchanged inputs (workload, init script, module
    list, kernel package, busybox) it returns the cached files without touching them. ``force``
    rebuilds everything, including a fresh download of the kernel package. ``progress`` receives
    one short human-readable message per step. Raises :class:`ImageBuildError`.
    """
    report: Progress = progress if progress is not None else (lambda _msg: None)
    guest_dir = Path(cache_dir).expanduser() / "guest"
    try:
        guest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create the image cache {guest_dir}: {exc}") from None
    busybox = _find_busybox()
    try:
        package = _resolve_kernel_package(guest_dir, report)
    except ImageBuildError as exc:
        fallback = None if force else _newest_cached_image(guest_dir, busybox)
        if fallback is None:
            raise
        report(f"{exc.message}; using the cached image for kernel {fallback.kernel_version}")
        return fallback
    kernel_version = _kernel_version_of(package)
    inputs_hash = _inputs_hash(package, busybox)
    image_dir = guest_dir / kernel_version
    if not force:
        cached = _cached_image(image_dir, inputs_hash)
        if cached is not None:
            return cached
    with _locked(guest_dir):
        if not force:  # another process may have built it while we waited for the lock
            cached = _cached_image(image_dir, inputs_hash)
            if cached is not None:
                return cached
        try:
            image = _build(package, kernel_version, inputs_hash, guest_dir, report, force=force)
        except OSError as exc:
            raise ImageBuildError(f"building the guest image failed: {exc}") from exc
    report(f"guest image ready: kernel {kernel_version}")
    return image
