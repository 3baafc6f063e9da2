"""HostAgent: the state and actions of one hostd (VM lifecycle, incoming VMs, migrations).

QEMU is started with ``-daemonize`` so it is never hostd's child: killing hostd (even SIGKILL)
never kills a VM. Each VM has a directory holding its spec record, pidfile, QMP and console
sockets and console log; a restarted hostd re-adopts every VM whose process is still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livemig.errors import CapacityError, Conflict, GuestError, InvalidRequest, LivemigError, NotFound, QemuError
from livemig.faults.registry import REGISTRY
from livemig.guest.image import kernel_cmdline
from livemig.host.accel import AccelChoice
from livemig.host.metrics import HostCounters
from livemig.host.qemu import TCG_RAM_TRIM_KIB, VmPaths, command_line, needs_tcg_ram_trim, resolve_machine
from livemig.host.qmp import event_time
from livemig.host.qmpfaults import FaultedQmp
from livemig.host.runtime import LocalQemu, QemuRuntime, Qmp
from livemig.host.seeds import fill_new_vm_volumes
from livemig.host.segment import close_all as close_segment_sockets
from livemig.host.segment import netdev as segment_netdev
from livemig.host.segment import open_segment_sockets
from livemig.host.shaping import MigrationShaper
from livemig.host.source import SourceMigration, policy_capabilities, policy_parameters
from livemig.host.tls import QemuTls
from livemig.host.vnics import VswitchPorts
from livemig.model.host import HostInfo
from livemig.model.migration import MigrationParams, MigrationPolicies
from livemig.model.vm import RESUMABLE, NbdExport, RunState, VmRole, VmSpec, VolumeDevice
from livemig.region.hostns import MIGRATION_DEVICE
from livemig.security import qemu_tls
from livemig.security.pki import host_leaf_name
from livemig.statefile import StateFile
from livemig.wire.hostd import DirtyRateReply, JobState, SourceMigrationStatus, VmStatus, VnicHandoff

log = logging.getLogger(__name__)


#: QMP events that mean the guest did not survive: a reset or shutdown it asked for, or a panic
GUEST_FAILURE_EVENTS = ("RESET", "SHUTDOWN", "GUEST_PANICKED")


#: pages per GiB QEMU's calc-dirty-rate samples (its maximum)
DIRTY_RATE_SAMPLE_PAGES = 16384

#: the format of ``vm.json`` this hostd writes and the newest it reads
VM_RECORD_VERSION = 1


class VmRecord(BaseModel):
    """What survives a hostd restart about one VM (``vm.json``, through ``StateFile``): enough to
    re-adopt its QEMU and to keep what only hostd saw (a guest reset, when an incoming VM resumed)."""

    spec: VmSpec
    pid: int
    role: VmRole
    argv: list[str] = Field(default_factory=list)
    incoming_uri: str | None = None
    resumed_at: float | None = None
    guest_resets: list[str] = Field(default_factory=list)
    exports: dict[str, NbdExport] = Field(default_factory=dict)
    policies: MigrationPolicies | None = None  # an incoming VM's: what its QEMU was told to expect
    #: the side of a migration this VM last took part in here (fault points are named by it)
    side: Literal["src", "dst"] = "src"


class ManagedVm(VmRecord):
    """A VM this hostd runs: its record (saved on every change) plus what lives only in memory."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    paths: VmPaths = Field(exclude=True)
    qmp: Qmp = Field(exclude=True)
    migration: SourceMigration | None = Field(default=None, exclude=True)
    migration_encryption: str | None = Field(default=None, exclude=True)  # what protects its outgoing stream
    incoming_tls: str | None = Field(default=None, exclude=True)  # the identity tls-authz admits
    guest_watch: asyncio.Task[None] | None = Field(default=None, exclude=True)

    def save(self) -> None:
        StateFile(self.paths.record, VM_RECORD_VERSION).save(self.model_dump(mode="json"))


def restrict_sockets(paths: VmPaths) -> None:
    """QMP, console and command sockets: 0600, hostd's user's (QEMU runs as that user and made
    them under umask 077; this also holds when QEMU's umask was wider)."""
    for sock in paths.sockets:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(sock, 0o600)


def qemu_errors(paths: VmPaths, lines: int = 5) -> list[str]:
    """The last lines QEMU wrote to its log (``-D``): why a destination refused a stream, say."""
    try:
        with paths.qemu_log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-lines:]


