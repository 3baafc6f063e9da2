"""HostAgent: the state and actions of one hostd (VM lifecycle, incoming VMs, migrations).

QEMU is started with ``-daemonize`` so it is never hostd's child: killing hostd (even SIGKILL)
never kills a VM. Each VM has a directory holding its spec record, pidfile, QMP and console
sockets and console log; a restarted hostd re-adopts every VM whose process is still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livemig.errors import CapacityError, Conflict, GuestError, InvalidRequest, LivemigError, NotFound, QemuError
from livemig.guest.image import kernel_cmdline
from livemig.host.accel import AccelChoice
from livemig.host.qemu import TCG_RAM_TRIM_KIB, VmPaths, command_line, needs_tcg_ram_trim, resolve_machine
from livemig.host.qmp import event_time
from livemig.host.runtime import LocalQemu, QemuRuntime, Qmp
from livemig.host.seeds import fill_new_vm_volumes
from livemig.host.shaping import MigrationShaper
from livemig.host.source import SourceMigration
from livemig.host.vnics import VswitchPorts
from livemig.model.host import HostInfo
from livemig.model.migration import MigrationParams
from livemig.model.vm import RESUMABLE, NbdExport, RunState, VmRole, VmSpec, VolumeDevice
from livemig.region.hostns import MIGRATION_DEVICE
from livemig.statefile import StateFile
from livemig.wire.hostd import JobState, SourceMigrationStatus, VmStatus, VnicHandoff

log = logging.getLogger(__name__)


#: QMP events that mean the guest did not survive: a reset or shutdown it asked for, or a panic
GUEST_FAILURE_EVENTS = ("RESET", "SHUTDOWN", "GUEST_PANICKED")


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


class ManagedVm(VmRecord):
    """A VM this hostd runs: its record (saved on every change) plus what lives only in memory."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    paths: VmPaths = Field(exclude=True)
    qmp: Qmp = Field(exclude=True)
    migration: SourceMigration | None = Field(default=None, exclude=True)
    guest_watch: asyncio.Task[None] | None = Field(default=None, exclude=True)

    def save(self) -> None:
        StateFile(self.paths.record, VM_RECORD_VERSION).save(self.model_dump(mode="json"))


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
        self.vms: dict[str, ManagedVm] = {}
        self.refused_records: dict[str, str] = {}  # VM directory -> why its record was not trusted
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- observation

    def info(self) -> HostInfo:
        return HostInfo(
            name=self.name,
            migration_address=self.migration_address,
            accel=self.accel.name,
            accel_reason=self.accel.reason,
            qemu_version=self.runtime.version(),
            memory_mib=self.memory_mib,
            memory_used_mib=sum(vm.spec.memory_mib for vm in self.vms.values()),
            migration_bandwidth_mib_s=self.migration_bandwidth_mib_s,
            vms=sorted(self.vms),
            machines=sorted(set(self.runtime.machines().values())),
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
                        guest_resets=list(vm.guest_resets))  # fmt: skip

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
        free = self.memory_mib - sum(vm.spec.memory_mib for vm in self.vms.values())
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
            paths.root.mkdir(parents=True)
            if not incoming:  # a destination gets its volumes' contents from the source, never from here
                try:
                    for done in await fill_new_vm_volumes(self.runtime, spec, exports or {}, firmware, paths.root):
                        log.info("VM %s: %s", spec.name, done)
                except LivemigError:
                    shutil.rmtree(paths.root, ignore_errors=True)
                    raise
            netdevs = await self.ports.attach(spec, hold=incoming)
            argv = command_line(spec, paths, self.accel.name, incoming=incoming, binary=self.runtime.binary(),
                                exports=exports, netdevs=netdevs, firmware=firmware)  # fmt: skip
            if self.netns:  # the NIC socket is a passed fd, so it stays in hostd's namespace
                argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
            try:
                pid = await self.runtime.launch(argv, self.ports.pass_fds(spec), paths)
            except QemuError as exc:
                shutil.rmtree(paths.root, ignore_errors=True)
                await self.ports.detach(spec)
                raise QemuError(f"QEMU refused to start VM {spec.name}: {exc.message}", vm=spec.name) from None
            vm = ManagedVm(spec=spec, paths=paths, pid=pid, role=VmRole.INCOMING if incoming else VmRole.RUNNING,
                           qmp=self.runtime.qmp(f"{self.name}/{spec.name}"), argv=argv,
                           exports=dict(exports or {}))  # fmt: skip
            try:
                await vm.qmp.connect(paths.qmp)
            except QemuError:
                await self._kill(vm)
                shutil.rmtree(paths.root, ignore_errors=True)
                raise
            self._watch_guest(vm)
            vm.save()
            self.vms[spec.name] = vm
            log.info("started VM %s (pid %d, %s)", spec.name, pid, vm.role)
            return vm

    async def prepare_incoming(self, spec: VmSpec, exports: dict[str, NbdExport] | None = None) -> str:
        """Start a suspended destination listening on this host's migration address; idempotent."""
        existing = self.vms.get(spec.name)
        if existing is not None:
            if (existing.role is VmRole.INCOMING and existing.incoming_uri and existing.spec == spec
                    and existing.exports == (exports or {})):  # fmt: skip
                return existing.incoming_uri
            raise Conflict(f"VM {spec.name!r} already exists on host {self.name} ({existing.role})")
        if spec.firmware is not None:
            self.runtime.firmware().pinned(spec.firmware, self.name)  # this host has the VM's very build
        elif spec.boot.kernel is None or spec.boot.initrd is None:
            raise InvalidRequest("an incoming VM needs the source's resolved spec (boot files pinned)")
        else:
            for path in (spec.boot.kernel, spec.boot.initrd):
                if not Path(path).is_file():
                    raise InvalidRequest(f"boot file {path} does not exist on host {self.name}")
        vm = await self.create(spec, incoming=True, exports=exports)
        await asyncio.sleep(0)  # the watcher's listener is registered before the migration can start
        try:
            await vm.qmp.execute("migrate-set-capabilities",
                                 {"capabilities": [{"capability": "events", "state": True}]})  # fmt: skip
            await vm.qmp.execute("migrate-incoming", {"uri": f"tcp:{self.migration_address}:0"})
            reply = await vm.qmp.execute("query-migrate")
            sockets = reply.get("socket-address") or []
            if not sockets:
                raise QemuError(f"incoming VM {spec.name}: QEMU did not report its listening port")
            vm.incoming_uri = f"tcp:{self.migration_address}:{sockets[0]['port']}"
        except QemuError:
            await self.destroy(spec.name)
            raise
        vm.save()
        return vm.incoming_uri

    @staticmethod
    def _watch_guest(vm: ManagedVm) -> None:
        vm.guest_watch = asyncio.create_task(HostAgent._guest_events(vm), name=f"guest-{vm.spec.name}")

    @staticmethod
    async def _guest_events(vm: ManagedVm) -> None:
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
                if name == "RESUME":
                    # the first RESUME of a VM that came in by migration (not its role: a status
                    # poll may already have flipped that to "running" before this event is read)
                    if vm.incoming_uri is not None and vm.resumed_at is None:
                        vm.resumed_at = at
                        with contextlib.suppress(OSError):  # the VM may be on its way out
                            vm.save()
                    continue
                reason = str(data.get("reason", data.get("action", "")))
                if name == "SHUTDOWN" and not reason.startswith("guest"):
                    continue  # hostd's own quit
                after = f", {at - vm.resumed_at:.2f} s after resuming here" if vm.resumed_at else ""
                vm.guest_resets.append(f"{name} ({reason or 'no reason given'}){after}")
                with contextlib.suppress(OSError):
                    vm.save()
                log.warning("VM %s: guest %s (%s)%s", vm.spec.name, name, reason, after)

    async def migrate(
        self, name: str, uri: str, params: MigrationParams, handoffs: list[VnicHandoff] | None = None
    ) -> SourceMigrationStatus:
        vm = self.get(name)
        if vm.migration is not None and vm.migration.state is JobState.RUNNING:
            if vm.migration.uri == uri:
                return vm.migration.status()  # idempotent retry of the same request
            raise Conflict(f"VM {name!r} is already migrating to {vm.migration.uri}")
        if vm.role is VmRole.INCOMING:
            raise Conflict(f"VM {name!r} on host {self.name} is an incoming VM, not a source")
        markers: dict[str, dict[str, int]] = {}

        async def hand_off_network() -> None:
            markers.update(await self.ports.hand_off(job.handoffs, stopped_at=job.stopped_at))

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
                              handoffs=handoffs)  # fmt: skip
        try:
            await job.configure()
        except BaseException:
            if shaped is not None:
                await asyncio.to_thread(shaped.release)
            raise
        vm.migration = job
        vm.role = VmRole.OUTGOING
        vm.save()
        job.start()
        return job.status()

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
        return vm.migration.status(since)

    async def cancel_migration(self, name: str) -> None:
        vm = self.get(name)
        if vm.migration is not None:
            await vm.migration.cancel()
        vm.role = VmRole.RUNNING
        vm.save()

    async def destroy(self, name: str) -> None:
        """Stop the VM's QEMU (quit, then SIGKILL if it lingers) and forget it; idempotent."""
        vm = self.vms.pop(name, None)
        if vm is None:
            return
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
            vm = ManagedVm(**dict(record), paths=paths, qmp=self.runtime.qmp(f"{self.name}/{spec.name}"))
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
            adopted.append(spec.name)
            log.info("re-adopted VM %s (pid %d, %s)", spec.name, record.pid, vm.role)
        return adopted

    async def close(self) -> None:
        """Disconnect QMP sessions without touching the VMs (hostd shutdown)."""
        for vm in self.vms.values():
            await vm.qmp.close()
        await self.ports.close()
