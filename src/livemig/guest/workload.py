"""The livemig guest workload as a VM: its spec, and reading its heartbeats off the console.

The workload (``workload.c``) prints ``LIVEMIG HB seq=N`` heartbeats; a heartbeat newer than the
last one seen on the source proves the guest runs on after a migration.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from livemig.model.vm import Device, RngDevice, VmSpec, VolumeDevice, WorkloadSpec

_HB = re.compile(r"LIVEMIG HB seq=(\d+)")


def workload_vm_spec(
    memory_mib: int = 512, rate: int = 20, wss_mib: int = 128, name: str = "demo", volume: str | None = None,
    disk_rate: int = 40,
) -> VmSpec:  # fmt: skip
    """A VM running livemig's guest workload (the demo's, the tests' and the benchmarks'), with a
    pinned device layout so the destination reproduces it exactly; with ``volume``, a data disk on
    blockd that the workload appends its checksummed log to."""
    devices: list[Device] = [RngDevice(id="rng0", pci_addr="0x5")]
    if volume is not None:
        devices.append(VolumeDevice(id="data0", pci_addr="0x6", volume=volume))
    return VmSpec(
        name=name, memory_mib=memory_mib, vcpus=1, devices=devices,
        workload=WorkloadSpec(wss_mib=min(wss_mib, memory_mib - 64), rate_mib_s=rate,
                              disk_rate=disk_rate if volume is not None else 0),
    )  # fmt: skip


def heartbeat_seq(text: str) -> int | None:
    found = _HB.findall(text)
    return int(found[-1]) if found else None


def wait_heartbeat_after(console: Callable[[], str], after: int, timeout: float = 30.0) -> int:
    """Wait for a heartbeat newer than ``after`` in what ``console()`` returns (the VM's console
    tail on its current host); return its seq, or -1 if none came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seq = heartbeat_seq(console())
        if seq is not None and seq > after:
            return seq
        time.sleep(0.25)
    return -1
