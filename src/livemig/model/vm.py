"""The VM spec: everything needed to reproduce a VM's device layout exactly on another host.

Why explicit PCI addresses and MACs: QEMU's migration stream carries device *state*, not the
device *layout*; the destination must be started with an identical layout or the load fails (or,
worse, the guest sees devices move). So the spec pins every slot and MAC, and the machine type is
stored resolved (``pc-q35-7.2``, never the moving alias ``q35``).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from livemig.model.migration import MigrationPolicies

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
# livemig's own virtio-serial command channel sits here in every VM (host/qemu.py)
RESERVED_PCI_SLOT = 0x1E
_PCI_ADDR = re.compile(r"^0x[0-9a-f]{1,2}(\.[0-7])?$")


def unicast_mac(value: str) -> str:
    """A MAC as ``52:54:00:12:34:56`` (lower case), refusing multicast ones; shared by the VM spec
    and the VCN model so both accept exactly the same addresses."""
    value = value.lower()
    if not _MAC.match(value):
        raise ValueError(f"MAC {value!r} is not of the form 52:54:00:12:34:56")
    if int(value[:2], 16) & 1:
        raise ValueError(f"MAC {value!r} is a multicast address")
    return value


class RunState(StrEnum):
    """QEMU's runstate (``query-status``), plus what hostd says when it cannot ask QEMU."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    FINISH_MIGRATE = "finish-migrate"
    PRELAUNCH = "prelaunch"
    SUSPENDED = "suspended"
    SHUTDOWN = "shutdown"
    GUEST_PANICKED = "guest-panicked"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    WATCHDOG = "watchdog"
    DEBUG = "debug"
    RESTORE_VM = "restore-vm"
    SAVE_VM = "save-vm"
    COLO = "colo"
    ABSENT = "absent"  # hostd: the VM's QEMU process is gone
    UNREACHABLE = "unreachable"  # hostd: the process runs but does not answer QMP
    UNKNOWN = "unknown"  # a runstate this livemig does not know (a newer QEMU)

    @classmethod
    def parse(cls, text: str) -> RunState:
        try:
            return cls(text)
        except ValueError:
            return cls.UNKNOWN


#: runstates in which ``cont`` makes a stopped source guest run again
RESUMABLE = frozenset({RunState.PAUSED, RunState.POSTMIGRATE, RunState.PRELAUNCH, RunState.FINISH_MIGRATE,
                       RunState.IO_ERROR})  # fmt: skip


class VmRole(StrEnum):
    """What a VM is to this host: its home, a migration's destination, or a migration's source."""

    RUNNING = "running"
    INCOMING = "incoming"
    OUTGOING = "outgoing"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NicDevice(_Strict):
    """A virtio NIC. ``backend`` says where its frames go: ``vswitch`` (the VCN dataplane, as VNIC
    ``vnic``), ``segment`` (a plain shared L2 segment on this machine: every port hears every
    frame, so a migration needs no hand-off; the reference of bench/blackout.py), ``user``
    (QEMU's restricted slirp) or ``none``."""

    kind: Literal["nic"] = "nic"
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    pci_addr: str
    mac: str
    backend: Literal["vswitch", "segment", "user", "none"] = "user"
    vnic: str | None = Field(default=None, description="the VNIC this NIC is (backend vswitch)")
    segment: str | None = Field(default=None, pattern=r"^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$",
                                description="the segment's hub, a loopback host:port (backend segment)")  # fmt: skip

    @model_validator(mode="after")
    def _vnic_iff_vswitch(self) -> NicDevice:
        if (self.backend == "vswitch") != (self.vnic is not None):
            raise ValueError(f"NIC {self.id}: a vnic is named exactly when the backend is vswitch")
        if (self.backend == "segment") != (self.segment is not None):
            raise ValueError(f"NIC {self.id}: a segment is named exactly when the backend is segment")
        return self

    @field_validator("mac")
    @classmethod
    def _mac_is_unicast(cls, value: str) -> str:
        return unicast_mac(value)


class RngDevice(_Strict):
    """A virtio RNG, so the guest has entropy without waiting on interrupts."""

    kind: Literal["rng"] = "rng"
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    pci_addr: str


