"""Kernel module metadata and load order, without ``kmod``.

Why this exists: the guest initramfs loads the virtio drivers with busybox ``insmod``, which
does not resolve dependencies, and the build machine has no ``modinfo``/``depmod`` (``kmod`` is
not installed; the Debian package ships no ``modules.dep`` either). Every ``.ko`` carries its
own dependency list in the ``.modinfo`` ELF section (``depends=a,b`` among NUL-separated
``key=value`` strings), so a tiny ELF section reader plus a topological sort is all we need.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livemig.guest.errors import ModuleDependencyError, ModuleInfoError

__all__ = [
    "ModuleInfo",
    "index_modules",
    "load_order",
    "module_load_order",
    "normalize_module_name",
    "parse_modinfo",
    "read_elf_section",
    "read_modinfo",
]

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ELFDATA2MSB = 2
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_SHN_XINDEX = 0xFFFF
_SHT_NOBITS = 8


@dataclass(frozen=True)
class ModuleInfo:
    """What the loader needs from one module's ``.modinfo``."""

    name: str
    depends: tuple[str, ...]
    vermagic: str | None = None
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)


def normalize_module_name(name: str) -> str:
    """The kernel treats ``-`` and ``_`` in module names alike (``virtio-rng.ko`` is ``virtio_rng``)."""
    return name.replace("-", "_")


