"""The guest image's plumbing, without QEMU or the Debian kernel package.

Why: the initramfs loads drivers with busybox ``insmod`` in the order computed here; a wrong
order or a silently dropped dependency only shows up as a guest without network or disk, far
from the cause. Synthetic ELF files stand in for real ``.ko`` files. The disk log's format is
checked the same way: Python builds and damages records, and the workload itself runs on the
host against a plain file (its disk mode accepts one), so the C writer, the C checker and the
Python reader must agree without booting anything.
"""

from __future__ import annotations

import queue
import re
import shutil
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.errors import LivemigError
from livemig.guest import disklog
from livemig.guest.errors import ImageBuildError, ModuleDependencyError, ModuleInfoError
from livemig.guest.image import (
    _WORKLOAD_SOURCE,
    WORKLOAD_CFLAGS,
    _elf_is_static,
    _kernel_version_of,
    _parse_kernel_depends,
    kernel_cmdline,
)
from livemig.guest.modules import (
    load_order,
    module_load_order,
    normalize_module_name,
    parse_modinfo,
    read_elf_section,
    read_modinfo,
)

KVER = "6.1.0-99-cloud-amd64"


def make_elf(sections: dict[str, bytes], *, big_endian: bool = False) -> bytes:
    """A minimal ELF64 relocatable object: a null section, ``sections``, then ``.shstrtab``."""
    order = ">" if big_endian else "<"
    names = [*sections, ".shstrtab"]
    shstrtab = b"\0"
    name_offsets = []
    for name in names:
        name_offsets.append(len(shstrtab))
        shstrtab += name.encode() + b"\0"
    bodies = [*sections.values(), shstrtab]
    data = bytearray(64)
    offsets = []
    for body in bodies:
        offsets.append(len(data))
        data += body
        data += b"\0" * (-len(data) % 8)
    shoff = len(data)
    data += b"\0" * 64  # section 0: SHT_NULL
    for name_off, offset, body in zip(name_offsets, offsets, bodies, strict=True):
        data += struct.pack(order + "IIQQQQIIQQ", name_off, 1, 0, 0, offset, len(body), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 2 if big_endian else 1, 1]) + b"\0" * 9
    header = ident + struct.pack(
        order + "HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(names) + 1, len(names)
    )
    data[:64] = header
    return bytes(data)


def modinfo(name: str, depends: str = "", vermagic: str = f"{KVER} SMP mod_unload modversions ") -> bytes:
    entries = ["license=GPL", f"depends={depends}", f"name={name}", f"vermagic={vermagic}"]
    return b"\0".join(e.encode() for e in entries) + b"\0\0\0"


# --------------------------------------------------------------------------- ELF and .modinfo


def test_reads_a_section_from_little_and_big_endian_elf() -> None:
    for big in (False, True):
        elf = make_elf({".text": b"\x90" * 5, ".modinfo": b"name=x\0"}, big_endian=big)
        assert read_elf_section(elf, ".modinfo") == b"name=x\0"
        assert read_elf_section(elf, ".text") == b"\x90" * 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF file"),
        (b"MZ" + b"\0" * 100, "not an ELF file"),
        (b"\x7fELF\x01\x01\x01" + b"\0" * 100, "not an ELF64 file"),
        (make_elf({".text": b""}), "no .modinfo section"),
        (make_elf({".modinfo": b"name=x\0"})[:-100], "beyond the end of the file"),
    ],
)
def test_bad_elf_files_raise_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ModuleInfoError, match=message):
        read_elf_section(data, ".modinfo")


def test_parse_modinfo_fields_and_depends() -> None:
    info = parse_modinfo(b"alias=a\0alias=b\0depends=virtio_ring,virtio-pci-x,,virtio_ring\0name=virtio-rng\0\0\0")
    assert info.name == "virtio_rng"
    assert info.depends == ("virtio_ring", "virtio_pci_x")
    assert info.fields["alias"] == ("a", "b")
    assert info.vermagic is None


def test_parse_modinfo_empty_depends_and_fallback_name() -> None:
    info = parse_modinfo(b"depends=\0license=GPL\0", fallback_name="failover")
    assert info.name == "failover" and info.depends == ()
    with pytest.raises(ModuleInfoError, match="no name="):
        parse_modinfo(b"depends=\0")


