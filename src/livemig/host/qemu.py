"""The QEMU command line, built deterministically from a VmSpec.

Why deterministic: the destination of a migration must be started with exactly the source's
device layout; building both from the same spec by the same pure function makes that true by
construction (and unit-testable without QEMU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from livemig.errors import BootstrapError, InvalidRequest
from livemig.host.firmware import FirmwareBuild
from livemig.model.vm import (
    CIDATA_SLOT,
    NVRAM_BYTES,
    NVRAM_SLOT,
    RESERVED_PCI_SLOT,
    NbdExport,
    NicDevice,
    RngDevice,
    VmSpec,
    VolumeDevice,
)

QEMU_BINARY = "qemu-system-x86_64"
#: how long QEMU's NBD client holds a volume's requests while it reconnects to blockd (seconds)
NBD_RECONNECT_DELAY_S = 60

#: Where QEMU writes its migration trace (``LIVEMIG_QEMU_TRACE_DIR``), one file per QEMU started.
TRACE_DIR_ENV = "LIVEMIG_QEMU_TRACE_DIR"
#: The trace points that split a migration's pause into its parts: the final dirty-bitmap sync,
#: the device state saved and loaded, the destination's last section and its start. Per-page
#: points are left out (they would cost more than they measure).
TRACE_EVENTS = (
    "migration_bitmap_sync_start", "migration_bitmap_sync_end", "migration_completion_vm_stop",
    "savevm_state_complete_precopy", "vmstate_save", "migrate_set_state",
    "qemu_loadvm_state_section_startfull", "vmstate_load", "qemu_loadvm_state_post_main",
    "loadvm_state_cleanup", "vm_state_notify",
)  # fmt: skip

#: the id of the NBD client's ``tls-creds-x509`` object (host/tls.py writes its directory)
NBD_CREDS_ID = "livemig-nbd-tls"


@dataclass(frozen=True)
class VmPaths:
    """Where one VM's runtime files live on a host."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def qmp_observe(self) -> Path:
        """A second QMP monitor for observers (a chaos run's invariant checker asks QEMU its
        runstate here): hostd holds the first, and a QMP socket serves one client at a time."""
        return self.root / "qmp-observe.sock"

    @property
    def console(self) -> Path:
        return self.root / "console.sock"

    @property
    def command_port(self) -> Path:
        """The virtio-serial port the guest workload reads commands from (see workload.c)."""
        return self.root / "cmd.sock"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def record(self) -> Path:
        return self.root / "vm.json"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own error messages (``-D``: a daemonized QEMU keeps stderr there, not /dev/null)."""
        return self.root / "qemu.log"

    @property
    def sockets(self) -> tuple[Path, ...]:
        """The VM's local control sockets: hostd's user alone may connect (0600)."""
        return (self.qmp, self.console, self.command_port)


def qemu_binary() -> str:
    """``$LIVEMIG_QEMU`` if set (e.g. a newer QEMU than the distribution's), else the one on PATH."""
    chosen = os.environ.get("LIVEMIG_QEMU")
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise BootstrapError(f"LIVEMIG_QEMU={chosen} is not an executable QEMU")
        return path
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise BootstrapError(f"{QEMU_BINARY} not found: install the Debian package qemu-system-x86")
    return path


@lru_cache(maxsize=1)
def qemu_version() -> str:
    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0]


@lru_cache(maxsize=1)
def machine_aliases() -> dict[str, str]:
    """Map every machine type QEMU knows to its concrete versioned type (aliases resolved)."""
    out = subprocess.run([qemu_binary(), "-machine", "help"], capture_output=True, text=True, check=True).stdout
    table: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if not parts:
            continue
        alias = re.search(r"\(alias of ([^)]+)\)", line)
        table[parts[0]] = alias.group(1) if alias else parts[0]
    return table


def resolve_machine(machine: str, table: dict[str, str] | None = None) -> str:
    """``q35`` → ``pc-q35-7.2``; unknown types are rejected before QEMU ever starts."""
    known = machine_aliases() if table is None else table
    if machine not in known:
        raise InvalidRequest(f"machine type {machine!r} is not supported by this host's QEMU")
    return known[machine]