def read_elf_section(data: bytes, section: str) -> bytes:
    """Return the bytes of the named section of an ELF64 object (either byte order).

    Raises :class:`ModuleInfoError` for anything that is not a well-formed ELF64 file or that
    lacks the section, so a broken package surfaces as one clear message.
    """
    if len(data) < 64 or data[:4] != _ELF_MAGIC:
        raise ModuleInfoError("not an ELF file")
    if data[4] != _ELFCLASS64:
        raise ModuleInfoError(f"not an ELF64 file (EI_CLASS={data[4]})")
    if data[5] == _ELFDATA2LSB:
        order = "<"
    elif data[5] == _ELFDATA2MSB:
        order = ">"
    else:
        raise ModuleInfoError(f"unknown ELF byte order (EI_DATA={data[5]})")
    (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
    if shoff == 0:
        raise ModuleInfoError("ELF file has no section headers")
    if shentsize < 64:
        raise ModuleInfoError(f"ELF section header size {shentsize} is too small")

    def header(index: int) -> tuple[int, int, int, int, int]:
        """(name offset, type, file offset, size, link) of section ``index``."""
        start = shoff + index * shentsize
        if start + 64 > len(data):
            raise ModuleInfoError(f"ELF section header {index} lies beyond the end of the file")
        name, kind, _flags, _addr, offset, size, link = struct.unpack_from(order + "IIQQQQI", data, start)
        return name, kind, offset, size, link

    if shnum == 0 or shstrndx == _SHN_XINDEX:  # extended numbering: the real values live in section 0
        _n, _k, _o, size0, link0 = header(0)
        if shnum == 0:
            shnum = size0
        if shstrndx == _SHN_XINDEX:
            shstrndx = link0
    if shstrndx == _SHN_UNDEF or shstrndx >= shnum or _SHN_LORESERVE <= shstrndx < _SHN_XINDEX:
        raise ModuleInfoError("ELF file has no section name table")

    def contents(kind: int, offset: int, size: int, what: str) -> bytes:
        if kind == _SHT_NOBITS:
            return b""
        if offset + size > len(data):
            raise ModuleInfoError(f"ELF section {what} lies beyond the end of the file")
        return data[offset : offset + size]

    _n, strtype, stroff, strsize, _l = header(shstrndx)
    names = contents(strtype, stroff, strsize, "name table")
    wanted = section.encode()
    for index in range(shnum):
        name_off, kind, offset, size, _link = header(index)
        end = names.find(b"\0", name_off)
        if name_off >= len(names) or end < 0:
            continue
        if names[name_off:end] == wanted:
            return contents(kind, offset, size, section)
    raise ModuleInfoError(f"ELF file has no {section} section")


def parse_modinfo(raw: bytes, *, fallback_name: str | None = None) -> ModuleInfo:
    """Parse the NUL-separated ``key=value`` strings of a ``.modinfo`` section.

    ``name=`` is absent in some older modules; ``fallback_name`` (the file stem) stands in then.
    Padding NULs between entries (sections are aligned) are skipped.
    """
    fields: dict[str, list[str]] = {}
    for entry in raw.split(b"\0"):
        if not entry:
            continue
        key, sep, value = entry.decode("utf-8", errors="replace").partition("=")
        if not sep:
            continue
        fields.setdefault(key, []).append(value)
    names = fields.get("name")
    name = names[0] if names else fallback_name
    if not name:
        raise ModuleInfoError(".modinfo has no name= entry")
    depends: list[str] = []
    for value in fields.get("depends", []):
        depends.extend(normalize_module_name(d.strip()) for d in value.split(",") if d.strip())
    vermagic = fields.get("vermagic", [None])[0]
    return ModuleInfo(
        name=normalize_module_name(name),
        depends=tuple(dict.fromkeys(depends)),
        vermagic=vermagic,
        fields={k: tuple(v) for k, v in fields.items()},
    )


def read_modinfo(path: Path) -> ModuleInfo:
    """The :class:`ModuleInfo` of one ``.ko`` file (uncompressed, as Debian bookworm ships them)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModuleInfoError(f"cannot read kernel module {path}: {exc}") from exc
    stem = normalize_module_name(path.name.removesuffix(".ko"))
    try:
        return parse_modinfo(read_elf_section(data, ".modinfo"), fallback_name=stem)
    except ModuleInfoError as exc:
        raise ModuleInfoError(f"{path}: {exc.message}") from exc


def load_order(
    roots: Iterable[str],
    depends: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]],
) -> list[str]:
    """Every module needed by ``roots``, each after all of its dependencies (depth first).

    ``depends`` maps a module name to the names it depends on (a mapping, or a function that may
    raise :class:`ModuleDependencyError` for an unknown module). Names are normalized (``-`` →
    ``_``). The order is deterministic: roots in the given order, dependencies in the order the
    module lists them, each module once.

    Raises :class:`ModuleDependencyError` when a module is unknown (with the chain that needed it)
    or when dependencies form a cycle (with the cycle), because insmod would fail at boot anyway.
    """
    if callable(depends):
        lookup = depends
    else:
        table = {normalize_module_name(k): v for k, v in depends.items()}

        def lookup(name: str) -> Sequence[str]:
            try:
                return table[name]
            except KeyError:
                raise ModuleDependencyError(f"unknown kernel module {name!r}") from None

    order: list[str] = []
    done: set[str] = set()
    path: list[str] = []  # the current chain, for cycle and missing-module messages

    def visit(name: str) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise ModuleDependencyError("kernel module dependency cycle: " + " -> ".join(cycle))
        path.append(name)
        try:
            deps = lookup(name)
        except ModuleDependencyError as exc:
            if len(path) > 1:
                raise ModuleDependencyError(f"{exc.message} (needed by {' -> '.join(path[:-1])})") from None
            raise
        for dep in deps:
            visit(normalize_module_name(dep))
        path.pop()
        done.add(name)
        order.append(name)

    for root in roots:
        visit(normalize_module_name(root))
    return order


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map every module name under ``modules_dir`` (``lib/modules/<ver>``) to its ``.ko`` file."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(modules_dir):
        for file in files:
            if file.endswith(".ko"):
                index.setdefault(normalize_module_name(file[: -len(".ko")]), Path(dirpath) / file)
    return index


def module_load_order(modules_dir: Path, roots: Iterable[str], *, kernel_version: str | None = None) -> list[Path]:
    """The ``.ko`` files to insmod, in order, for ``roots`` and everything they depend on.

    With ``kernel_version``, each module's ``vermagic`` must start with it: a module built for
    another kernel would be refused by insmod at boot, so refuse it here with a clear message.
    """
    index = index_modules(modules_dir)

    def depends_of(name: str) -> Sequence[str]:
        if name not in index:
            raise ModuleDependencyError(f"kernel module {name!r} not found under {modules_dir}")
        info = read_modinfo(index[name])
        if info.name != name:
            raise ModuleInfoError(f"{index[name]}: .modinfo names it {info.name!r}, expected {name!r}")
        if kernel_version and info.vermagic is not None and info.vermagic.split(" ", 1)[0] != kernel_version:
            raise ModuleInfoError(
                f"{index[name]} was built for kernel {info.vermagic.split(' ', 1)[0]!r}, not {kernel_version!r}"
            )
        return info.depends

    return [index[name] for name in load_order(roots, depends_of)]