class VolumeDevice(_Strict):
    """A virtio-blk disk backed by a blockd volume over NBD; the volume outlives any host.

    The spec names only the volume: the NBD export (which differs per host, one attachment each)
    is handed to hostd separately, so source and destination share one device layout.
    """

    kind: Literal["volume"] = "volume"
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    pci_addr: str
    volume: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class NbdExport(_Strict):
    """Where one host's attachment of a volume is served: QEMU's NBD client connects here."""

    host: str
    port: int = Field(ge=1, le=65535)
    export: str = Field(min_length=1, max_length=4096)
    attachment: str = ""
    tls_hostname: str | None = Field(
        default=None, description="blockd requires TLS (an nbds:// export): the name its certificate must carry"
    )


Device = Annotated[NicDevice | RngDevice | VolumeDevice, Field(discriminator="kind")]


class WorkloadSpec(_Strict):
    """The livemig guest workload's settings (kernel command line of the guest image)."""

    wss_mib: int = Field(default=64, ge=1, le=65536, description="working set dirtied, MiB")
    rate_mib_s: int = Field(default=20, ge=0, le=100000, description="dirty rate, MiB/s")
    disk_rate: int = Field(default=40, ge=0, le=100000,
                           description="log records/s appended to the first volume (0: no disk mode)")  # fmt: skip


class BootSpec(_Strict):
    """Direct kernel boot. Empty kernel/initrd mean the livemig guest image from the cache."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""


class VmSpec(_Strict):
    """What a user asks for; hostd fills ``machine`` (resolved) and ``boot`` paths on create."""

    name: str = Field(pattern=NAME_PATTERN, description="unique in the region")
    memory_mib: int = Field(ge=16, le=1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=64)
    machine: str = Field(default="q35", pattern=r"^[a-z0-9.\-]+$")
    cpu_model: str = Field(default="qemu64", pattern=r"^[A-Za-z0-9_.\-]+$")
    devices: list[Device] = Field(default_factory=list)
    boot: BootSpec = Field(default_factory=BootSpec)
    workload: WorkloadSpec | None = Field(default_factory=WorkloadSpec)
    ram_trim_kib: int = Field(default=0, ge=0, le=1024, multiple_of=8,
                              description="KiB left off the guest's RAM; hostd pins 8 under TCG, where a "
                              "RAM size that is a multiple of 256 KiB loses guest writes during pre-copy "
                              "(host/qemu.py: TCG_RAM_TRIM_KIB)")  # fmt: skip
    migration: MigrationPolicies | None = Field(
        default=None,
        description="how this VM migrates (auto-converge, multifd, compression) unless a migration says otherwise",
    )

    @field_validator("devices")
    @classmethod
    def _devices_pinned_and_unique(cls, devices: list[Device]) -> list[Device]:
        ids: set[str] = set()
        slots: set[str] = set()
        macs: set[str] = set()
        for device in devices:
            if not _PCI_ADDR.match(device.pci_addr):
                raise ValueError(f"device {device.id}: pci_addr {device.pci_addr!r} is not like 0x3")
            slot = int(device.pci_addr.split(".")[0], 16)
            if slot < 1 or slot > 0x1D:
                raise ValueError(
                    f"device {device.id}: PCI slot {slot:#x} is outside 0x1..0x1d "
                    f"({RESERVED_PCI_SLOT:#x} is livemig's, 0x1f the chipset's)"
                )
            for seen, key, what in ((ids, device.id, "id"), (slots, device.pci_addr, "pci_addr")):
                if key in seen:
                    raise ValueError(f"two devices share {what} {key!r}")
                seen.add(key)
            if isinstance(device, NicDevice):
                if device.mac in macs:
                    raise ValueError(f"two NICs share MAC {device.mac}")
                macs.add(device.mac)
        return devices

    @model_validator(mode="after")
    def _working_set_fits(self) -> VmSpec:
        volumes = [d.volume for d in self.devices if isinstance(d, VolumeDevice)]
        if len(volumes) != len(set(volumes)):
            raise ValueError("a volume can be attached to a VM only once")
        if self.workload is not None and self.workload.wss_mib > self.memory_mib - 64:
            raise ValueError(
                f"workload working set {self.workload.wss_mib} MiB does not fit in "
                f"{self.memory_mib} MiB of guest memory (keep 64 MiB for the kernel)"
            )
        return self
