"""A simulated QEMU behind hostd's runtime seam (``host/runtime.py``), for fast tests and the
fleet simulator: the real hostd app, agent and migration driver run unchanged on top of it.

What is simulated is what hostd and the LMO observe through QMP: runstates, the ``MIGRATION``,
``STOP``, ``RESUME`` and ``RESET`` events with timestamps, ``query-migrate``'s numbers, and pre-copy
itself. A migration runs in rounds, as QEMU's does: the first sends all of RAM at the
``max-bandwidth`` the source was given, each later one what the guest dirtied meanwhile, until a
round fits in ``downtime-limit``; then the source stops (``STOP``, ``pre-switchover`` when asked,
waiting for ``migrate-continue``), sends the rest, and the destination resumes. Time runs on a
:class:`SimClock` that can be sped up, so a fleet of slow migrations finishes in seconds.

A simulated guest dirties memory as the livemig workload on its kernel command line says
(``livemig.rate`` MiB/s within ``livemig.wss`` MiB), as the real guest would; QEMU's
``calc-dirty-rate`` measures that. Knobs per host (:class:`QemuBehaviour`) break any step: a
destination that will not start, a migration that fails (always, or at a rate), a guest that
dirties memory faster than the link, one that crashes after it resumes, a pre-copy that never
converges.

Migration TLS is simulated from the real certificate files hostd hands QEMU (``object-add
tls-creds-x509``): a destination refuses a source whose certificate its ``tls-authz`` does not
name, or a plain stream when it expects TLS, in QEMU's own words (in its ``-D`` log), and the
source fails as QEMU's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from livemig.errors import GuestError, LivemigError, QemuError
from livemig.guest.image import GuestImage
from livemig.host.firmware import FirmwareCatalog
from livemig.host.qemu import VmPaths
from livemig.model.vm import NVRAM_BYTES, RESUMABLE, NbdExport, RunState
from livemig.security import pki
from livemig.security.qemu_tls import authz_identity

MIB = 1024 * 1024
PAGE = 4096
#: QEMU's own defaults, used until migrate-set-parameters says otherwise
DEFAULT_BANDWIDTH = 128 * MIB
DEFAULT_DOWNTIME_LIMIT_MS = 300
DEFAULT_PARAMETERS: dict[str, Any] = {
    "downtime-limit": DEFAULT_DOWNTIME_LIMIT_MS, "max-bandwidth": DEFAULT_BANDWIDTH,
    "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50, "multifd-channels": 2, "multifd-compression": "none",
    "multifd-zstd-level": 1, "xbzrle-cache-size": 64 * MIB, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
}  # fmt: skip
#: Fake pids start far above any real pid_max, so a fake can never be mistaken for a process
FIRST_PID = 50_000_000
#: real seconds between the answer to ``migrate-continue`` and the status leaving
#: ``pre-switchover`` (QEMU's migration thread wakes after the command returns; a test sets it)
CONTINUE_LAG_S = 0.0


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
    stall_incoming: bool = False  # as a destination: never finishes loading the last state (stays inmigrate)
    dirty_rate_mib_s: float = 0.0  # how fast every guest here dirties memory (0: as its workload says)
    hold_precopy: bool = False  # pre-copy never converges (it stays in rounds until cancelled)
    stream_cap_mib_s: float = 0.0  # what one migration stream can push (CPU-bound; 0: no cap); multifd multiplies
    compression_ratio: float = 2.0  # how much XBZRLE or zstd shrink this guest's pages on the wire
    ignored_parameters: tuple[str, ...] = ()  # accepted but not taken (QEMU 7.2 keeps multifd-zstd-level 1)
    failure_rate: float = 0.0  # each migration from here fails after its first round with this probability


@dataclass(frozen=True)
class Guest:
    """What the simulated guest does to its memory: the workload of its kernel command line."""

    rate_mib_s: float = 0.0
    wss_mib: float | None = None  # None: anywhere in its RAM

    @classmethod
    def from_append(cls, append: str) -> Guest:
        options = dict(part.split("=", 1) for part in append.split() if part.startswith("livemig.") and "=" in part)
        if options.get("livemig.workload") == "off":
            return cls()
        rate = options.get("livemig.rate", "0")
        wss = options.get("livemig.wss")
        return cls(float(rate) if rate.isdigit() else 0.0, float(wss) if wss and wss.isdigit() else None)


@dataclass
class _Listener:
    names: frozenset[str]
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class FakeQemu:
    """One simulated QEMU process: its runstate, its migration, its event stream."""

    def __init__(self, world: QemuWorld, pid: int, name: str, paths: VmPaths, memory_bytes: int,
                 incoming: bool, behaviour: QemuBehaviour, migration_address: str,
                 guest: Guest | None = None) -> None:  # fmt: skip
        self.world = world
        self.guest = guest or Guest()
        self.pid = pid
        self.name = name
        self.paths = paths
        self.memory_bytes = memory_bytes
        self.behaviour = behaviour
        self.migration_address = migration_address
        self.runstate = RunState.INMIGRATE if incoming else RunState.RUNNING
        self.autostart = True  # an incoming QEMU runs the guest once loaded (``stop`` before: it does not)
        self.alive = True
        self.capabilities: dict[str, bool] = {}
        self.parameters: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self.objects: dict[str, dict[str, Any]] = {}  # object-add'ed: TLS credentials, authz
        self.listening: str | None = None  # an incoming QEMU's URI after migrate-incoming
        self.migration: dict[str, Any] = {}  # what query-migrate answers
        self._task: asyncio.Task[None] | None = None
        self._dirty_rate: dict[str, Any] = {"status": "unstarted"}
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

    async def _qmp_stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        """As QEMU's: an incoming QEMU only forgets to start the guest once loaded; a running one pauses."""
        if self.runstate is RunState.INMIGRATE:
            self.autostart = False
        elif self.runstate is RunState.RUNNING:
            self.runstate = RunState.PAUSED
            self.emit("STOP")
        return {}

    async def _qmp_quit(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.world.exit(self)
        return {}

    async def _qmp_human_monitor_command(self, _args: dict[str, Any]) -> str:
        halted = "halted" if self.runstate is not RunState.RUNNING else "running"
        return f"* CPU #0: thread_id={self.pid} ({halted})\r\n"

    async def _qmp_object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        object_id = str(args["id"])
        if object_id in self.objects:
            raise QemuError(f"{self.name}: QMP object-add failed: attempt to add duplicate property "
                            f"'{object_id}' to object (type 'container')", qemu_error_class="GenericError")  # fmt: skip
        if args.get("qom-type") == "tls-creds-x509":
            cert = Path(str(args["dir"])) / f"{args['endpoint']}-cert.pem"
            if not cert.is_file():
                raise QemuError(f"{self.name}: QMP object-add failed: Unable to access credentials {cert}",
                                qemu_error_class="GenericError")  # fmt: skip
        self.objects[object_id] = dict(args)
        return {}

    async def _qmp_object_del(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.objects.pop(str(args["id"]), None) is None:
            raise QemuError(f"{self.name}: QMP object-del failed: object '{args['id']}' not found",
                            qemu_error_class="GenericError")  # fmt: skip
        return {}

    def tls_creds(self) -> dict[str, Any] | None:
        return tls_creds_of(self.objects, self.parameters)

    def log(self, line: str) -> None:
        """A line in QEMU's ``-D`` log, as the real one writes its errors there."""
        append_qemu_log(self.paths.qemu_log, line)

    def _tls_refusal(self, destination: StreamEnd) -> str | None:
        """Why the destination refuses this source's stream (and what it logs), or None."""
        mine, theirs = self.tls_creds(), destination.tls_creds()
        if mine is None and theirs is None:
            return None
        if mine is None or theirs is None:
            destination.log("TLS handshake failed: An unexpected TLS packet was received.")
            return "Unable to write to socket: Connection reset by peer"
        try:
            identity = pki.identity_of(pki.load_cert(Path(mine["dir"]) / "client-cert.pem"))
            names = pki.sans_of(pki.load_cert(Path(theirs["dir"]) / "server-cert.pem"))
        except LivemigError as exc:
            return f"TLS credentials unusable: {exc.message}"
        wanted = str(self.parameters.get("tls-hostname") or "")
        if wanted not in names:
            return f"Certificate does not match the hostname {wanted}"
        authz = destination.objects.get(str(destination.parameters.get("tls-authz") or ""))
        if authz is not None and authz.get("identity") != authz_identity(identity):
            destination.log(f"TLS x509 authz check for {authz_identity(identity)} is denied")
            return "Cannot write to TLS channel: Input/output error"
        return None

    async def _qmp_migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args.get("capabilities", []):
            self.capabilities[str(cap["capability"])] = bool(cap["state"])
        return {}

    async def _qmp_query_migrate_capabilities(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in sorted(self.capabilities.items())]

    async def _qmp_migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(args) - set(DEFAULT_PARAMETERS))
        if unknown:
            raise QemuError(f"{self.name}: QMP migrate-set-parameters failed: Parameter '{unknown[0]}' is unexpected")
        if args.get("multifd-compression", "none") not in ("none", "zlib", "zstd"):
            raise QemuError(f"{self.name}: QMP migrate-set-parameters failed: Parameter 'multifd-compression' "
                            "does not accept value")  # fmt: skip
        self.parameters.update({k: v for k, v in args.items() if k not in self.behaviour.ignored_parameters})
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
        self.migration = {"status": "setup"}
        self._task = asyncio.create_task(self._precopy(str(args["uri"])), name=f"fake-migrate-{self.name}")
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

    async def _qmp_calc_dirty_rate(self, args: dict[str, Any]) -> dict[str, Any]:
        calc = int(args.get("calc-time", 1))
        if calc < 1:
            raise QemuError(f"{self.name}: QMP calc-dirty-rate failed: Parameter 'calc-time' is out of range")
        self._dirty_rate = {"status": "measuring", "start-time": int(self.world.clock.now()), "calc-time": calc,
                            "_until": self.world.clock.now() + calc}  # fmt: skip
        return {}

    async def _qmp_query_dirty_rate(self, _args: dict[str, Any]) -> dict[str, Any]:
        reply = dict(self._dirty_rate)
        until = reply.pop("_until", None)
        if until is not None and self.world.clock.now() >= until:
            reply["status"] = "measured"
            calc = float(reply["calc-time"])
            distinct = self.dirty_rate_bytes() * calc
            if self.guest.wss_mib is not None:
                distinct = min(distinct, self.guest.wss_mib * MIB)
            reply["dirty-rate"] = int(distinct / calc / MIB)
        return reply

    def dirty_rate_bytes(self) -> float:
        """Bytes per second the guest dirties: the host's knob if set, else its workload's rate."""
        return (self.behaviour.dirty_rate_mib_s or self.guest.rate_mib_s) * MIB

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
        return {"remaining": round_bytes - sent, "transferred": int(ram["_sent_before"] + sent / ram["_ratio"]),
                "normal": (ram["_pages_before"] + sent) // PAGE}  # fmt: skip

    def _stream_mismatch(self, destination: StreamEnd) -> str | None:
        """QEMU cannot read a multifd stream the destination was not set up for."""
        mine, theirs = self.capabilities.get("multifd", False), destination.capabilities.get("multifd", False)
        if mine != theirs:
            return f"multifd is {'on' if mine else 'off'} here but {'on' if theirs else 'off'} on the destination"
        if mine:
            for key in ("multifd-channels", "multifd-compression"):
                if self.parameters[key] != destination.parameters[key]:
                    return f"{key} {self.parameters[key]} here, {destination.parameters[key]} on the destination"
        return None

    def _rates(self) -> tuple[float, float]:
        """(bytes/s on the wire, bytes/s of guest pages) under this QEMU's policies."""
        wire = float(self.parameters.get("max-bandwidth") or DEFAULT_BANDWIDTH)
        multifd = self.capabilities.get("multifd", False)
        if self.behaviour.stream_cap_mib_s > 0:
            streams = int(self.parameters["multifd-channels"]) if multifd else 1
            wire = min(wire, self.behaviour.stream_cap_mib_s * MIB * streams)
        compressed = self.capabilities.get("xbzrle", False) or (
            multifd and self.parameters["multifd-compression"] != "none"
        )
        return wire, wire * (self.behaviour.compression_ratio if compressed else 1.0)

    def _throttle(self, pct: int, dirtied: float, sent: float, high_rounds: int) -> tuple[int, int]:
        """QEMU's auto-converge after a dirty-bitmap sync: a round that dirtied more than the
        trigger threshold of what it sent counts; from the second such round on, the vCPUs are
        throttled at the initial percentage, then one increment more per round, up to the maximum.
        Returns (throttle %, high rounds so far)."""
        if not self.capabilities.get("auto-converge") or sent <= 0:
            return pct, high_rounds
        if dirtied <= sent * int(self.parameters["throttle-trigger-threshold"]) / 100:
            return pct, high_rounds
        high_rounds += 1
        if high_rounds < 2:
            return pct, high_rounds
        step = int(self.parameters["cpu-throttle-initial"]) if pct == 0 else pct + int(
            self.parameters["cpu-throttle-increment"])  # fmt: skip
        return min(step, int(self.parameters["max-cpu-throttle"])), high_rounds

    async def _precopy(self, uri: str) -> None:
        clock = self.world.clock
        started = clock.now()
        destination = await self.world.connect(uri)
        if destination is None or not destination.alive:
            self._end("failed", "Failed to connect socket: Connection refused")
            return
        refused = self._tls_refusal(destination)
        if refused is not None:  # the destination stays inmigrate, listening, as QEMU's does
            self._end("failed", refused)
            return
        mismatch = self._stream_mismatch(destination)
        if mismatch is not None:
            self._end("failed", f"Unable to read the migration stream: {mismatch}")
            return
        self._status("active")
        wire, page_rate = self._rates()
        ratio = page_rate / wire
        limit_s = float(self.parameters.get("downtime-limit") or DEFAULT_DOWNTIME_LIMIT_MS) / 1000
        to_send, sent, rounds, throttle, high_rounds = float(self.memory_bytes), 0.0, 0, 0, 0
        dirty_rate = self.dirty_rate_bytes()
        # what one round can leave dirty: the guest's working set at most
        dirty_cap = min(float(self.memory_bytes), (self.guest.wss_mib or float("inf")) * MIB)
        unlucky = self.behaviour.failure_rate > 0 and self.world.rng.random() < self.behaviour.failure_rate
        ram: dict[str, Any] = {"total": self.memory_bytes, "page-size": PAGE, "mbps": wire * 8 / 1e6,
                               "dirty-pages-rate": int(dirty_rate / PAGE), "_ratio": ratio}  # fmt: skip
        self.migration["ram"] = ram
        while True:
            rounds += 1
            duration = to_send / page_rate
            ram.update({"dirty-sync-count": rounds, "_round_bytes": int(to_send), "_round_started": clock.now(),
                        "_round_s": duration, "_sent_before": int(sent / ratio), "_pages_before": int(sent),
                        "remaining": int(to_send), "transferred": int(sent / ratio),
                        "normal": int(sent) // PAGE})  # fmt: skip
            if self.capabilities.get("auto-converge"):
                self.migration["cpu-throttle-percentage"] = throttle
            self.migration["expected-downtime"] = int(to_send / page_rate * 1000)
            await clock.sleep(duration)
            sent += to_send
            if self.behaviour.fail_migration or unlucky:
                self._end("failed", self.behaviour.fail_migration or "simulated failure: Unable to write to socket")
                return
            dirtied = min(dirty_rate * (1 - throttle / 100) * duration, dirty_cap)
            throttle, high_rounds = self._throttle(throttle, dirtied, to_send, high_rounds)
            ram["dirty-pages-rate"] = int(dirty_rate * (1 - throttle / 100) / PAGE)
            to_send = dirtied
            if self.behaviour.hold_precopy:
                to_send = max(to_send, float(self.memory_bytes) / 8)
            elif to_send / page_rate <= limit_s:
                break
        await self._switchover(destination, to_send, page_rate, sent, rounds, started)

    async def _switchover(self, destination: StreamEnd, left: float, bandwidth: float, sent: float, rounds: int,
                          started: float) -> None:  # fmt: skip
        clock = self.world.clock
        stopped = clock.now()
        self.runstate = RunState.FINISH_MIGRATE
        self.emit("STOP")
        if self.capabilities.get("pause-before-switchover"):
            self._continue = asyncio.Event()
            self._status("pre-switchover")
            await self._continue.wait()
            if CONTINUE_LAG_S:
                await asyncio.sleep(CONTINUE_LAG_S)
            self._status("device")
        await clock.sleep(left / bandwidth + 0.001)
        ram = self.migration["ram"]
        ram.update({"remaining": 0, "transferred": int((sent + left) / ram["_ratio"]), "dirty-sync-count": rounds + 1,
                    "normal": int(sent + left) // PAGE, "_round_bytes": 0, "_round_s": 0.0})  # fmt: skip
        downtime_ms = int((clock.now() - stopped) * 1000)
        self.migration.update({"total-time": max(int((clock.now() - started) * 1000), 1), "downtime": downtime_ms,
                               "setup-time": 1})  # fmt: skip
        if not await destination.accept():  # it went away before the last state arrived
            self.runstate = RunState.RUNNING
            self.emit("RESUME")
            self._end("failed", "Unable to write to socket: Connection reset by peer")
            return
        self.runstate = RunState.POSTMIGRATE
        self._end("completed")

    async def accept(self) -> bool:
        """The source sent the last state (a :class:`StreamEnd`): resume here."""
        self.resume_incoming()
        return True

    def resume_incoming(self) -> None:
        """The last state arrived: the destination's guest runs (paused instead, after a ``stop``;
        still loading for ever, with ``stall_incoming``)."""
        if self.behaviour.stall_incoming:
            return
        self.world.unlisten(self)
        if not self.autostart:
            self.runstate = RunState.PAUSED
            return
        self.runstate = RunState.RUNNING
        self.emit("RESUME")
        if self.behaviour.crash_after_resume:
            asyncio.get_running_loop().call_later(0.03 / self.world.clock.speed, self._guest_reset)

    def _guest_reset(self) -> None:
        if self.alive:
            self.emit("RESET", {"guest": True, "reason": "guest-reset"})


def tls_creds_of(objects: dict[str, dict[str, Any]], parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The TLS credentials object a QEMU's ``tls-creds`` parameter names, if any."""
    return objects.get(str(parameters.get("tls-creds") or ""))


def append_qemu_log(path: Path, line: str) -> None:
    """A line in a QEMU's ``-D`` log (a simulated QEMU's, here or in another simulator shard)."""
    with contextlib.suppress(OSError), path.open("a") as f:
        f.write(f"qemu-system-x86_64: {line}\n")


class StreamEnd(Protocol):
    """The destination a source's migration stream reaches: a :class:`FakeQemu` of the same
    world, or one a simulator shard serves (``testing.fleetshards``). What the source reads of it
    (its credentials, capabilities and parameters) is what QEMU's handshake and stream header
    would tell it."""

    alive: bool
    capabilities: dict[str, bool]
    parameters: dict[str, Any]
    objects: dict[str, dict[str, Any]]

    def tls_creds(self) -> dict[str, Any] | None: ...

    def log(self, line: str) -> None: ...

    async def accept(self) -> bool: ...


class RemoteStreams(Protocol):
    """Destinations outside this world (another simulator shard's), by URI."""

    async def connect(self, uri: str) -> StreamEnd | None: ...


class QemuWorld:
    """Every simulated QEMU of a fleet, so a source finds the destination listening at its URI
    (or, with ``remote``, in another process's world: the fleet simulator's shards)."""

    def __init__(self, clock: SimClock | None = None, seed: int = 0, remote: RemoteStreams | None = None) -> None:
        self.clock = clock or SimClock()
        self.remote = remote
        self.rng = random.Random(seed)  # failures at a rate are reproducible per seed
        self.processes: dict[int, FakeQemu] = {}
        self.by_socket: dict[Path, FakeQemu] = {}
        self.listening: dict[str, FakeQemu] = {}
        self._pids = itertools.count(FIRST_PID)
        self._ports = itertools.count(49152)

    def start(self, name: str, paths: VmPaths, memory_bytes: int, incoming: bool, behaviour: QemuBehaviour,
              migration_address: str, guest: Guest | None = None) -> FakeQemu:  # fmt: skip
        qemu = FakeQemu(self, next(self._pids), name, paths, memory_bytes, incoming, behaviour, migration_address,
                        guest)  # fmt: skip
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

    async def connect(self, uri: str) -> StreamEnd | None:
        """The destination listening at ``uri``, here or (with ``remote``) elsewhere; None: refused."""
        local = self.listening.get(uri)
        if local is not None or self.remote is None:
            return local
        return await self.remote.connect(uri)

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

    async def read_volume(self, export: NbdExport, size: int, tls_dir: Path | None = None) -> bytes:
        return self.volumes.get(export.export.split("/")[0], b"").ljust(size, b"\0")[:size]

    async def write_volume(self, export: NbdExport, source: Path, tls_dir: Path | None = None) -> None:
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
        guest = Guest.from_append(argv[argv.index("-append") + 1]) if "-append" in argv else Guest()
        qemu = self.world.start(name, paths, int(memory.group(1)) * unit, incoming, self.behaviour,
                                self.migration_address, guest)  # fmt: skip
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
