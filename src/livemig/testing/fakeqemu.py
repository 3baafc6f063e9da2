"""A simulated QEMU behind hostd's runtime seam (``host/runtime.py``), for fast tests and the
fleet simulator: the real hostd app, agent and migration driver run unchanged on top of it.

What is simulated is what hostd and the LMO observe through QMP: runstates, the ``MIGRATION``,
``STOP``, ``RESUME`` and ``RESET`` events with timestamps, ``query-migrate``'s numbers, and pre-copy
itself. A migration runs in rounds, as QEMU's does: the first sends all of RAM at the
``max-bandwidth`` the source was given, each later one what the guest dirtied meanwhile, until a
round fits in ``downtime-limit``; then the source stops (``STOP``, ``pre-switchover`` when asked,
waiting for ``migrate-continue``), sends the rest, and the destination resumes. Time runs on a
:class:`SimClock` that can be sped up, so a fleet of slow migrations finishes in seconds.

Knobs per host (:class:`QemuBehaviour`) break any step: a destination that will not start, a
migration that fails, a guest that dirties memory faster than the link, one that crashes after it
resumes, a pre-copy that never converges.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from livemig.errors import GuestError, QemuError
from livemig.guest.image import GuestImage
from livemig.host.firmware import FirmwareCatalog
from livemig.host.qemu import VmPaths
from livemig.model.vm import NVRAM_BYTES, RESUMABLE, NbdExport, RunState

MIB = 1024 * 1024
PAGE = 4096
#: QEMU's own defaults, used until migrate-set-parameters says otherwise
DEFAULT_BANDWIDTH = 128 * MIB
DEFAULT_DOWNTIME_LIMIT_MS = 300
#: Fake pids start far above any real pid_max, so a fake can never be mistaken for a process
FIRST_PID = 50_000_000


class SimClock:
    """Simulated seconds run ``speed`` times as fast as real ones (1.0: real time)."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._real0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._real0) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0) / self.speed)


@dataclass
class QemuBehaviour:
    """How one host's simulated QEMUs misbehave (all off: a healthy host)."""

    fail_incoming: bool = False  # a destination QEMU refuses to start
    fail_migration: str | None = None  # the source's migration fails with this error after a round
    crash_after_resume: bool = False  # as a destination: the guest resets right after it resumes
    dirty_rate_mib_s: float = 0.0  # how fast the guest dirties memory
    hold_precopy: bool = False  # pre-copy never converges (it stays in rounds until cancelled)


