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

from livemig.errors import InvalidRequest
from livemig.guest.cidata import validate_hostname, validate_instance_id, validate_ssh_public_key
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


def _check_pci_addr(what: str, pci_addr: str) -> None:
    if not _PCI_ADDR.match(pci_addr):
        raise ValueError(f"device {what}: pci_addr {pci_addr!r} is not like 0x3")
    slot = int(pci_addr.split(".")[0], 16)
    if slot < 1 or slot > 0x1D:
        raise ValueError(
            f"device {what}: PCI slot {slot:#x} is outside 0x1..0x1d "
            f"({RESERVED_PCI_SLOT:#x} is livemig's, 0x1f the chipset's)"
        )


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
    ``boot_index`` makes it a boot disk for the firmware (QEMU's ``bootindex``; lowest first).
    """

    kind: Literal["volume"] = "volume"
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    pci_addr: str
    volume: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    boot_index: int | None = Field(default=None, ge=0, le=99, description="firmware boot order (0 first)")


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


#: The spec's keys for the volumes that are not PCI devices of their own kind, in the maps of
#: NBD exports hostd receives (``VmSpec.volume_slots``). A device id never starts with '@'.
NVRAM_SLOT = "@nvram"
CIDATA_SLOT = "@cidata"
#: The size of an OVMF variable store for the 4 MiB CODE builds (``OVMF_VARS_4M.fd``). The flash
#: QEMU shows the guest is as large as its backend, so the NVRAM volume has exactly this size.
NVRAM_BYTES = 540_672
#: A NoCloud seed disk (``guest.cidata``: a 1 MiB FAT file system).
CIDATA_BYTES = 1 << 20
#: Where the NoCloud seed disk sits unless the spec says otherwise (the last slot users may use).
CIDATA_PCI_ADDR = "0x1d"
#: Which firmware build hostd uses for what the spec asks (hosts report their builds by these names).
FIRMWARE_BUILDS: dict[tuple[str, bool], str] = {
    ("bios", False): "seabios",
    ("uefi", False): "ovmf-4m",
    ("uefi", True): "ovmf-4m-secboot",
}
FIRMWARE_PACKAGES = {"seabios": "seabios", "ovmf-4m": "ovmf", "ovmf-4m-secboot": "ovmf"}


class FirmwareSpec(_Strict):
    """Boot through firmware from a boot volume, the way users' own VMs boot.

    ``bios`` is SeaBIOS; ``uefi`` is OVMF (the 4 MiB build), whose variable store (boot entries,
    Secure Boot keys) lives on its own small volume, ``nvram_volume``, so it moves with the VM and
    is fenced like any disk. hostd pins ``build`` and ``sha256`` (of the CODE file, or of the BIOS
    ROM) when it creates the VM: QEMU migrates the flash contents as RAM, so a destination with
    another build of the same firmware would run mismatched code, and the pre-flight check refuses
    such a destination. ``secure_boot``: OVMF's SMM build with enrolled Microsoft keys.
    """

    kind: Literal["bios", "uefi"]
    secure_boot: bool = False
    build: str | None = Field(default=None, description="pinned by hostd: the firmware build's name")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="pinned by hostd: checksum of the firmware CODE/ROM file")  # fmt: skip
    nvram_volume: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
                                     description="uefi: the variable store's volume (the LMO creates it)")  # fmt: skip

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> FirmwareSpec:
        if self.kind == "bios" and (self.secure_boot or self.nvram_volume):
            raise ValueError("secure_boot and nvram_volume are UEFI options; a BIOS VM has no variable store")
        return self

    @property
    def wanted_build(self) -> str:
        return FIRMWARE_BUILDS[(self.kind, self.secure_boot)]

    def mismatch(self, offered: dict[str, str], host: str) -> str | None:
        """Why ``host``, offering ``offered`` (build -> sha256, its ``HostInfo.firmware``), cannot
        run this VM's firmware; None if it can. The rule behind the pre-flight check."""
        if self.build is None or self.sha256 is None:
            return "the VM's firmware build is not pinned yet"
        there = offered.get(self.build)
        if there is None:
            return (f"host {host} has no {self.build} firmware "
                    f"(Debian package {FIRMWARE_PACKAGES.get(self.build, '?')})")  # fmt: skip
        if there != self.sha256:
            return (f"host {host} has another {self.build} build (sha256 {there[:16]}…) than the VM runs "
                    f"(sha256 {self.sha256[:16]}…): QEMU migrates the firmware as RAM, so the VM would run "
                    "mismatched code")  # fmt: skip
        return None


class CloudInitSpec(_Strict):
    """cloud-init's NoCloud seed: host name, SSH keys, DHCP on every NIC.

    It lives on a small volume of its own (``volume``; the LMO creates it, hostd writes it when the
    VM is created) attached read-only at ``pci_addr``: it moves and is fenced like any volume, so
    the guest finds the same configuration after a reboot on whichever host it runs, with no
    metadata service that every host must reach.
    """

    hostname: str = Field(min_length=1, max_length=253)
    ssh_authorized_keys: list[str] = Field(min_length=1, max_length=32)
    instance_id: str | None = Field(default=None, description="default: iid-<VM name> (stable across moves)")
    pci_addr: str = CIDATA_PCI_ADDR
    volume: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
                               description="the seed's volume (the LMO creates it)")  # fmt: skip

    @model_validator(mode="after")
    def _valid_for_cloud_init(self) -> CloudInitSpec:
        try:
            validate_hostname(self.hostname)
            if self.instance_id is not None:
                validate_instance_id(self.instance_id)
            self.ssh_authorized_keys = [validate_ssh_public_key(k) for k in self.ssh_authorized_keys]
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return self