def test_read_modinfo_from_a_file(tmp_path: Path) -> None:
    ko = tmp_path / "virtio-rng.ko"
    ko.write_bytes(make_elf({".modinfo": modinfo("virtio_rng", "virtio,virtio_ring")}))
    info = read_modinfo(ko)
    assert (info.name, info.depends) == ("virtio_rng", ("virtio", "virtio_ring"))
    assert info.vermagic is not None and info.vermagic.startswith(KVER)
    broken = tmp_path / "broken.ko"
    broken.write_bytes(b"garbage")
    with pytest.raises(ModuleInfoError, match=r"broken\.ko: not an ELF file"):
        read_modinfo(broken)


# --------------------------------------------------------------------------- ordering


VIRTIO = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_modern_dev": [],
    "virtio_pci_legacy_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "failover": [],
    "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "virtio_rng": ["virtio", "virtio_ring"],
}


def test_load_order_puts_dependencies_first_each_once() -> None:
    order = load_order(["virtio_pci", "virtio_net", "virtio-rng"], VIRTIO)
    assert order == [
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_rng",
    ]
    for index, name in enumerate(order):
        assert set(VIRTIO[name]) <= set(order[:index])


def test_load_order_is_deterministic_and_handles_duplicates() -> None:
    assert load_order(["virtio_net", "virtio_net"], VIRTIO) == load_order(["virtio_net"], VIRTIO)
    assert load_order([], VIRTIO) == []


def test_missing_dependency_names_the_chain() -> None:
    deps = {"a": ["b"], "b": ["c"]}
    with pytest.raises(ModuleDependencyError, match=r"unknown kernel module 'c' \(needed by a -> b\)"):
        load_order(["a"], deps)
    with pytest.raises(ModuleDependencyError, match=r"unknown kernel module 'zz'$"):
        load_order(["zz"], deps)


def test_cycle_is_an_error_showing_the_cycle() -> None:
    deps = {"top": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}
    with pytest.raises(ModuleDependencyError, match="cycle: a -> b -> c -> a"):
        load_order(["top"], deps)
    with pytest.raises(ModuleDependencyError, match="cycle: self -> self"):
        load_order(["self"], {"self": ["self"]})


def test_errors_belong_to_the_project_tree() -> None:
    assert issubclass(ModuleDependencyError, ImageBuildError)
    assert issubclass(ImageBuildError, LivemigError) and issubclass(ImageBuildError, RuntimeError)
    assert normalize_module_name("virtio-rng") == "virtio_rng"


def write_tree(root: Path, modules: dict[str, tuple[str, str]], vermagic: str = KVER) -> Path:
    """``lib/modules/<KVER>`` with one synthetic .ko per entry: file path -> (name, depends)."""
    base = root / "lib" / "modules" / KVER
    for rel, (name, depends) in modules.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_elf({".modinfo": modinfo(name, depends, f"{vermagic} SMP ")}))
    return base


def test_module_load_order_from_files(tmp_path: Path) -> None:
    base = write_tree(
        tmp_path,
        {
            "kernel/drivers/virtio/virtio_ring.ko": ("virtio_ring", ""),
            "kernel/drivers/virtio/virtio.ko": ("virtio", "virtio_ring"),
            "kernel/drivers/char/hw_random/virtio-rng.ko": ("virtio_rng", "virtio,virtio_ring"),
            "kernel/drivers/unrelated.ko": ("unrelated", "nothing_here"),
        },
    )
    order = module_load_order(base, ["virtio_rng"], kernel_version=KVER)
    assert [p.relative_to(base).as_posix() for p in order] == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/char/hw_random/virtio-rng.ko",
    ]


def test_module_load_order_rejects_missing_and_foreign_modules(tmp_path: Path) -> None:
    base = write_tree(tmp_path / "one", {"kernel/a.ko": ("a", "b")})
    with pytest.raises(ModuleDependencyError, match="kernel module 'b' not found"):
        module_load_order(base, ["a"])
    other = write_tree(tmp_path / "two", {"kernel/a.ko": ("a", "")}, vermagic="5.10.0-1-amd64")
    with pytest.raises(ModuleInfoError, match=r"built for kernel '5\.10\.0-1-amd64'"):
        module_load_order(other, ["a"], kernel_version=KVER)
    assert len(module_load_order(other, ["a"])) == 1  # without a version there is nothing to compare


# --------------------------------------------------------------------------- image helpers