@dataclass
class _Listener:
    names: frozenset[str]
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class FakeQemu:
    """One simulated QEMU process: its runstate, its migration, its event stream."""

    def __init__(self, world: QemuWorld, pid: int, name: str, paths: VmPaths, memory_bytes: int,
                 incoming: bool, behaviour: QemuBehaviour, migration_address: str) -> None:  # fmt: skip
        self.world = world
        self.pid = pid
        self.name = name
        self.paths = paths
        self.memory_bytes = memory_bytes
        self.behaviour = behaviour
        self.migration_address = migration_address
        self.runstate = RunState.INMIGRATE if incoming else RunState.RUNNING
        self.alive = True
        self.capabilities: dict[str, bool] = {}
        self.parameters: dict[str, Any] = {"downtime-limit": DEFAULT_DOWNTIME_LIMIT_MS,
                                           "max-bandwidth": DEFAULT_BANDWIDTH}  # fmt: skip
        self.listening: str | None = None  # an incoming QEMU's URI after migrate-incoming
        self.migration: dict[str, Any] = {}  # what query-migrate answers
        self._task: asyncio.Task[None] | None = None
        self._continue: asyncio.Event | None = None
        self._listeners: list[_Listener] = []

    # ------------------------------------------------------------------ events
    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message = {"event": event, "data": data or {},
                   "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}}  # fmt: skip
        for listener in self._listeners:
            if event in listener.names:
                listener.queue.put_nowait(message)

    @contextmanager
    def listener(self, names: tuple[str, ...]) -> Iterator[AsyncIterator[dict[str, Any]]]:
        entry = _Listener(frozenset(names))
        self._listeners.append(entry)

        async def messages() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield await entry.queue.get()

        try:
            yield messages()
        finally:
            self._listeners.remove(entry)

    # ------------------------------------------------------------------ QMP
    async def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        if not self.alive:
            raise QemuError(f"{self.name}: QMP {command} failed: QEMU has exited", command=command)
        handler = getattr(self, "_qmp_" + command.replace("-", "_"), None)
        if handler is None:
            raise QemuError(f"{self.name}: QMP {command} failed: The command {command} has not been found",
                            command=command, qemu_error_class="CommandNotFound")  # fmt: skip
        return await handler(arguments)

    async def _qmp_query_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.runstate.value, "running": self.runstate is RunState.RUNNING}

    async def _qmp_cont(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self.runstate in RESUMABLE:
            self.runstate = RunState.RUNNING
            self.emit("RESUME")
        return {}

    async def _qmp_quit(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.world.exit(self)
        return {}

    async def _qmp_human_monitor_command(self, _args: dict[str, Any]) -> str:
        halted = "halted" if self.runstate is not RunState.RUNNING else "running"
        return f"* CPU #0: thread_id={self.pid} ({halted})\r\n"

    async def _qmp_migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args.get("capabilities", []):
            self.capabilities[str(cap["capability"])] = bool(cap["state"])
        return {}

    async def _qmp_query_migrate_capabilities(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in sorted(self.capabilities.items())]

    async def _qmp_migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        self.parameters.update(args)
        return {}

    async def _qmp_query_migrate_parameters(self, _args: dict[str, Any]) -> dict[str, Any]:
        return dict(self.parameters)

    async def _qmp_migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.runstate is not RunState.INMIGRATE:
            raise QemuError(f"{self.name}: QMP migrate-incoming failed: not an incoming QEMU")
        self.listening = self.world.listen(self, str(args["uri"]))
        return {}

    async def _qmp_query_migrate(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self.listening and not self.migration:
            port = int(self.listening.rsplit(":", 1)[1])
            return {"socket-address": [{"type": "inet", "host": self.migration_address, "port": str(port)}]}
        reply = dict(self.migration)
        if reply.get("status") == "active" and "ram" in reply:
            reply["ram"] = dict(reply["ram"], **self._progress())
        return reply

    async def _qmp_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration.get("status") in ("setup", "active", "pre-switchover", "device"):
            raise QemuError(f"{self.name}: QMP migrate failed: There's a migration process in progress")
        destination = self.world.listening.get(str(args["uri"]))
        self.migration = {"status": "setup"}
        self._task = asyncio.create_task(self._precopy(destination), name=f"fake-migrate-{self.name}")
        return {}

    async def _qmp_migrate_continue(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration.get("status") != "pre-switchover" or self._continue is None:
            raise QemuError(f"{self.name}: QMP migrate-continue failed: Migration not in expected state: "
                            f"{self.migration.get('status', 'none')}")  # fmt: skip
        self._continue.set()
        return {}

    async def _qmp_migrate_cancel(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._end("cancelled")
            if self.runstate in (RunState.FINISH_MIGRATE, RunState.PAUSED):
                self.runstate = RunState.RUNNING
                self.emit("RESUME")
        return {}

    # ------------------------------------------------------------------ pre-copy
    def _status(self, status: str) -> None:
        self.migration["status"] = status
        self.emit("MIGRATION", {"status": status})

    def _end(self, status: str, error: str | None = None) -> None:
        self.migration["status"] = status
        if error:
            self.migration["error-desc"] = error
        self.emit("MIGRATION", {"status": status})

    def _progress(self) -> dict[str, int]:
        """Interpolated within the current round, as QEMU's counters move during one."""
        ram = self.migration["ram"]
        round_bytes, started, duration = ram["_round_bytes"], ram["_round_started"], ram["_round_s"]
        done = 1.0 if duration <= 0 else min(max((self.world.clock.now() - started) / duration, 0.0), 1.0)
        sent = int(round_bytes * done)
        return {"remaining": round_bytes - sent, "transferred": ram["_sent_before"] + sent}

    async def _precopy(self, destination: FakeQemu | None) -> None:
        clock = self.world.clock
        started = clock.now()
        if destination is None or not destination.alive:
            self._end("failed", "Failed to connect socket: Connection refused")
            return
        self._status("active")
        bandwidth = float(self.parameters.get("max-bandwidth") or DEFAULT_BANDWIDTH)
        limit_s = float(self.parameters.get("downtime-limit") or DEFAULT_DOWNTIME_LIMIT_MS) / 1000
        dirty_rate = self.behaviour.dirty_rate_mib_s * MIB
        to_send, sent, rounds = float(self.memory_bytes), 0.0, 0
        ram: dict[str, Any] = {"total": self.memory_bytes, "page-size": PAGE, "mbps": bandwidth * 8 / 1e6,
                               "dirty-pages-rate": int(dirty_rate / PAGE)}  # fmt: skip
        self.migration["ram"] = ram
        while True:
            rounds += 1
            duration = to_send / bandwidth
            ram.update({"dirty-sync-count": rounds, "_round_bytes": int(to_send), "_round_started": clock.now(),
                        "_round_s": duration, "_sent_before": int(sent),
                        "remaining": int(to_send), "transferred": int(sent)})  # fmt: skip
            self.migration["expected-downtime"] = int(to_send / bandwidth * 1000)
            await clock.sleep(duration)
            sent += to_send
            if self.behaviour.fail_migration:
                self._end("failed", self.behaviour.fail_migration)
                return
            to_send = min(dirty_rate * duration, float(self.memory_bytes))
            if self.behaviour.hold_precopy:
                to_send = max(to_send, float(self.memory_bytes) / 8)
            elif to_send / bandwidth <= limit_s:
                break
        await self._switchover(destination, to_send, bandwidth, sent, rounds, started)

    async def _switchover(self, destination: FakeQemu, left: float, bandwidth: float, sent: float, rounds: int,
                          started: float) -> None:  # fmt: skip
        clock = self.world.clock
        stopped = clock.now()
        self.runstate = RunState.FINISH_MIGRATE
        self.emit("STOP")
        if self.capabilities.get("pause-before-switchover"):
            self._continue = asyncio.Event()
            self._status("pre-switchover")
            await self._continue.wait()
            self._status("device")
        await clock.sleep(left / bandwidth + 0.001)
        ram = self.migration["ram"]
        ram.update({"remaining": 0, "transferred": int(sent + left), "dirty-sync-count": rounds + 1,
                    "_round_bytes": 0, "_round_s": 0.0})  # fmt: skip
        downtime_ms = int((clock.now() - stopped) * 1000)
        self.migration.update({"total-time": max(int((clock.now() - started) * 1000), 1), "downtime": downtime_ms,
                               "setup-time": 1})  # fmt: skip
        destination.resume_incoming()
        self.runstate = RunState.POSTMIGRATE
        self._end("completed")

    def resume_incoming(self) -> None:
        """The last state arrived: the destination's guest runs."""
        self.runstate = RunState.RUNNING
        self.world.unlisten(self)
        self.emit("RESUME")
        if self.behaviour.crash_after_resume:
            asyncio.get_running_loop().call_later(0.03 / self.world.clock.speed, self._guest_reset)

    def _guest_reset(self) -> None:
        if self.alive:
            self.emit("RESET", {"guest": True, "reason": "guest-reset"})


class QemuWorld:
    """Every simulated QEMU of a fleet, so a source finds the destination listening at its URI."""

    def __init__(self, clock: SimClock | None = None) -> None:
        self.clock = clock or SimClock()
        self.processes: dict[int, FakeQemu] = {}
        self.by_socket: dict[Path, FakeQemu] = {}
        self.listening: dict[str, FakeQemu] = {}
        self._pids = itertools.count(FIRST_PID)
        self._ports = itertools.count(49152)

    def start(self, name: str, paths: VmPaths, memory_bytes: int, incoming: bool, behaviour: QemuBehaviour,
              migration_address: str) -> FakeQemu:  # fmt: skip
        qemu = FakeQemu(self, next(self._pids), name, paths, memory_bytes, incoming, behaviour, migration_address)
        self.processes[qemu.pid] = qemu
        self.by_socket[paths.qmp] = qemu
        return qemu

    def exit(self, qemu: FakeQemu) -> None:
        qemu.alive = False
        qemu.runstate = RunState.SHUTDOWN
        self.processes.pop(qemu.pid, None)
        if self.by_socket.get(qemu.paths.qmp) is qemu:
            del self.by_socket[qemu.paths.qmp]
        self.unlisten(qemu)

    def listen(self, qemu: FakeQemu, uri: str) -> str:
        host = uri.split(":")[1] if uri.count(":") >= 2 else qemu.migration_address
        bound = f"tcp:{host}:{next(self._ports)}"
        self.listening[bound] = qemu
        return bound

    def unlisten(self, qemu: FakeQemu) -> None:
        for uri in [u for u, q in self.listening.items() if q is qemu]:
            del self.listening[uri]


class FakeQmp:
    """hostd's QMP session to a simulated QEMU (the ``Qmp`` protocol of ``host/runtime.py``)."""

    def __init__(self, world: QemuWorld, name: str) -> None:
        self.world = world
        self.name = name
        self._qemu: FakeQemu | None = None

    @property
    def connected(self) -> bool:
        return self._qemu is not None and self._qemu.alive

    async def connect(self, socket_path: Path, timeout: float = 10.0) -> None:
        qemu = self.world.by_socket.get(socket_path)
        if qemu is None or not qemu.alive:
            raise QemuError(f"{self.name}: cannot connect to QMP at {socket_path}: no such QEMU")
        self._qemu = qemu

    def _require(self) -> FakeQemu:
        if self._qemu is None:
            raise QemuError(f"{self.name}: QMP is not connected")
        return self._qemu

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        await asyncio.sleep(0)  # a real QMP call yields to the event loop, so does this one
        return await self._require().execute(command, arguments or {})

    @contextmanager
    def listener(self, *names: str) -> Iterator[AsyncIterator[dict[str, Any]]]:
        with self._require().listener(names) as messages:
            yield messages

    async def close(self) -> None:
        self._qemu = None


_MEMORY = re.compile(r"^(\d+)([KMG]?)$")


class FakeQemuRuntime:
    """One host's machine, simulated: the ``QemuRuntime`` protocol of ``host/runtime.py``."""

    VERSION = "7.2.0"
    MACHINES: ClassVar[dict[str, str]] = {"q35": "pc-q35-7.2", "pc-q35-7.2": "pc-q35-7.2", "pc": "pc-i440fx-7.2",
                "pc-i440fx-7.2": "pc-i440fx-7.2"}  # fmt: skip

    def __init__(self, world: QemuWorld, image_dir: Path, migration_address: str,
                 behaviour: QemuBehaviour | None = None) -> None:  # fmt: skip
        self.world = world
        self.behaviour = behaviour or QemuBehaviour()
        self.migration_address = migration_address
        self.image_dir = image_dir
        #: what hostd wrote into volumes through its attachments, by volume name (never read by QEMU)
        self.volumes: dict[str, bytes] = {}

    def version(self) -> str:
        return self.VERSION

    def machines(self) -> dict[str, str]:
        return dict(self.MACHINES)

    def binary(self) -> str:
        return "qemu-system-x86_64"

    def guest_image(self) -> GuestImage:
        """Boot files that exist (hostd checks) but that no simulated QEMU reads."""
        self.image_dir.mkdir(parents=True, exist_ok=True)
        kernel, initrd = self.image_dir / "vmlinuz", self.image_dir / "initrd.img"
        for path in (kernel, initrd):
            if not path.exists():
                path.write_bytes(b"simulated")
        return GuestImage(kernel=kernel, initrd=initrd, kernel_version="simulated")

    @property
    def firmware_dir(self) -> Path:
        """Simulated firmware files: a test changes one to give this host another build."""
        return self.image_dir / "firmware"

    def firmware(self) -> FirmwareCatalog:
        """Files named like Debian's, so the real catalog scans them (and checksums them); made
        once, so a test can replace or remove one."""
        directory = self.firmware_dir
        if directory.exists():
            return FirmwareCatalog.scan(directory, directory / "bios-256k.bin")
        directory.mkdir(parents=True)
        files = {"OVMF_CODE_4M.fd": b"simulated OVMF 4M code", "OVMF_CODE_4M.secboot.fd": b"simulated OVMF secboot",
                 "OVMF_VARS_4M.fd": bytes(0x28) + b"_FVH" + bytes(NVRAM_BYTES - 0x2C),
                 "OVMF_VARS_4M.ms.fd": bytes(0x28) + b"_FVH" + bytes(NVRAM_BYTES - 0x2C),
                 "bios-256k.bin": b"simulated SeaBIOS"}  # fmt: skip
        for name, content in files.items():
            (directory / name).write_bytes(content)
        return FirmwareCatalog.scan(directory, directory / "bios-256k.bin")

    async def read_volume(self, export: NbdExport, size: int) -> bytes:
        return self.volumes.get(export.export.split("/")[0], b"").ljust(size, b"\0")[:size]

    async def write_volume(self, export: NbdExport, source: Path) -> None:
        self.volumes[export.export.split("/")[0]] = source.read_bytes()

    async def launch(self, argv: list[str], pass_fds: list[int], paths: VmPaths) -> int:
        incoming = "-incoming" in argv
        if incoming and self.behaviour.fail_incoming:
            raise QemuError("qemu-system-x86_64: simulated: the destination QEMU refused to start")
        name = argv[argv.index("-name") + 1].split(",")[0].removeprefix("guest=")
        memory = _MEMORY.match(argv[argv.index("-m") + 1])
        if memory is None:
            raise QemuError(f"qemu-system-x86_64: -m {argv[argv.index('-m') + 1]}: invalid size")
        unit = {"": MIB, "K": 1024, "M": MIB, "G": 1024 * MIB}[memory.group(2)]
        qemu = self.world.start(name, paths, int(memory.group(1)) * unit, incoming, self.behaviour,
                                self.migration_address)  # fmt: skip
        return qemu.pid

    def owns(self, pid: int, paths: VmPaths) -> bool:
        qemu = self.world.processes.get(pid)
        return qemu is not None and qemu.paths == paths

    def alive(self, pid: int) -> bool:
        return pid in self.world.processes

    def kill(self, pid: int) -> None:
        qemu = self.world.processes.get(pid)
        if qemu is not None:
            self.world.exit(qemu)

    def qmp(self, name: str) -> FakeQmp:
        return FakeQmp(self.world, name)

    def _guest(self, paths: VmPaths) -> FakeQemu:
        qemu = self.world.by_socket.get(paths.qmp)
        if qemu is None or qemu.runstate is not RunState.RUNNING:
            raise GuestError(f"the guest did not answer on {paths.command_port}")
        return qemu

    async def memory_check(self, paths: VmPaths) -> tuple[bool, str]:
        qemu = self._guest(paths)
        return True, f"ok pages={qemu.memory_bytes // PAGE} live_errors=0"

    async def disk_check(self, paths: VmPaths) -> tuple[bool, str]:
        self._guest(paths)
        return True, "ok records=0 flushed=0"

    async def send_line(self, paths: VmPaths, line: str) -> None:
        self._guest(paths)