#: Why guests under TCG get 8 KiB less RAM than asked for. QEMU up to 8.2 (Debian 12 ships 7.2)
#: syncs the migration dirty bitmap of a RAM block whose size is a multiple of 64 pages (256 KiB)
#: through a word-at-a-time fast path that clears the dirty bits but not the TCG TLB's
#: "not dirty" marks (include/exec/ram_addr.h: cpu_physical_memory_sync_dirty_bitmap). A page
#: the vCPU has cached as writable is then written again without being marked dirty, and the
#: destination gets a stale copy: guest hangs, a wedged UART, "virtio_net ... id N is not a
#: head!". Fixed upstream in QEMU 9.0 (commit 03bfc2188f, "physmem: Fix migration dirty bitmap
#: coherency with TCG memory access"). A RAM size off the 256 KiB grid takes the per-page path,
#: which resets the TLB marks. KVM tracks dirty pages in the kernel and is not affected, nor is
#: QEMU 9.0 or later. The trim is pinned in the resolved spec, so both ends of a migration use
#: the same size.
TCG_RAM_TRIM_KIB = 8
TCG_DIRTY_SYNC_FIXED_IN = (9, 0)


def needs_tcg_ram_trim(accel: str, version: str) -> bool:
    """True where guest RAM must leave QEMU's 256 KiB grid: TCG on a QEMU before the fix."""
    if accel != "tcg":
        return False
    numbers = re.match(r"(\d+)\.(\d+)", version)
    if numbers is None:
        return True  # an unreadable version: assume the bug
    return (int(numbers.group(1)), int(numbers.group(2))) < TCG_DIRTY_SYNC_FIXED_IN


def _nbd_blockdev(node: str, export: NbdExport, **extra: object) -> str:
    """One ``-blockdev`` of QEMU's NBD client for this host's attachment of a volume.

    reconnect-delay: a blockd that restarts (or drops the connection) costs the guest a stall of
    its I/O, not an I/O error: QEMU reconnects and reruns what was in flight. An export blockd
    serves over TLS names the certificate QEMU must see (``tls_hostname``)."""
    blockdev: dict[str, object] = {"driver": "nbd", "node-name": node, "export": export.export,
                                   "server": {"type": "inet", "host": export.host, "port": str(export.port)},
                                   "reconnect-delay": NBD_RECONNECT_DELAY_S, **extra}  # fmt: skip
    if export.tls_hostname:
        blockdev |= {"tls-creds": NBD_CREDS_ID, "tls-hostname": export.tls_hostname}
    return json.dumps(blockdev, separators=(",", ":"))