def test_kernel_package_from_apt_cache_output() -> None:
    output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert _parse_kernel_depends(output) == "linux-image-6.1.0-56-cloud-amd64"
    assert _parse_kernel_depends("linux-image-cloud-amd64\n  Depends: <none>\n") is None
    assert _kernel_version_of("linux-image-6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"
    with pytest.raises(ImageBuildError):
        _kernel_version_of("linux-headers-6.1.0-56")


def test_kernel_cmdline() -> None:
    assert kernel_cmdline(64, 20) == "console=ttyS0 panic=-1 quiet livemig.wss=64 livemig.rate=20"
    assert kernel_cmdline(8, 0, workload=False).endswith(" livemig.rate=0 livemig.workload=off")
    with pytest.raises(ValueError):
        kernel_cmdline(0, 1)
    with pytest.raises(ValueError):
        kernel_cmdline(1, -1)


def test_kernel_cmdline_disk_and_network_modes() -> None:
    base = "console=ttyS0 panic=-1 quiet livemig.wss=8 livemig.rate=5"
    assert kernel_cmdline(8, 5, disk="/dev/vda") == base + " livemig.disk=/dev/vda"
    assert kernel_cmdline(8, 5, disk="/dev/vdb", disk_rate=0).endswith(" livemig.disk=/dev/vdb livemig.diskrate=0")
    net = kernel_cmdline(8, 5, ip="10.0.2.15/24", gateway="10.0.2.2")
    assert net == base + " livemig.ip=10.0.2.15/24 livemig.gw=10.0.2.2"
    full = kernel_cmdline(8, 5, workload=False, disk="/dev/vda", disk_rate=7, ip="192.168.7.2/30")
    assert full.split()[5:] == [
        "livemig.workload=off",
        "livemig.disk=/dev/vda",
        "livemig.diskrate=7",
        "livemig.ip=192.168.7.2/30",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"disk": "vda"}, "absolute device path"),
        ({"disk": "/dev/vda quiet"}, "absolute device path"),
        ({"disk_rate": 5}, "disk_rate needs disk"),
        ({"disk": "/dev/vda", "disk_rate": -1}, "disk_rate must be"),
        ({"disk": "/dev/vda", "disk_rate": 100_001}, "disk_rate must be"),
        ({"ip": "10.0.2.15"}, "prefix length"),
        ({"ip": "10.0.2.300/24"}, "IPv4 address with prefix"),
        ({"ip": "10.0.2.15/33"}, "IPv4 address with prefix"),
        ({"gateway": "10.0.2.2"}, "gateway needs ip"),
        ({"ip": "10.0.2.15/24", "gateway": "10.0.3.2"}, "not another address"),
        ({"ip": "10.0.2.15/24", "gateway": "10.0.2.15"}, "not another address"),
        ({"ip": "10.0.2.15/24", "gateway": "gw"}, "gateway must be an IPv4 address"),
    ],
)
def test_kernel_cmdline_rejects_bad_disk_and_network_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kernel_cmdline(8, 5, **kwargs)  # type: ignore[arg-type]


def test_static_elf_detection() -> None:
    def executable(with_interp: bool) -> bytes:
        phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0)
        if with_interp:
            phdrs += struct.pack("<IIQQQQQQ", 3, 4, 0, 0, 0, 0, 0, 0)
        ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
        count = 2 if with_interp else 1
        header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, count, 64, 0, 0)
        return header + phdrs

    assert _elf_is_static(executable(False))
    assert not _elf_is_static(executable(True))
    assert not _elf_is_static(b"#!/bin/sh\n")


# --------------------------------------------------------------------------- disk log format

LOG_ID = 0x0123456789ABCDEF


def make_log(records: int, blocks: int = 32, log_id: int = LOG_ID) -> bytearray:
    data = bytearray(blocks * disklog.BLOCK)
    data[: disklog.BLOCK] = disklog.build_header(log_id)
    for seq in range(1, records + 1):
        data[seq * disklog.BLOCK : (seq + 1) * disklog.BLOCK] = disklog.build_record(log_id, seq)
    return data


def block(data: bytearray, seq: int) -> bytes:
    return bytes(data[seq * disklog.BLOCK : (seq + 1) * disklog.BLOCK])


