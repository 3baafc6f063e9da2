"""The guest image's kernel-module plumbing, without QEMU or the Debian kernel package.

Why: the initramfs loads drivers with busybox ``insmod`` in the order computed here; a wrong
order or a silently dropped dependency only shows up as a guest without network or disk, far
from the cause. Synthetic ELF files stand in for real ``.ko`` files.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from livemig.errors import LivemigError
from livemig.guest.errors import ImageBuildError, ModuleDependencyError, ModuleInfoError
from livemig.guest.image import _elf_is_static, _kernel_version_of, _parse_kernel_depends, kernel_cmdline
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