def load_record(paths: VmPaths) -> VmRecord:
    """A VM's record; ``StateError``/``InvalidRequest`` say why it cannot be trusted (never half-read)."""
    saved = StateFile(paths.record, VM_RECORD_VERSION).load()
    if saved is None:
        raise LivemigError(f"{paths.record} is missing")
    saved.pop("version", None)
    if "pid" not in saved:  # records of format 1 written before the pid moved into them
        saved["pid"] = int(paths.pidfile.read_text().strip())
    try:
        return VmRecord.model_validate(saved)
    except ValidationError as exc:
        raise InvalidRequest(f"{paths.record}: {exc.errors()[0].get('msg')} at "
                             f"{'.'.join(str(p) for p in exc.errors()[0].get('loc', ()))}") from None  # fmt: skip


class HostAgent:
    def __init__(
        self,
        name: str,
        state_dir: Path,
        migration_address: str,
        accel: AccelChoice,
        memory_mib: int,
        migration_bandwidth_mib_s: int = 1024,
        vswitch_url: str | None = None,
        overlay: str | None = None,
        netns: str | None = None,
        runtime: QemuRuntime | None = None,
        qemu_tls: QemuTls | None = None,
    ) -> None:
        self.name = name
        self.runtime: QemuRuntime = runtime or LocalQemu()
        self.state_dir = state_dir
        self.vms_dir = state_dir / "vms"
        self.logs_dir = state_dir / "logs"
        self.migration_address = migration_address
        self.accel = accel
        self.memory_mib = memory_mib
        self.migration_bandwidth_mib_s = migration_bandwidth_mib_s
        self.ports = VswitchPorts(vswitch_url)
        self.overlay = overlay
        # a namespace host (hostns.py): QEMUs run in its netns, outgoing migrations get a tc class
        self.netns = netns
        self.shaper = MigrationShaper(netns, MIGRATION_DEVICE, migration_bandwidth_mib_s) if netns else None
        # the host's QEMU certificate: migration streams and NBD over TLS (None: an --insecure host)
        self.qemu_tls = qemu_tls
        self.vms: dict[str, ManagedVm] = {}
        self.refused_records: dict[str, str] = {}  # VM directory -> why its record was not trusted
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # set whenever the VMs this host runs change, so hostd re-reports its capacity to the LMO
        self.changed = asyncio.Event()
        self.counters = HostCounters()  # what /metrics reports besides what it reads (host/metrics.py)

    # ---------------------------------------------------------------- observation

    @property
    def memory_used_mib(self) -> int:
        """What this host's VMs hold: what its capacity reports and placement count."""
        return sum(vm.spec.memory_mib for vm in self.vms.values())

    def machines(self) -> list[str]:
        """The machine types this host's QEMU runs, each once under its versioned name."""
        return sorted(set(self.runtime.machines().values()))

    def info(self) -> HostInfo:
        return HostInfo(
            name=self.name,
            migration_address=self.migration_address,
            accel=self.accel.name,
            accel_reason=self.accel.reason,
            qemu_version=self.runtime.version(),
            memory_mib=self.memory_mib,
            memory_used_mib=self.memory_used_mib,
            migration_bandwidth_mib_s=self.migration_bandwidth_mib_s,
            vms=sorted(self.vms),
            machines=self.machines(),
            firmware=self.runtime.firmware().report(),
            refused_records=[f"{vm}: {why}" for vm, why in sorted(self.refused_records.items())],
        )

    def get(self, name: str) -> ManagedVm:
        vm = self.vms.get(name)
        if vm is None:
            raise NotFound(f"VM {name!r} is not on host {self.name}", vm=name, host=self.name)
        return vm

    async def status(self, name: str) -> VmStatus:
        vm = self.get(name)
        state = RunState.ABSENT
        if self.runtime.owns(vm.pid, vm.paths):
            try:
                state = RunState.parse(str((await vm.qmp.execute("query-status"))["status"]))
            except QemuError:
                state = RunState.UNREACHABLE
        if vm.role is VmRole.INCOMING and state is RunState.RUNNING:
            vm.role = VmRole.RUNNING
            vm.save()
        return VmStatus(name=name, host=self.name, state=state, pid=vm.pid, role=vm.role, spec=vm.spec,
                        console_log=str(vm.paths.console_log), resumed_at=vm.resumed_at,
                        guest_resets=list(vm.guest_resets), qemu_errors=qemu_errors(vm.paths))  # fmt: skip

    # ---------------------------------------------------------------- lifecycle

    def resolve_spec(self, spec: VmSpec) -> VmSpec:
        """Pin what the user left open: the versioned machine type and the boot files, or the
        firmware build (its name and the checksum of its code) of a VM booted by firmware."""
        machine = resolve_machine(spec.machine, self.runtime.machines())
        trim = spec.ram_trim_kib
        if trim == 0 and needs_tcg_ram_trim(self.accel.name, self.runtime.version()):
            trim = TCG_RAM_TRIM_KIB
        if spec.firmware is not None:
            build = self.runtime.firmware().for_new_vm(spec.firmware)
            firmware = spec.firmware.model_copy(update={"build": build.name, "sha256": build.sha256})
            return spec.model_copy(update={"machine": machine, "firmware": firmware, "ram_trim_kib": trim})
        boot = spec.boot
        if boot.kernel is None or boot.initrd is None:
            image = self.runtime.guest_image()
            extra = ""
            if spec.workload is not None:
                disk = spec.workload.disk_rate > 0 and any(isinstance(d, VolumeDevice) for d in spec.devices)
                # the first virtio-blk device (lowest PCI slot) is /dev/vda in the guest
                extra = kernel_cmdline(spec.workload.wss_mib, spec.workload.rate_mib_s,
                                             disk="/dev/vda" if disk else None,
                                             disk_rate=spec.workload.disk_rate if disk else None)  # fmt: skip
            else:
                extra = kernel_cmdline(1, 0) + " livemig.workload=off"
            boot = boot.model_copy(update={"kernel": str(image.kernel), "initrd": str(image.initrd),
                                           "append": " ".join(p for p in (extra, boot.append) if p)})  # fmt: skip
        for path in (boot.kernel, boot.initrd):
            if path is None or not Path(path).is_file():
                raise InvalidRequest(f"VM {spec.name}: boot file {path} does not exist on host {self.name}")
        return spec.model_copy(update={"machine": machine, "boot": boot, "ram_trim_kib": trim})

    def _check_capacity(self, spec: VmSpec) -> None:
        free = self.memory_mib - self.memory_used_mib
        if spec.memory_mib > free:
            raise CapacityError(
                f"host {self.name} has {free} MiB free, VM {spec.name} needs {spec.memory_mib} MiB",
                host=self.name, free_mib=free, needed_mib=spec.memory_mib,
            )  # fmt: skip

    async def create(
        self, spec: VmSpec, *, incoming: bool = False, exports: dict[str, NbdExport] | None = None
    ) -> ManagedVm:
        async with self._lock:
            if spec.name in self.vms:
                raise Conflict(f"VM {spec.name!r} already exists on host {self.name}", vm=spec.name)
            self._check_capacity(spec)
            spec = self.resolve_spec(spec) if not incoming else spec
            firmware = self.runtime.firmware().pinned(spec.firmware, self.name) if spec.firmware else None
            paths = VmPaths(self.vms_dir / spec.name)
            if paths.root.exists():
                shutil.rmtree(paths.root)
            paths.root.mkdir(parents=True, mode=0o700)  # its sockets and logs are hostd's user's alone
            nbd_tls = self._nbd_tls(spec, exports)
            side = "dst" if incoming else "src"
            if REGISTRY.armed:
                await REGISTRY.fire(f"hostd.{side}.launch", vm=spec.name, host=self.name, error=QemuError)
            if not incoming:  # a destination gets its volumes' contents from the source, never from here
                try:
                    filled = await fill_new_vm_volumes(self.runtime, spec, exports or {}, firmware, paths.root,
                                                       nbd_tls)  # fmt: skip
                    for done in filled:
                        log.info("VM %s: %s", spec.name, done)
                except LivemigError:
                    shutil.rmtree(paths.root, ignore_errors=True)
                    raise
            netdevs = await self.ports.attach(spec, hold=incoming)
            segments = open_segment_sockets(spec)
            netdevs.update({nic_id: segment_netdev(nic_id, sock) for nic_id, sock in segments.items()})
            argv = command_line(spec, paths, self.accel.name, incoming=incoming, binary=self.runtime.binary(),
                                exports=exports, netdevs=netdevs, nbd_tls=nbd_tls, firmware=firmware)  # fmt: skip
            if self.netns:  # the NIC socket is a passed fd, so it stays in hostd's namespace
                argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
            try:
                fds = [*self.ports.pass_fds(spec), *(sock.fileno() for sock in segments.values())]
                pid = await self.runtime.launch(argv, fds, paths)
            except QemuError as exc:
                shutil.rmtree(paths.root, ignore_errors=True)
                await self.ports.detach(spec)
                raise QemuError(f"QEMU refused to start VM {spec.name}: {exc.message}", vm=spec.name) from None
            finally:
                close_segment_sockets(segments)  # QEMU holds its own copies
            restrict_sockets(paths)
            vm = ManagedVm(spec=spec, paths=paths, pid=pid, role=VmRole.INCOMING if incoming else VmRole.RUNNING,
                           qmp=self._qmp(spec.name), argv=argv, exports=dict(exports or {}),
                           side=side)  # fmt: skip
            try:
                await vm.qmp.connect(paths.qmp)
            except QemuError:
                await self._kill(vm)
                shutil.rmtree(paths.root, ignore_errors=True)
                raise
            self._watch_guest(vm)
            vm.save()
            self.vms[spec.name] = vm
            self.changed.set()
            log.info("started VM %s (pid %d, %s)", spec.name, pid, vm.role)
            return vm

    def _nbd_tls(self, spec: VmSpec, exports: dict[str, NbdExport] | None) -> Path | None:
        """The QEMU certificate directory, when one of the VM's exports is served over TLS."""
        if not any(e.tls_hostname for e in (exports or {}).values()):
            return None
        if self.qemu_tls is None:
            raise InvalidRequest(f"VM {spec.name}: blockd requires TLS, but host {self.name} has no QEMU "
                                 "certificate (hostd --qemu-cert/--qemu-key)")  # fmt: skip
        return self.qemu_tls.directory()

    def _require_qemu_tls(self, what: str) -> QemuTls:
        if self.qemu_tls is None:
            raise InvalidRequest(f"{what} over TLS was asked, but host {self.name} has no QEMU certificate "
                                 "(start hostd with --qemu-cert/--qemu-key, or run the region --insecure)")  # fmt: skip
        return self.qemu_tls

    async def prepare_incoming(
        self,
        spec: VmSpec,
        exports: dict[str, NbdExport] | None = None,
        policies: MigrationPolicies | None = None,
        tls_source: str | None = None,
    ) -> str:
        """Start a suspended destination listening on this host's migration address; idempotent.

        The migration's multifd settings are set before QEMU listens: its channels and compression
        must match the source's, or the stream cannot be read. ``tls_source``: accept the stream
        only over TLS and only from that host's QEMU certificate (``tls-authz``); None: a plain
        stream (an ``--insecure`` region)."""
        policies = policies or MigrationPolicies()
        existing = self.vms.get(spec.name)
        if existing is not None:
            same = existing.role is VmRole.INCOMING and existing.spec == spec and existing.exports == (exports or {})
            if same and existing.incoming_uri and (existing.policies or MigrationPolicies()) == policies:
                return existing.incoming_uri
            if same and not existing.incoming_uri and self.runtime.owns(existing.pid, existing.paths):
                # started by a hostd that died before it finished preparing: finish it now
                return await self._listen(existing, policies, tls_source)
            raise Conflict(f"VM {spec.name!r} already exists on host {self.name} ({existing.role})")
        if spec.firmware is not None:
            self.runtime.firmware().pinned(spec.firmware, self.name)  # this host has the VM's very build
        elif spec.boot.kernel is None or spec.boot.initrd is None:
            raise InvalidRequest("an incoming VM needs the source's resolved spec (boot files pinned)")
        else:
            for path in (spec.boot.kernel, spec.boot.initrd):
                if not Path(path).is_file():
                    raise InvalidRequest(f"boot file {path} does not exist on host {self.name}")
        if tls_source is not None:
            self._require_qemu_tls("an incoming migration")
        vm = await self.create(spec, incoming=True, exports=exports)
        await asyncio.sleep(0)  # the watcher's listener is registered before the migration can start
        return await self._listen(vm, policies, tls_source)

    async def _listen(self, vm: ManagedVm, policies: MigrationPolicies, tls_source: str | None) -> str:
        """Make a suspended destination listen for the migration (if it does not yet) and record where."""
        creds = self._require_qemu_tls("an incoming migration") if tls_source is not None else None
        try:
            reply = await vm.qmp.execute("query-migrate")
            if not reply.get("socket-address"):
                capabilities = [{"capability": "events", "state": True}, *policy_capabilities(policies, source=False)]
                await vm.qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
                await vm.qmp.execute("migrate-set-parameters", policy_parameters(policies))
                vm.policies = policies
                if creds is not None and tls_source is not None:
                    authz = creds.authz(tls_source)
                    await qemu_tls.prepare_destination(vm.qmp.execute, creds.directory(), source=authz)
                    vm.incoming_tls = authz
                await vm.qmp.execute("migrate-incoming", {"uri": f"tcp:{self.migration_address}:0"})
                reply = await vm.qmp.execute("query-migrate")
            sockets = reply.get("socket-address") or []
            if not sockets:
                raise QemuError(f"incoming VM {vm.spec.name}: QEMU did not report its listening port")
            vm.incoming_uri = f"tcp:{self.migration_address}:{sockets[0]['port']}"
        except QemuError:
            await self.destroy(vm.spec.name)
            raise
        vm.save()
        return vm.incoming_uri

    def _qmp(self, name: str) -> FaultedQmp:
        """A new QMP session for VM ``name``, with the fault points of its side around every command."""
        side = lambda: self.vms[name].side if name in self.vms else "src"  # noqa: E731
        return FaultedQmp(self.runtime.qmp(f"{self.name}/{name}"), name, self.name, side)

    def _watch_guest(self, vm: ManagedVm) -> None:
        vm.guest_watch = asyncio.create_task(self._guest_events(vm), name=f"guest-{vm.spec.name}")

    async def _guest_events(self, vm: ManagedVm) -> None:
        """Record what QEMU says happens to the guest on this host.

        ``RESUME`` of an incoming VM: with the source's STOP time, the pause the guest really saw
        (QEMU's own downtime ends when the source has sent everything). A guest-initiated reset,
        shutdown or panic: the guest crashed or rebooted here. Why watch for it: the guest image
        reboots on a panic (``panic=-1``), and a freshly booted workload passes its own memory
        check, so without this a guest that crashed right after a migration looked healthy."""
        with vm.qmp.listener("RESUME", *GUEST_FAILURE_EVENTS) as listener:
            async for message in listener:
                event: dict[str, Any] = dict(message)
                name, data = str(event.get("event")), dict(event.get("data") or {})
                at = event_time(event)
                if REGISTRY.armed:
                    try:
                        await REGISTRY.fire(f"hostd.{vm.side}.event.{name}", vm=vm.spec.name, host=self.name)
                    except LivemigError as exc:  # hostd failed to handle this event: it is not recorded
                        log.warning("VM %s: event %s not handled: %s", vm.spec.name, name, exc.message)
                        continue
                if name == "RESUME":
                    # the first RESUME of a VM that came in by migration (not its role: a status
                    # poll may already have flipped that to "running" before this event is read)
                    if vm.incoming_uri is not None and vm.resumed_at is None:
                        vm.resumed_at = at
                        with contextlib.suppress(OSError):  # the VM may be on its way out
                            vm.save()
                        if vm.incoming_tls is not None:  # it arrived: its TLS objects have done their job
                            vm.incoming_tls = None
                            with contextlib.suppress(QemuError):
                                await qemu_tls.clear(vm.qmp.execute)
                    continue
                reason = str(data.get("reason", data.get("action", "")))
                if name == "SHUTDOWN" and not reason.startswith("guest"):
                    continue  # hostd's own quit
                after = f", {at - vm.resumed_at:.2f} s after resuming here" if vm.resumed_at else ""
                vm.guest_resets.append(f"{name} ({reason or 'no reason given'}){after}")
                self.counters.guest_reset(name)
                with contextlib.suppress(OSError):
                    vm.save()
                log.warning("VM %s: guest %s (%s)%s", vm.spec.name, name, reason, after)

    async def migrate(
        self,
        name: str,
        uri: str,
        params: MigrationParams,
        handoffs: list[VnicHandoff] | None = None,
        tls_hostname: str | None = None,
    ) -> SourceMigrationStatus:
        """Send the VM to the destination QEMU at ``uri``; ``tls_hostname``: over TLS, to a destination
        whose QEMU certificate names that host (None: a plain stream, an ``--insecure`` region)."""
        vm = self.get(name)
        if vm.migration is not None and vm.migration.state is JobState.RUNNING:
            if vm.migration.uri == uri:
                return vm.migration.status()  # idempotent retry of the same request
            raise Conflict(f"VM {name!r} is already migrating to {vm.migration.uri}")
        if vm.role is VmRole.INCOMING:
            raise Conflict(f"VM {name!r} on host {self.name} is an incoming VM, not a source")
        vm.side = "src"
        creds = self._require_qemu_tls("a migration") if tls_hostname is not None else None
        markers: dict[str, dict[str, int]] = {}

        async def hand_off_network() -> None:
            await self.ports.hand_off(job.handoffs, stopped_at=job.stopped_at, markers=markers)

        async def take_network_back() -> None:
            await self.ports.release_here(markers)

        if handoffs:
            await self.ports.warm_up(handoffs)
        shaped = None
        if self.shaper is not None:
            shaped = await asyncio.to_thread(self.shaper.reserve, uri, params.max_bandwidth_mib_s)
        job = SourceMigration(name, vm.qmp, uri, params,
                              switchover_hooks=[hand_off_network] if handoffs else [],
                              after_failed_switchover=take_network_back, shaped=shaped,
                              handoffs=handoffs, host=self.name,
                              on_end=self.counters.migration_ended)  # fmt: skip
        encryption = None
        try:
            if creds is not None and tls_hostname is not None:
                destination = host_leaf_name(tls_hostname)
                await qemu_tls.prepare_source(vm.qmp.execute, creds.directory(), destination_hostname=destination)
                encryption = (f"TLS: source presents {creds.identity}, destination must be {destination} "
                              f"(its certificate's name) and admit this source (tls-authz)")  # fmt: skip
            else:
                await qemu_tls.clear(vm.qmp.execute)  # a plain stream, whatever an earlier one left set
            await job.configure()
        except BaseException:
            if shaped is not None:
                await asyncio.to_thread(shaped.release)
            raise
        vm.migration = job
        vm.migration_encryption = encryption
        vm.role = VmRole.OUTGOING
        vm.save()
        job.start()
        log.info("VM %s: migrating to %s (%s, at most %d MiB/s, downtime limit %d ms)", name, uri,
                 "TLS" if encryption else "plain stream", params.max_bandwidth_mib_s,
                 params.downtime_limit_ms)  # fmt: skip
        if creds is not None:
            task = asyncio.create_task(self._clear_after(vm, job), name=f"tls-clear-{name}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return self._job_status(vm, job.status())

    @staticmethod
    def _job_status(vm: ManagedVm, status: SourceMigrationStatus) -> SourceMigrationStatus:
        status.encryption = vm.migration_encryption
        return status

    @staticmethod
    async def _clear_after(vm: ManagedVm, job: SourceMigration) -> None:
        """The migration ended: the source keeps no TLS objects (a failed one leaves a running VM)."""
        if job.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(job.task)
        if job.state is not JobState.COMPLETED:  # a completed source is about to be stopped
            with contextlib.suppress(QemuError):
                await qemu_tls.clear(vm.qmp.execute)

    def advance_flow_versions(self, name: str, versions: dict[str, int]) -> None:
        """Raise the flow versions the destination holds (never lower: a late update is harmless,
        the pause then sends a few flows twice, and an import is an idempotent upsert)."""
        vm = self.get(name)
        if vm.migration is None:
            raise NotFound(f"VM {name!r} has no migration on host {self.name}")
        for handoff in vm.migration.handoffs:
            if versions.get(handoff.vnic, 0) > handoff.flows_since:
                handoff.flows_since = versions[handoff.vnic]

    def migration_status(self, name: str, since: int = 0) -> SourceMigrationStatus:
        vm = self.get(name)
        if vm.migration is None:
            raise NotFound(f"VM {name!r} has no migration on host {self.name}")
        self._end_job_if_qemu_died(vm)
        return self._job_status(vm, vm.migration.status(since))

    def _end_job_if_qemu_died(self, vm: ManagedVm) -> None:
        """A source QEMU that died takes its migration with it: the job ends (it would otherwise wait
        forever for events from a process that is gone)."""
        job = vm.migration
        if job is not None and job.state is JobState.RUNNING and not self.runtime.owns(vm.pid, vm.paths):
            job.abandon(f"the source QEMU (pid {vm.pid}) exited during the migration")

    async def cancel_migration(self, name: str) -> None:
        vm = self.get(name)
        self._end_job_if_qemu_died(vm)
        if vm.migration is not None:
            await vm.migration.cancel()
        vm.role = VmRole.RUNNING
        vm.save()

    async def destroy(self, name: str) -> None:
        """Stop the VM's QEMU (quit, then SIGKILL if it lingers) and forget it; idempotent."""
        vm = self.vms.pop(name, None)
        if vm is None:
            return
        self.changed.set()
        if vm.guest_watch is not None:
            vm.guest_watch.cancel()
        await self._kill(vm)
        await self.ports.detach(vm.spec)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if vm.paths.console_log.exists():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            shutil.copy(vm.paths.console_log, self.logs_dir / f"{name}.{stamp}.console.log")
        shutil.rmtree(vm.paths.root, ignore_errors=True)
        log.info("destroyed VM %s", name)

    async def _kill(self, vm: ManagedVm) -> None:
        if self.runtime.owns(vm.pid, vm.paths):
            with contextlib.suppress(QemuError, TimeoutError):
                await asyncio.wait_for(vm.qmp.execute("quit"), timeout=3)
            for _ in range(50):
                if not self.runtime.alive(vm.pid):
                    break
                await asyncio.sleep(0.05)
            else:
                self.runtime.kill(vm.pid)
        await vm.qmp.close()

    async def hold_incoming(self, name: str) -> VmStatus:
        """Keep an incoming VM from running the guest once it has loaded the migration's last state
        (QMP ``stop`` while QEMU is ``inmigrate`` turns its autostart off; the guest then waits,
        ``paused``, for a ``cont`` that only the LMO sends). The LMO holds a destination that does
        not finish loading, so that resuming the source can never race the destination's start:
        the status returned says whether the guest ran here before the hold (``resumed_at``)."""
        vm = self.get(name)
        if vm.incoming_uri is None and vm.role is not VmRole.INCOMING:
            raise InvalidRequest(f"VM {name!r} on {self.name} did not come in by migration: nothing to hold")
        state = RunState.parse(str((await vm.qmp.execute("query-status"))["status"]))
        if state is RunState.INMIGRATE:
            await vm.qmp.execute("stop")
        return await self.status(name)

    async def resume(self, name: str) -> str:
        """Make sure the VM runs (rollback after a failed switchover); returns the runstate."""
        vm = self.get(name)
        state = RunState.parse(str((await vm.qmp.execute("query-status"))["status"]))
        if state in RESUMABLE:
            await vm.qmp.execute("cont")
            state = RunState.parse(str((await vm.qmp.execute("query-status"))["status"]))
        vm.role = VmRole.RUNNING
        vm.save()
        return state

    async def dirty_rate(self, name: str, seconds: float = 1.0) -> DirtyRateReply:
        """The guest's dirty rate now, measured by QEMU itself (``calc-dirty-rate``, page sampling:
        it hashes sampled pages twice, ``seconds`` apart), so the LMO can predict how long a
        migration takes before it starts one. QEMU's most samples (16384 per GiB, not 512): a guest
        dirtying a few MiB/s changes 1-2 % of its pages a second, which a few hundred samples
        cannot tell apart from none."""
        vm = self.get(name)
        if not 0 < seconds <= 60:
            raise InvalidRequest(f"a dirty-rate measurement lasts 1 to 60 s, not {seconds}")
        calc = max(1, round(seconds))
        await vm.qmp.execute("calc-dirty-rate", {"calc-time": calc, "sample-pages": DIRTY_RATE_SAMPLE_PAGES})
        deadline = time.monotonic() + calc * 3 + 10
        while True:
            await asyncio.sleep(min(calc, 0.25))
            reply = await vm.qmp.execute("query-dirty-rate")
            if reply.get("status") == "measured":
                break
            if time.monotonic() > deadline:
                raise QemuError(f"VM {name}: QEMU did not finish measuring its dirty rate "
                                f"({reply.get('status')})", vm=name)  # fmt: skip
        return DirtyRateReply(
            vm=name,
            host=self.name,
            dirty_rate_mib_s=float(reply.get("dirty-rate", 0)),
            calc_time_s=float(reply.get("calc-time", calc)),
            measured_at=datetime.now(UTC),
        )

    async def dirty_rates(self, names: list[str] | None, seconds: float = 1.0) -> list[DirtyRateReply]:
        """The dirty rates of several VMs (all of them without ``names``), measured at the same
        time: a wave's planner asks each host once, not each VM. A VM that is gone or whose QEMU
        cannot measure is left out."""
        chosen = sorted(self.vms) if names is None else [n for n in names if n in self.vms]
        replies = await asyncio.gather(*(self.dirty_rate(n, seconds) for n in chosen), return_exceptions=True)
        for name, reply in zip(chosen, replies, strict=True):
            if isinstance(reply, BaseException) and not isinstance(reply, LivemigError):
                raise reply
            if isinstance(reply, LivemigError):
                log.warning("VM %s: no dirty rate: %s", name, reply.message)
        return [r for r in replies if isinstance(r, DirtyRateReply)]

    async def guest_check(self, name: str) -> tuple[bool, str]:
        return await self._run_check(name, self.runtime.memory_check)

    async def disk_check(self, name: str) -> tuple[bool, str]:
        return await self._run_check(name, self.runtime.disk_check)

    async def _run_check(self, name: str, check: Callable[[VmPaths], Awaitable[tuple[bool, str]]]) -> tuple[bool, str]:
        """Run a guest self-check; if the guest does not answer, say what QEMU sees."""
        vm = self.get(name)
        if vm.guest_resets:  # an answer now would come from a fresh boot, not the migrated guest
            return False, f"the guest crashed or rebooted on host {self.name}: {'; '.join(vm.guest_resets)}"
        try:
            return await check(vm.paths)
        except GuestError as exc:
            raise GuestError(f"{exc.message}; {await self._qemu_view(vm)}", vm=name) from None

    async def _qemu_view(self, vm: ManagedVm) -> str:
        """What QEMU says about a guest that does not answer: is it running, where are its vCPUs,
        when did it last print? (An unanswered check must say whether the guest or its channel hung.)"""
        parts: list[str] = []
        try:
            parts.append(f"QEMU status {(await vm.qmp.execute('query-status'))['status']}")
            cpus = await vm.qmp.execute("human-monitor-command", {"command-line": "info cpus"})
            parts.append("vCPUs " + "; ".join(line.strip() for line in str(cpus).splitlines() if line.strip()))
        except QemuError as exc:
            parts.append(f"QEMU does not answer QMP: {exc.message}")
        log_path = vm.paths.console_log
        if log_path.exists():
            parts.append(f"console last written {time.time() - log_path.stat().st_mtime:.0f}s ago")
        return ", ".join(parts)

    async def guest_command(self, name: str, line: str) -> None:
        vm = self.get(name)
        if "\n" in line or len(line) > 200:
            raise InvalidRequest("a console command is one line of at most 200 characters")
        await self.runtime.send_line(vm.paths, line)

    # ---------------------------------------------------------------- restart

    async def adopt(self) -> list[str]:
        """Re-adopt every VM whose QEMU is still running after a hostd restart."""
        if self.shaper is not None:
            # no migration outlives the hostd that ran it (unfinished ones are cancelled below),
            # so every per-migration class left on the interface is stale
            await asyncio.to_thread(self.shaper.reset)
        adopted: list[str] = []
        if not self.vms_dir.exists():
            return adopted
        for root in sorted(self.vms_dir.iterdir()):
            paths = VmPaths(root)
            try:
                record = load_record(paths)
            except (LivemigError, OSError, ValueError) as exc:
                why = exc.message if isinstance(exc, LivemigError) else str(exc)
                # kept on disk and reported: a record we cannot trust is never half-read or deleted
                self.refused_records[root.name] = why
                log.error("VM record %s refused, its VM is not adopted: %s", paths.record, why)
                continue
            spec = record.spec
            if not self.runtime.owns(record.pid, paths):
                log.warning("VM %s: QEMU pid %d is gone; forgetting it", spec.name, record.pid)
                shutil.rmtree(root, ignore_errors=True)
                continue
            vm = ManagedVm(**dict(record), paths=paths, qmp=self._qmp(spec.name))
            await vm.qmp.connect(paths.qmp)
            self._watch_guest(vm)
            if record.role is VmRole.OUTGOING:
                # the migration job died with the old hostd; QEMU's own state tells what happened
                # (nobody would answer pause-before-switchover): cancel an unfinished one, so the VM
                # keeps running here and the LMO sees a failed attempt it can roll back.
                status = (await vm.qmp.execute("query-migrate")).get("status")
                if status != "completed":
                    if status not in ("failed", "cancelled", "none", None):
                        await vm.qmp.execute("migrate_cancel")
                    vm.role = VmRole.RUNNING
                vm.save()
            self.vms[spec.name] = vm
            self.changed.set()
            adopted.append(spec.name)
            log.info("re-adopted VM %s (pid %d, %s)", spec.name, record.pid, vm.role)
        return adopted

    async def close(self) -> None:
        """Disconnect QMP sessions without touching the VMs (hostd shutdown)."""
        for vm in self.vms.values():
            await vm.qmp.close()
        await self.ports.close()