def _json(value: dict[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _boot_args(spec: VmSpec, firmware: FirmwareBuild | None, exports: dict[str, NbdExport]) -> tuple[str, list[str]]:
    """The machine options and arguments that make the VM start: its kernel (direct boot), or its
    firmware (SeaBIOS ROM, or OVMF's CODE and variable store as the two flash devices)."""
    if spec.firmware is None:
        if spec.boot.kernel is None or spec.boot.initrd is None:
            raise InvalidRequest(f"VM {spec.name}: boot kernel/initrd not resolved")
        return "", ["-kernel", spec.boot.kernel, "-initrd", spec.boot.initrd, "-append", spec.boot.append]
    if firmware is None or firmware.name != spec.firmware.build:
        raise InvalidRequest(f"VM {spec.name}: firmware {spec.firmware.build or spec.firmware.kind} not resolved")
    if not firmware.uefi:
        return "", ["-bios", str(firmware.code)]
    nvram = exports.get(NVRAM_SLOT)
    if nvram is None:
        raise InvalidRequest(f"VM {spec.name}: no NBD export given for its UEFI variable store")
    machine = ",pflash0=fw_code,pflash1=fw_vars"
    args = [
        "-blockdev", _json({"driver": "file", "node-name": "fw_code_file", "filename": str(firmware.code),
                            "read-only": True}),
        "-blockdev", _json({"driver": "raw", "node-name": "fw_code", "file": "fw_code_file", "read-only": True}),
        # the store's flash is as large as its backend: a raw node of exactly the 4M build's size
        "-blockdev", _nbd_blockdev("fw_vars_nbd", nvram),
        "-blockdev", _json({"driver": "raw", "node-name": "fw_vars", "file": "fw_vars_nbd", "size": NVRAM_BYTES}),
    ]  # fmt: skip
    if spec.firmware.secure_boot:
        machine += ",smm=on"
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return machine, args


def command_line(
    spec: VmSpec,
    paths: VmPaths,
    accel: str,
    *,
    incoming: bool = False,
    binary: str = QEMU_BINARY,
    exports: dict[str, NbdExport] | None = None,
    netdevs: dict[str, str] | None = None,
    nbd_tls: Path | None = None,
    firmware: FirmwareBuild | None = None,
) -> list[str]:
    """The full argv for ``spec``; ``incoming`` adds ``-incoming defer`` for a migration target.

    ``exports`` maps each volume slot (``VmSpec.volume_slots``) to this host's NBD export; only
    that differs between the source's and the destination's command line. ``nbd_tls``: the host's
    QEMU certificate directory, for exports blockd serves over TLS (their ``tls_hostname`` is set).
    ``firmware``: the host's file for the build the spec pins (a VM booted by firmware).
    """
    exports = exports or {}
    netdevs = netdevs or {}
    machine_options, boot = _boot_args(spec, firmware, exports)
    bus = "pcie.0" if "q35" in spec.machine else "pci.0"
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", f"{spec.machine},accel={accel}{machine_options}",
        "-cpu", spec.cpu_model,
        "-m", f"{spec.memory_mib * 1024 - spec.ram_trim_kib}K",
        "-smp", str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        *boot,
        "-chardev",
        f"socket,id=serial0,path={paths.console},server=on,wait=off,logfile={paths.console_log},logappend=on",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.qmp_observe},server=on,wait=off",
        # livemig's command channel into the guest, at a slot reserved for it (RESERVED_PCI_SLOT)
        "-device", f"virtio-serial-pci,id=lmser,bus={bus},addr={RESERVED_PCI_SLOT:#x}",
        "-chardev", f"socket,id=lmcmd,path={paths.command_port},server=on,wait=off",
        "-device", "virtserialport,bus=lmser.0,chardev=lmcmd,name=livemig.cmd",
        "-pidfile", str(paths.pidfile),
        "-D", str(paths.qemu_log),
        "-daemonize",
    ]  # fmt: skip
    if any(e.tls_hostname for e in exports.values()):
        if nbd_tls is None:
            raise InvalidRequest(f"VM {spec.name}: blockd requires TLS but this host has no QEMU certificate")
        argv += ["-object", f"tls-creds-x509,id={NBD_CREDS_ID},dir={nbd_tls},endpoint=client,verify-peer=on"]
    for device in spec.devices:
        if isinstance(device, NicDevice):
            if device.backend in ("vswitch", "segment"):
                if device.id not in netdevs:
                    raise InvalidRequest(f"VM {spec.name}: NIC {device.id} has no {device.backend} port")
                argv += ["-netdev", netdevs[device.id]]
            elif device.backend == "user":
                argv += ["-netdev", f"user,id=net_{device.id},restrict=on"]
            else:
                argv += ["-netdev", f"hubport,id=net_{device.id},hubid=0"]
            argv += [
                "-device",
                f"virtio-net-pci,id={device.id},netdev=net_{device.id},mac={device.mac},"
                f"bus={bus},addr={device.pci_addr}",
            ]
        elif isinstance(device, RngDevice):
            argv += [
                "-object", f"rng-random,id=rng_{device.id},filename=/dev/urandom",
                "-device", f"virtio-rng-pci,id={device.id},rng=rng_{device.id},bus={bus},addr={device.pci_addr}",
            ]  # fmt: skip
        elif isinstance(device, VolumeDevice):
            export = exports.get(device.id)
            if export is None:
                raise InvalidRequest(f"VM {spec.name}: no NBD export given for volume device {device.id}")
            boot_index = "" if device.boot_index is None else f",bootindex={device.boot_index}"
            argv += [
                "-blockdev", _nbd_blockdev(f"vol_{device.id}", export),
                "-device", f"virtio-blk-pci,id={device.id},drive=vol_{device.id},bus={bus},addr={device.pci_addr}"
                           f"{boot_index}",
            ]  # fmt: skip
    if spec.cloud_init is not None:
        seed = exports.get(CIDATA_SLOT)
        if seed is None:
            raise InvalidRequest(f"VM {spec.name}: no NBD export given for its cloud-init seed")
        # read-only: the guest reads its seed; only hostd writes it, once, when the VM is created
        argv += [
            "-blockdev", _nbd_blockdev("lm-cidata", seed, **{"read-only": True}),
            "-device", f"virtio-blk-pci,id=lm-cidata,drive=lm-cidata,bus={bus},addr={spec.cloud_init.pci_addr}",
        ]  # fmt: skip
    argv += trace_arguments(spec, incoming)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def trace_arguments(spec: VmSpec, incoming: bool, environ: dict[str, str] | None = None) -> list[str]:
    """QEMU's own trace of a migration's pause, when ``$LIVEMIG_QEMU_TRACE_DIR`` names a directory.

    Why an environment switch and not a spec field: tracing is a measurement (bench/pause.py reads
    the files), not part of a VM; a migration's two QEMUs must keep the same device layout, and
    trace options are no part of it. Timestamps (``-msg timestamp=on``) are wall clock, so both
    sides' lines and QMP events share one time line.
    """
    directory = (os.environ if environ is None else environ).get(TRACE_DIR_ENV)
    if not directory:
        return []
    log = Path(directory) / f"{spec.name}-{'in' if incoming else 'out'}-{time.time_ns()}.log"
    argv = ["-msg", "timestamp=on", "-D", str(log)]
    for event in TRACE_EVENTS:
        argv += ["-trace", f"enable={event}"]
    return argv