def test_disk_log_round_trip_and_clean_ends(tmp_path: Path) -> None:
    data = make_log(10)
    assert disklog.header_log_id(bytes(data[: disklog.BLOCK])) == LOG_ID
    assert disklog.parse_disk_log(bytes(data)) == disklog.DiskLog(log_id=LOG_ID, records=10, end="zero")
    assert disklog.parse_disk_log(bytes(make_log(31))) == disklog.DiskLog(log_id=LOG_ID, records=31, end="end")
    path = tmp_path / "vol.raw"
    path.write_bytes(bytes(make_log(300, blocks=600)))
    assert disklog.read_disk_log(path) == disklog.DiskLog(log_id=LOG_ID, records=300, end="zero")
    assert disklog.read_disk_log(path).holds(300) and not disklog.read_disk_log(path).holds(301)
    assert disklog.parse_disk_log(bytes(8 * disklog.BLOCK)) == disklog.DiskLog(log_id=None, records=0, end="header")
    assert not disklog.DiskLog(log_id=None, records=0, end="header").holds(0)


def test_disk_log_records_depend_only_on_log_id_and_seq() -> None:
    one = disklog.build_record(LOG_ID, 5)
    assert one == disklog.build_record(LOG_ID, 5) and len(one) == disklog.BLOCK
    assert one != disklog.build_record(LOG_ID, 6) and one != disklog.build_record(LOG_ID + 1, 5)
    assert one[:8] == disklog.RECORD_MAGIC and struct.unpack_from("<QQ", one, 8) == (LOG_ID, 5)


def flip(offset: int) -> Callable[[bytearray], None]:
    def damage(record: bytearray) -> None:
        record[offset] ^= 0xFF

    return damage


def overwrite(offset: int, data: bytes) -> Callable[[bytearray], None]:
    def damage(record: bytearray) -> None:
        record[offset : offset + len(data)] = data

    return damage


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (flip(2048), "crc"),
        (overwrite(1024, bytes(512)), "torn"),  # one sector never reached the device
        (overwrite(0, b"XXXXXXXX"), "magic"),
        (overwrite(0, bytes(disklog.BLOCK)), "zero"),
        (overwrite(0, disklog.build_record(LOG_ID + 1, 4)), "logid"),  # another log's record
        (overwrite(0, disklog.build_record(LOG_ID, 5)), "seq"),  # a write that landed one block off
    ],
)
def test_disk_log_names_what_is_wrong_with_a_record(damage: Callable[[bytearray], None], why: str) -> None:
    data = make_log(10)
    record = bytearray(block(data, 4))
    damage(record)
    assert disklog.classify_record(bytes(record), LOG_ID, 4) == why
    data[4 * disklog.BLOCK : 5 * disklog.BLOCK] = record
    assert disklog.parse_disk_log(bytes(data)) == disklog.DiskLog(log_id=LOG_ID, records=3, end=why)


def test_disk_log_payload_and_version_are_checked_even_with_a_valid_crc() -> None:
    record = bytearray(disklog.build_record(LOG_ID, 4))
    record[100] ^= 1
    struct.pack_into("<I", record, 4092, zlib.crc32(bytes(record[:4092])))
    assert disklog.classify_record(bytes(record), LOG_ID, 4) == "payload"
    record = bytearray(disklog.build_record(LOG_ID, 4))
    struct.pack_into("<I", record, 4088, 2)
    struct.pack_into("<I", record, 4092, zlib.crc32(bytes(record[:4092])))
    assert disklog.classify_record(bytes(record), LOG_ID, 4) == "version"
    header = bytearray(disklog.build_header(LOG_ID))
    header[20] ^= 1  # the log id, under the CRC
    assert disklog.header_log_id(bytes(header)) is None


# --------------------------------------------------------------------------- the workload on the host


