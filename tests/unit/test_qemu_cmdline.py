from pathlib import Path

import pytest

from livemig.errors import InvalidRequest
from livemig.host.accel import choose_accel
from livemig.host.qemu import VmPaths, command_line, resolve_machine
from livemig.model import BootSpec, NicDevice, RngDevice, VmSpec

TABLE = {"q35": "pc-q35-7.2", "pc-q35-7.2": "pc-q35-7.2", "pc": "pc-i440fx-7.2"}


def spec() -> VmSpec:
    return VmSpec(
        name="vm1", memory_mib=512, vcpus=2, machine="pc-q35-7.2",
        devices=[NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:00:01"), RngDevice(id="rng0", pci_addr="0x5")],
        boot=BootSpec(kernel="/k", initrd="/i", append="console=ttyS0"),
    )  # fmt: skip


def test_command_line_is_deterministic_and_pins_the_layout():
    paths = VmPaths(Path("/run/vm1"))
    a = command_line(spec(), paths, "tcg")
    assert a == command_line(spec(), paths, "tcg")
    joined = " ".join(a)
    assert "-machine pc-q35-7.2,accel=tcg" in joined
    assert "mac=52:54:00:00:00:01,bus=pcie.0,addr=0x3" in joined
    assert "virtio-rng-pci,id=rng0,rng=rng_rng0,bus=pcie.0,addr=0x5" in joined
    assert "-daemonize" in a and "-incoming" not in a


def test_incoming_differs_only_by_incoming_defer():
    paths = VmPaths(Path("/run/vm1"))
    source, target = command_line(spec(), paths, "tcg"), command_line(spec(), paths, "tcg", incoming=True)
    assert target[: len(source)] == source and target[len(source) :] == ["-incoming", "defer"]


def test_unresolved_boot_is_refused():
    with pytest.raises(InvalidRequest, match="boot"):
        command_line(VmSpec(name="vm", memory_mib=512), VmPaths(Path("/x")), "tcg")


def test_machine_aliases_resolve_to_versioned_types():
    assert resolve_machine("q35", TABLE) == "pc-q35-7.2"
    with pytest.raises(InvalidRequest, match="not supported"):
        resolve_machine("pc-q35-99.0", TABLE)


def test_accel_auto_picks_tcg_without_hardware_kvm(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVEMIG_ACCEL", raising=False)
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_pvm").mkdir()
    choice = choose_accel("auto", tmp_path)
    assert choice.name == "tcg" and "kvm_intel" in choice.reason


def test_accel_override_and_env(tmp_path, monkeypatch):
    assert choose_accel("tcg", tmp_path).name == "tcg"
    monkeypatch.setenv("LIVEMIG_ACCEL", "kvm")
    assert choose_accel(None, tmp_path).name == "kvm"
    with pytest.raises(InvalidRequest):
        choose_accel("xen", tmp_path)


def test_ram_size_is_the_spec_less_its_pinned_trim():
    """The trim moves TCG guests off QEMU 7.2's 256 KiB fast-sync grid (host/qemu.py); the size
    comes from the spec alone, so source and destination always agree."""
    from livemig.host.qemu import TCG_RAM_TRIM_KIB

    paths = VmPaths(Path("/run/vm1"))
    plain = command_line(spec(), paths, "tcg")
    assert plain[plain.index("-m") + 1] == "524288K"
    trimmed = command_line(spec().model_copy(update={"ram_trim_kib": TCG_RAM_TRIM_KIB}), paths, "kvm")
    size_kib = int(trimmed[trimmed.index("-m") + 1].rstrip("K"))
    assert size_kib == 512 * 1024 - TCG_RAM_TRIM_KIB and size_kib % 256 != 0


@pytest.mark.parametrize("trim", [-8, 4, 2048])
def test_a_trim_off_the_8k_grid_or_out_of_range_is_refused(trim):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ram_trim_kib"):
        VmSpec(name="vm", memory_mib=512, ram_trim_kib=trim)


@pytest.mark.parametrize(
    ("accel", "version", "trim"),
    [("tcg", "7.2.22", True), ("tcg", "8.2.2", True), ("tcg", "9.0.0", False), ("tcg", "10.0.2", False),
     ("kvm", "7.2.22", False), ("tcg", "unknown", True)],
)  # fmt: skip
def test_only_tcg_before_qemu_9_needs_the_trim(accel, version, trim):
    from livemig.host.qemu import needs_tcg_ram_trim

    assert needs_tcg_ram_trim(accel, version) is trim


def test_livemig_qemu_chooses_the_binary_and_a_bad_one_is_named(monkeypatch, tmp_path):
    from livemig.errors import BootstrapError
    from livemig.host.qemu import qemu_binary

    fake = tmp_path / "qemu-10"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LIVEMIG_QEMU", str(fake))
    assert qemu_binary() == str(fake)
    monkeypatch.setenv("LIVEMIG_QEMU", str(tmp_path / "missing"))
    with pytest.raises(BootstrapError, match="LIVEMIG_QEMU="):
        qemu_binary()