class VmSpec(_Strict):
    """What a user asks for; hostd fills ``machine`` (resolved) and ``boot`` paths on create."""

    name: str = Field(pattern=NAME_PATTERN, description="unique in the region")
    memory_mib: int = Field(ge=16, le=1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=64)
    machine: str = Field(default="q35", pattern=r"^[a-z0-9.\-]+$")
    cpu_model: str = Field(default="qemu64", pattern=r"^[A-Za-z0-9_.\-]+$")
    devices: list[Device] = Field(default_factory=list)
    boot: BootSpec = Field(default_factory=BootSpec)
    firmware: FirmwareSpec | None = Field(default=None, description="bios | uefi: boot from a boot volume; "
                                          "none: direct kernel boot of the livemig guest")  # fmt: skip
    cloud_init: CloudInitSpec | None = None
    workload: WorkloadSpec | None = Field(default_factory=WorkloadSpec)
    ram_trim_kib: int = Field(default=0, ge=0, le=1024, multiple_of=8,
                              description="KiB left off the guest's RAM; hostd pins 8 under TCG, where a "
                              "RAM size that is a multiple of 256 KiB loses guest writes during pre-copy "
                              "(host/qemu.py: TCG_RAM_TRIM_KIB)")  # fmt: skip
    migration: MigrationPolicies | None = Field(
        default=None,
        description="how this VM migrates (auto-converge, multifd, compression) unless a migration says otherwise",
    )

    @field_validator("firmware", mode="before")
    @classmethod
    def _firmware_shorthand(cls, value: object) -> object:
        """``"firmware": "uefi"`` is short for ``{"kind": "uefi"}``."""
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _devices_pinned_and_unique(cls, devices: list[Device]) -> list[Device]:
        ids: set[str] = set()
        slots: set[str] = set()
        macs: set[str] = set()
        boot_indexes: set[int] = set()
        for device in devices:
            _check_pci_addr(device.id, device.pci_addr)
            for seen, key, what in ((ids, device.id, "id"), (slots, device.pci_addr, "pci_addr")):
                if key in seen:
                    raise ValueError(f"two devices share {what} {key!r}")
                seen.add(key)
            if isinstance(device, NicDevice):
                if device.mac in macs:
                    raise ValueError(f"two NICs share MAC {device.mac}")
                macs.add(device.mac)
            if isinstance(device, VolumeDevice) and device.boot_index is not None:
                if device.boot_index in boot_indexes:
                    raise ValueError(f"two volumes share boot_index {device.boot_index}")
                boot_indexes.add(device.boot_index)
        return devices

    @model_validator(mode="before")
    @classmethod
    def _no_workload_under_firmware(cls, data: object) -> object:
        """A VM booted by firmware runs its own system, not the livemig workload: leaving
        ``workload`` out means none (its default is for the livemig guest)."""
        if isinstance(data, dict) and data.get("firmware") is not None and "workload" not in data:
            return {**data, "workload": None}
        return data

    @model_validator(mode="after")
    def _boot_is_consistent(self) -> VmSpec:
        boot_disks = [d for d in self.devices if isinstance(d, VolumeDevice) and d.boot_index is not None]
        if self.firmware is None:
            if boot_disks:
                raise ValueError(f"volume {boot_disks[0].id} has a boot_index but the VM boots its kernel "
                                 "directly: set firmware to bios or uefi")  # fmt: skip
            if self.cloud_init is not None:
                raise ValueError("cloud_init configures a distribution booted by firmware: set firmware too")
            return self
        if not boot_disks:
            raise ValueError(f"VM {self.name} boots through {self.firmware.kind} firmware but no volume "
                             "device has a boot_index (the boot volume)")  # fmt: skip
        if self.boot != BootSpec():
            raise ValueError("a VM booted by firmware takes no kernel, initrd or append (boot)")
        if self.workload is not None:
            raise ValueError("the livemig workload runs only in the livemig guest (direct kernel boot); "
                             "leave workload out for a VM booted by firmware")  # fmt: skip
        if self.firmware.secure_boot and "q35" not in self.machine:
            raise ValueError(f"Secure Boot needs a q35 machine (SMM), not {self.machine}")
        if self.cloud_init is not None:
            _check_pci_addr("cloud_init", self.cloud_init.pci_addr)
            if self.cloud_init.pci_addr in {d.pci_addr for d in self.devices}:
                raise ValueError(f"cloud_init's seed disk and a device share pci_addr {self.cloud_init.pci_addr!r}")
        return self

    def volume_slots(self) -> dict[str, str]:
        """Every volume this VM attaches, by the key its NBD export travels under: each volume
        device's id, plus ``@nvram`` (a UEFI VM's variable store) and ``@cidata`` (the seed)."""
        slots = {d.id: d.volume for d in self.devices if isinstance(d, VolumeDevice)}
        if self.firmware is not None and self.firmware.nvram_volume:
            slots[NVRAM_SLOT] = self.firmware.nvram_volume
        if self.cloud_init is not None and self.cloud_init.volume:
            slots[CIDATA_SLOT] = self.cloud_init.volume
        return slots

    @model_validator(mode="after")
    def _working_set_fits(self) -> VmSpec:
        volumes = list(self.volume_slots().values())
        if len(volumes) != len(set(volumes)):
            raise ValueError("a volume can be attached to a VM only once")
        if self.workload is not None and self.workload.wss_mib > self.memory_mib - 64:
            raise ValueError(
                f"workload working set {self.workload.wss_mib} MiB does not fit in "
                f"{self.memory_mib} MiB of guest memory (keep 64 MiB for the kernel)"
            )
        return self
