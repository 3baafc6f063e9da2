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