@pytest.fixture(scope="module")
def workload_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest workload built exactly as the image builds it, plus -Werror: it must stay warning-free."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("workload") / "livemig-workload"
    proc = subprocess.run(
        ["gcc", *WORKLOAD_CFLAGS, "-Werror", "-o", str(out), str(_WORKLOAD_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and "cannot find -lc" in proc.stderr:
        pytest.skip("no static C library (libc6-dev)")
    assert proc.returncode == 0, proc.stderr
    return out


class HostWorkload:
    """The workload as a host process: commands on stdin, console lines read by a thread."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; seen:\n" + "\n".join(self.seen[-20:])) from None
            self.seen.append(line)
            match = regex.search(line)
            if match:
                return match

    def command(self, line: str, reply: str) -> re.Match[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(reply)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@pytest.fixture
def host_workload(workload_binary: Path) -> Iterator[Callable[..., HostWorkload]]:
    """``host_workload(*args)`` starts the workload; every one started is killed at the end."""
    started: list[HostWorkload] = []

    def start(*args: str) -> HostWorkload:
        started.append(HostWorkload(workload_binary, *args))
        return started[-1]

    yield start
    for workload in started:
        workload.stop()


DISK_LINE = (
    r"^LIVEMIG DISK dev=\S+ mode=(\w+) log_id=([0-9a-f]{16}) records=(\d+) capacity=(\d+) diskrate=(\d+) tail=(\w+)$"
)


def test_workload_disk_log_on_a_plain_file(host_workload: Callable[..., HostWorkload], tmp_path: Path) -> None:
    """Format, fill, check, damage, restart: the C writer and checker agree with the Python reader."""
    vol = tmp_path / "vol.raw"
    vol.write_bytes(bytes(16 * disklog.BLOCK))  # header + 15 records
    first = host_workload("-w", "1", "-r", "0", "-d", str(vol), "-D", "2000")
    mode, log_id, records, capacity, rate, tail = first.expect(DISK_LINE).groups()
    assert (mode, records, capacity, rate, tail) == ("format", "0", "15", "2000", "none")
    first.expect(r"^LIVEMIG READY wss_mib=1 rate_mib_s=0 pages=256$")
    assert first.expect(r"^LIVEMIG DISKFULL (.*)$")[1] == "records=15 acked=15"
    assert first.command("diskcheck a", r"^LIVEMIG DISKCHECK a (.*)$")[1] == "ok records=15 acked=15"
    assert disklog.read_disk_log(vol) == disklog.DiskLog(log_id=int(log_id, 16), records=15, end="end")
    assert first.command("diskcorrupt 9", r"^LIVEMIG DISKCORRUPT (.*)$")[1] == "9 offset=2048"
    fail = first.command("diskcheck b", r"^LIVEMIG DISKCHECK b (.*)$")[1]
    assert fail == "fail records=8 acked=15 first_bad=9 why=crc"
    assert disklog.read_disk_log(vol) == disklog.DiskLog(log_id=int(log_id, 16), records=8, end="crc")
    assert first.command("diskrate 100001", r"^LIVEMIG ERR (.*)$")[1] == "bad disk rate"
    assert first.command("udpstats x", r"^LIVEMIG ERR (.*)$")[1] == "network mode is off"
    first.stop()

    # Restart: same log id, continues after the last valid record (8); the damaged tail is rewritten.
    second = host_workload("-w", "1", "-r", "0", "-d", str(vol), "-D", "0")
    assert second.expect(DISK_LINE).groups() == ("resume", log_id, "8", "15", "0", "crc")
    assert second.command("diskcheck c", r"^LIVEMIG DISKCHECK c (.*)$")[1] == "ok records=8 acked=8"
    assert second.command("diskrate 500", r"^LIVEMIG DISKRATE (\d+)$")[1] == "500"
    second.expect(r"^LIVEMIG DISKFULL records=15 acked=15$")
    assert disklog.read_disk_log(vol).records == 15

    # A log written by Python is continued by the workload: one format, two implementations.
    vol.write_bytes(bytes(make_log(20, blocks=40)))
    third = host_workload("-w", "1", "-r", "0", "-d", str(vol), "-D", "1000")
    assert third.expect(DISK_LINE).groups() == ("resume", f"{LOG_ID:016x}", "20", "39", "1000", "zero")
    third.expect(r"^LIVEMIG DISKFULL records=39 acked=39$")
    assert third.command("diskcheck d", r"^LIVEMIG DISKCHECK d (.*)$")[1] == "ok records=39 acked=39"
    assert disklog.read_disk_log(vol) == disklog.DiskLog(log_id=LOG_ID, records=39, end="end")


def test_workload_reports_an_unusable_disk(host_workload: Callable[..., HostWorkload], tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.raw"
    tiny.write_bytes(bytes(disklog.BLOCK))  # room for the header only
    workload = host_workload("-w", "1", "-r", "0", "-d", str(tiny))
    assert workload.expect(r"^LIVEMIG DISK (.*)$")[1] == f"dev={tiny} mode=unavailable error=ENOSPC"
    workload.expect(r"^LIVEMIG READY ")
    reply = workload.command("diskcheck e", r"^LIVEMIG DISKCHECK e (.*)$")[1]
    assert reply == "fail records=0 acked=0 first_bad=0 why=unavailable"
    assert workload.command("check e", r"^LIVEMIG CHECK e (\S+)")[1] == "ok"
