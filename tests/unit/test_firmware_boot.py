"""VMs booted by firmware from a volume: the spec's rules, the QEMU command line, the host's
firmware builds, and the volumes hostd fills (the real proof boots them: tests/e2e/test_own_vm.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from livemig.errors import InvalidRequest
from livemig.host.firmware import FirmwareBuild, FirmwareCatalog
from livemig.host.qemu import VmPaths, command_line
from livemig.host.seeds import initialise_nvram, store_state
from livemig.model import NbdExport, NicDevice, VmSpec, VolumeDevice
from livemig.model.vm import CIDATA_SLOT, NVRAM_BYTES, NVRAM_SLOT, FirmwareSpec
from livemig.testing.fakeqemu import FakeQemuRuntime, QemuWorld

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDJuRPwE8S1jtKoRN58zY9JX7VQmI6ACuYvv7l4UhgXj test@livemig"
SHA = "ab" * 32


def boot_disk(index: int | None = 0, slot: str = "0x4", volume: str = "deb") -> VolumeDevice:
    return VolumeDevice(id=f"disk{slot[2:]}", pci_addr=slot, volume=volume, boot_index=index)


def uefi_spec(**extra: object) -> VmSpec:
    return VmSpec.model_validate({
        "name": "web", "memory_mib": 256, "machine": "pc-q35-7.2",
        "firmware": {"kind": "uefi", "build": "ovmf-4m", "sha256": SHA, "nvram_volume": "web.nvram"},
        "devices": [boot_disk().model_dump()], **extra,
    })  # fmt: skip


def export(name: str) -> NbdExport:
    return NbdExport(host="127.0.0.1", port=10809, export=f"{name}/att.secret", attachment="att")


EXPORTS = {"disk4": export("deb"), NVRAM_SLOT: export("web.nvram"), CIDATA_SLOT: export("web.cidata")}
OVMF = FirmwareBuild("ovmf-4m", Path("/fw/OVMF_CODE_4M.fd"), SHA, Path("/fw/OVMF_VARS_4M.fd"))


# ------------------------------------------------------------------ the spec


def test_firmware_shorthand_and_no_workload_by_default():
    spec = VmSpec.model_validate({"name": "web", "memory_mib": 256, "firmware": "bios",
                                  "devices": [boot_disk().model_dump()]})  # fmt: skip
    assert spec.firmware == FirmwareSpec(kind="bios") and spec.workload is None
    assert VmSpec(name="vm", memory_mib=256).workload is not None, "direct kernel boot keeps the workload"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"firmware": "uefi", "devices": []}, "no volume device has a boot_index"),
        ({"devices": [boot_disk().model_dump()]}, "boots its kernel directly"),
        ({"firmware": "uefi", "devices": [boot_disk().model_dump()], "workload": {}}, "livemig workload runs only"),
        ({"firmware": "uefi", "devices": [boot_disk().model_dump()], "boot": {"append": "x"}}, "no kernel"),
        ({"firmware": {"kind": "bios", "secure_boot": True}, "devices": [boot_disk().model_dump()]}, "UEFI options"),
        ({"firmware": {"kind": "uefi", "secure_boot": True}, "machine": "pc", "devices": [boot_disk().model_dump()]},
         "Secure Boot needs a q35"),
        ({"firmware": "uefi", "devices": [boot_disk(0).model_dump(), boot_disk(0, "0x5", "b").model_dump()]},
         "share boot_index 0"),
        ({"cloud_init": {"hostname": "web", "ssh_authorized_keys": [KEY]}}, "set firmware too"),
        ({"firmware": "uefi", "devices": [boot_disk().model_dump()],
          "cloud_init": {"hostname": "web_1", "ssh_authorized_keys": [KEY]}}, "host name 'web_1' is not valid"),
        ({"firmware": "uefi", "devices": [boot_disk().model_dump()],
          "cloud_init": {"hostname": "web", "ssh_authorized_keys": ["ssh-ed25519 AAAA"]}}, "SSH public key"),
        ({"firmware": "uefi", "devices": [boot_disk(slot="0x1d").model_dump()],
          "cloud_init": {"hostname": "web", "ssh_authorized_keys": [KEY]}}, "share pci_addr '0x1d'"),
        ({"firmware": {"kind": "uefi", "nvram_volume": "deb"}, "devices": [boot_disk().model_dump()]},
         "attached to a VM only once"),
    ],
)  # fmt: skip
def test_spec_refusals_say_why(data, message):
    with pytest.raises(ValidationError, match=message):
        VmSpec.model_validate({"name": "web", "memory_mib": 256, **data})


def test_volume_slots_name_the_store_and_the_seed():
    spec = uefi_spec(cloud_init={"hostname": "web", "ssh_authorized_keys": [KEY], "volume": "web.cidata"})
    assert spec.volume_slots() == {"disk4": "deb", NVRAM_SLOT: "web.nvram", CIDATA_SLOT: "web.cidata"}


def test_mismatch_names_the_builds():
    pinned = FirmwareSpec(kind="uefi", build="ovmf-4m", sha256=SHA)
    assert pinned.mismatch({"ovmf-4m": SHA}, "B") is None
    assert "host B has no ovmf-4m firmware (Debian package ovmf)" in (pinned.mismatch({}, "B") or "")
    other = pinned.mismatch({"ovmf-4m": "cd" * 32}, "B") or ""
    assert "another ovmf-4m build (sha256 cdcdcdcdcdcdcdcd…)" in other and "mismatched code" in other


# ------------------------------------------------------------------ the command line


def test_uefi_command_line_has_code_and_the_store_on_nbd_at_its_size():
    argv = command_line(uefi_spec(), VmPaths(Path("/run/web")), "tcg", exports=EXPORTS, firmware=OVMF)
    joined = " ".join(argv)
    assert "-machine pc-q35-7.2,accel=tcg,pflash0=fw_code,pflash1=fw_vars" in joined
    assert "-kernel" not in argv and "-bios" not in argv and "smm=on" not in joined
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    by_node = {b["node-name"]: b for b in blockdevs}
    assert by_node["fw_code_file"]["filename"] == "/fw/OVMF_CODE_4M.fd" and by_node["fw_code"]["read-only"]
    assert by_node["fw_vars"] == {"driver": "raw", "node-name": "fw_vars", "file": "fw_vars_nbd", "size": NVRAM_BYTES}
    assert by_node["fw_vars_nbd"]["export"] == "web.nvram/att.secret"
    assert "virtio-blk-pci,id=disk4,drive=vol_disk4,bus=pcie.0,addr=0x4,bootindex=0" in joined


def test_secure_boot_adds_smm_and_the_secure_flash():
    spec = uefi_spec()
    assert spec.firmware is not None
    secure = spec.firmware.model_copy(update={"secure_boot": True, "build": "ovmf-4m-secboot"})
    spec = spec.model_copy(update={"firmware": secure})
    build = FirmwareBuild("ovmf-4m-secboot", Path("/fw/OVMF_CODE_4M.secboot.fd"), SHA, Path("/fw/v.fd"))
    argv = command_line(spec, VmPaths(Path("/run/web")), "tcg", exports=EXPORTS, firmware=build)
    assert "pflash1=fw_vars,smm=on" in " ".join(argv)
    assert argv[argv.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"


def test_bios_command_line_uses_the_rom_and_no_store():
    spec = VmSpec.model_validate({"name": "b", "memory_mib": 256, "machine": "pc-q35-7.2",
                                  "firmware": {"kind": "bios", "build": "seabios", "sha256": SHA},
                                  "devices": [boot_disk().model_dump()]})  # fmt: skip
    rom = FirmwareBuild("seabios", Path("/usr/share/seabios/bios-256k.bin"), SHA)
    argv = command_line(spec, VmPaths(Path("/run/b")), "tcg", exports={"disk4": export("deb")}, firmware=rom)
    assert argv[argv.index("-bios") + 1] == "/usr/share/seabios/bios-256k.bin"
    assert "pflash" not in " ".join(argv)


def test_cloud_init_seed_is_a_read_only_disk_at_its_slot():
    spec = uefi_spec(cloud_init={"hostname": "web", "ssh_authorized_keys": [KEY], "volume": "web.cidata"})
    argv = command_line(spec, VmPaths(Path("/run/web")), "tcg", exports=EXPORTS, firmware=OVMF)
    seed = next(json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev" and "lm-cidata" in argv[i + 1])
    assert seed["read-only"] is True and seed["export"] == "web.cidata/att.secret"
    assert "virtio-blk-pci,id=lm-cidata,drive=lm-cidata,bus=pcie.0,addr=0x1d" in argv


@pytest.mark.parametrize(
    ("exports", "firmware", "message"),
    [
        ({"disk4": export("deb")}, OVMF, "no NBD export given for its UEFI variable store"),
        (EXPORTS, None, "firmware ovmf-4m not resolved"),
        (EXPORTS, FirmwareBuild("seabios", Path("/b"), SHA), "firmware ovmf-4m not resolved"),
    ],
)
def test_command_line_refuses_what_it_cannot_boot(exports, firmware, message):
    with pytest.raises(InvalidRequest, match=message):
        command_line(uefi_spec(), VmPaths(Path("/run/web")), "tcg", exports=exports, firmware=firmware)


def test_direct_kernel_boot_is_unchanged_by_firmware_support():
    spec = VmSpec(name="vm", memory_mib=256, devices=[NicDevice(id="nic0", pci_addr="0x3", mac="52:54:00:00:00:01")],
                  boot={"kernel": "/k", "initrd": "/i", "append": "a"})  # fmt: skip
    argv = command_line(spec, VmPaths(Path("/run/vm")), "tcg")
    assert argv[argv.index("-kernel") : argv.index("-kernel") + 6] == ["-kernel", "/k", "-initrd", "/i", "-append", "a"]
    assert "-machine" in argv and argv[argv.index("-machine") + 1] == "q35,accel=tcg"


# ------------------------------------------------------------------ the host's builds


def fake_ovmf_dir(tmp_path: Path, code: bytes = b"code") -> Path:
    (tmp_path / "OVMF_CODE_4M.fd").write_bytes(code)
    (tmp_path / "OVMF_VARS_4M.fd").write_bytes(bytes(NVRAM_BYTES))
    (tmp_path / "OVMF_CODE.fd").write_bytes(b"the 2 MB build: never used")
    return tmp_path


def test_catalog_reports_builds_by_checksum_and_pins_them(tmp_path):
    catalog = FirmwareCatalog.scan(fake_ovmf_dir(tmp_path), tmp_path / "no-seabios.bin")
    report = catalog.report()
    assert list(report) == ["ovmf-4m"] and len(report["ovmf-4m"]) == 64
    build = catalog.for_new_vm(FirmwareSpec(kind="uefi"))
    assert build.code.name == "OVMF_CODE_4M.fd" and build.vars_template is not None
    with pytest.raises(InvalidRequest, match=r"seabios is not installed on this host \(Debian package seabios"):
        catalog.for_new_vm(FirmwareSpec(kind="bios"))
    pinned = FirmwareSpec(kind="uefi", build="ovmf-4m", sha256=build.sha256)
    assert catalog.pinned(pinned, "A") == build
    (tmp_path / "OVMF_CODE_4M.fd").write_bytes(b"another build")
    with pytest.raises(InvalidRequest, match="host B has another ovmf-4m build"):
        FirmwareCatalog.scan(tmp_path, tmp_path / "x").pinned(pinned, "B")


def test_real_debian_firmware_when_installed():
    catalog = FirmwareCatalog.scan()
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").exists():
        pytest.skip("the ovmf package is not installed")
    assert {"ovmf-4m", "ovmf-4m-secboot"} <= set(catalog.report())
    assert catalog.builds["ovmf-4m"].vars_template == Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


# ------------------------------------------------------------------ the variable store hostd fills


def test_store_states():
    template = bytes(0x28) + b"_FVH" + bytes(16)
    assert store_state(bytes(64)) == "empty"
    assert store_state(template) == "store"
    assert store_state(b"\x01" + bytes(63)) == "foreign"


def test_nvram_is_initialised_once_then_kept(tmp_path):
    runtime = FakeQemuRuntime(QemuWorld(), tmp_path, "127.0.0.1")
    template = runtime.firmware().builds["ovmf-4m"].vars_template
    assert template is not None
    store = export("web.nvram")
    assert asyncio.run(initialise_nvram(runtime, store, template, "web.nvram")) == "initialised"
    assert runtime.volumes["web.nvram"] == template.read_bytes()
    written = runtime.volumes["web.nvram"]
    runtime.volumes["web.nvram"] = written[:100] + b"variables" + written[109:]
    assert asyncio.run(initialise_nvram(runtime, store, template, "web.nvram")) == "kept"
    assert b"variables" in runtime.volumes["web.nvram"], "an existing store is never overwritten"
    runtime.volumes["web.nvram"] = b"\x01" * NVRAM_BYTES
    with pytest.raises(InvalidRequest, match="neither empty nor an OVMF variable store"):
        asyncio.run(initialise_nvram(runtime, store, template, "web.nvram"))
