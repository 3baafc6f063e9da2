import pytest
from pydantic import ValidationError

from livemig.model import NicDevice, Phase, RngDevice, VmSpec, WorkloadSpec
from livemig.model.migration import TERMINAL_PHASES, Migration


def test_spec_defaults_are_resolvable_later():
    spec = VmSpec(name="web-1", memory_mib=512)
    assert spec.machine == "q35" and spec.cpu_model == "qemu64" and spec.workload is not None


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name": "Bad_Name", "memory_mib": 512}, "name"),
        ({"name": "vm", "memory_mib": 0}, "memory_mib"),
        ({"name": "vm", "memory_mib": 512, "vcpus": 0}, "vcpus"),
        ({"name": "vm", "memory_mib": 128, "workload": {"wss_mib": 128}}, "does not fit"),
        ({"name": "vm", "memory_mib": 512, "surprise": 1}, "surprise"),
    ],
)
def test_bad_specs_are_rejected_with_the_reason(kwargs, needle):
    with pytest.raises(ValidationError, match=needle):
        VmSpec(**kwargs)


def test_devices_must_not_share_slots_or_macs():
    nic = NicDevice(id="n0", pci_addr="0x3", mac="52:54:00:00:00:01")
    with pytest.raises(ValidationError, match="pci_addr"):
        VmSpec(name="vm", memory_mib=512, devices=[nic, RngDevice(id="r0", pci_addr="0x3")])
    twin = NicDevice(id="n1", pci_addr="0x4", mac="52:54:00:00:00:01")
    with pytest.raises(ValidationError, match="MAC"):
        VmSpec(name="vm", memory_mib=512, devices=[nic, twin])


@pytest.mark.parametrize("mac", ["52:54:00:00:00", "01:00:5e:00:00:01", "zz:54:00:00:00:01"])
def test_bad_macs(mac):
    with pytest.raises(ValidationError):
        NicDevice(id="n0", pci_addr="0x3", mac=mac)


@pytest.mark.parametrize("addr", ["3", "0x0", "0x20", "0x3.8"])
def test_bad_pci_addresses(addr):
    with pytest.raises(ValidationError, match=r"pci_addr|PCI slot"):
        VmSpec(name="vm", memory_mib=512, devices=[RngDevice(id="r0", pci_addr=addr)])


def test_spec_round_trips_through_json():
    spec = VmSpec(
        name="vm",
        memory_mib=512,
        devices=[NicDevice(id="n0", pci_addr="0x3", mac="52:54:00:AA:00:01")],
        workload=WorkloadSpec(wss_mib=64, rate_mib_s=5),
    )
    assert VmSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.devices[0].mac == "52:54:00:aa:00:01"


def test_phases_partition():
    assert Phase.SUCCEEDED in TERMINAL_PHASES and Phase.PRECOPY not in TERMINAL_PHASES


def test_conditions_update_in_place():
    m = Migration(id="m", vm="vm", source="A", destination="B")
    m.set_condition("TargetPrepared", True, "uri")
    m.set_condition("TargetPrepared", False, "gone")
    assert len(m.conditions) == 1 and m.conditions[0].status is False
