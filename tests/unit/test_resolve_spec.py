"""hostd pins what the user left open, including the TCG RAM trim (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent
from livemig.host.qemu import TCG_RAM_TRIM_KIB
from livemig.model import BootSpec, VmSpec
from livemig.testing.fakeqemu import FakeQemuRuntime, QemuWorld


def agent(tmp_path: Path, accel: str, qemu_version: str = "7.2.22") -> HostAgent:
    runtime = FakeQemuRuntime(QemuWorld(), tmp_path / "image", "127.0.0.1")
    runtime.VERSION = qemu_version
    return HostAgent("A", tmp_path, "127.0.0.1", AccelChoice(accel, "test"), memory_mib=4096, runtime=runtime)


def spec(tmp_path: Path, **update: object) -> VmSpec:
    for name in ("k", "i"):
        (tmp_path / name).write_bytes(b"")
    boot = BootSpec(kernel=str(tmp_path / "k"), initrd=str(tmp_path / "i"))
    return VmSpec(name="vm", memory_mib=256, machine="pc-q35-7.2", boot=boot, **update)  # type: ignore[arg-type]


def test_tcg_hosts_pin_the_trim_and_kvm_hosts_do_not(tmp_path: Path) -> None:
    assert agent(tmp_path, "tcg").resolve_spec(spec(tmp_path)).ram_trim_kib == TCG_RAM_TRIM_KIB
    assert agent(tmp_path, "kvm").resolve_spec(spec(tmp_path)).ram_trim_kib == 0


def test_a_qemu_with_the_fix_needs_no_trim(tmp_path: Path) -> None:
    assert agent(tmp_path, "tcg", qemu_version="10.0.2").resolve_spec(spec(tmp_path)).ram_trim_kib == 0


def test_a_pinned_trim_is_kept_wherever_the_spec_goes(tmp_path: Path) -> None:
    pinned = agent(tmp_path, "tcg").resolve_spec(spec(tmp_path))
    assert agent(tmp_path, "kvm").resolve_spec(pinned).ram_trim_kib == TCG_RAM_TRIM_KIB
    assert agent(tmp_path, "tcg").resolve_spec(spec(tmp_path, ram_trim_kib=256)).ram_trim_kib == 256
