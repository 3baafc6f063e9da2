"""A simulated fleet served over TCP (``livemig sim``): thousands of real hostd agents over
simulated QEMU in one process, on one port, each host under ``/h/{name}``.

Every host registers with the LMO and reports its capacity as a real hostd does
(``host.api.register_with_lmo``, over one shared client), so an LMO (or several replicas) runs
against it exactly as against real hosts: placement, admission, migrations, evacuations and the
wave planner. Migrations take the time their RAM, the guest's dirty rate and the reserved
bandwidth give on a clock running ``speed`` times real time, and fail at ``failure_rate``.

A simulation, not a region: it serves plain HTTP to anyone, and its hosts register with an LMO
started ``--insecure`` (one that asks for no migration TLS).

``GET /fleet`` reports the simulation itself (hosts, VMs, migrations running, memory, CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from livemig.gctune import tune_for_service
from livemig.host import source
from livemig.host.api import register_with_lmo
from livemig.testing.fakehost import FakeFleet
from livemig.testing.fakeqemu import QemuBehaviour
from livemig.wire.base import async_http

#: how often the fleet's objects made since the last freeze are hidden from the collector
FREEZE_EVERY_S = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetConfig:
    hosts: int
    listen: str = "127.0.0.1:7900"
    prefix: str = "sim"
    memory_mib: int = 65536
    migration_bandwidth_mib_s: int = 1024
    speed: float = 10.0
    failure_rate: float = 0.0
    seed: int = 0
    lmo_url: str | None = None
    report_interval_s: float = 1.0
    sample_interval_s: float | None = None  # hostd's query-migrate sampling (None: hostd's own)
    state_dir: Path | None = None

    def names(self) -> list[str]:
        width = max(5, len(str(self.hosts - 1)))
        return [f"{self.prefix}{i:0{width}d}" for i in range(self.hosts)]


class FleetStats(BaseModel):
    hosts: int
    vms: int
    migrating: int
    registered: int
    rss_mib: float
    rss_per_host_kib: float
    cpu_s: float
    speed: float
    build_s: float
    state_dir: str  # the hosts' VM records (removed when the simulation stops)


def build(config: FleetConfig) -> tuple[FakeFleet, float]:
    """The fleet and the memory (MiB) building it took."""
    host, _, port = config.listen.rpartition(":")
    before = _rss_mib()
    fleet = FakeFleet(speed=config.speed, state_dir=config.state_dir, seed=config.seed,
                      base_url=f"http://{host or '127.0.0.1'}:{port}", record_calls=False, tls=False,
                      insecure=True)  # fmt: skip
    for name in config.names():
        behaviour = QemuBehaviour(failure_rate=config.failure_rate)
        fleet.add_host(name, config.memory_mib, config.migration_bandwidth_mib_s, behaviour)
    return fleet, _rss_mib() - before


def _exit_after_cleanup(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


async def _freeze_what_lasts(every_s: float = FREEZE_EVERY_S) -> None:
    """Hide the fleet's long-lived objects from the collector as they accumulate (every VM a test
    creates lives as long as the fleet): otherwise each full collection walks all of them, and a
    fleet of tens of thousands of VMs pauses for seconds, which the LMO would see as hosts that
    stall. Cyclic garbage that exists at a freeze is kept, not collected: acceptable for a
    simulator that runs for a benchmark or a rehearsal, not for a service (see ``gctune``)."""
    while True:
        await asyncio.sleep(every_s)
        gc.freeze()


async def serve(config: FleetConfig) -> None:
    """Build the fleet, serve it, register every host with the LMO; until cancelled."""
    import uvicorn

    state = config.state_dir
    tmp = None
    if state is None:  # VM records on tmpfs when there is one: hostd fsyncs each
        tmp = tempfile.TemporaryDirectory(prefix="livemig-sim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        state = Path(tmp.name)
    config = FleetConfig(**{**config.__dict__, "state_dir": state})
    if config.sample_interval_s is not None:
        # hostd samples each outgoing migration's query-migrate every 0.1 s: a host runs one or
        # two, but this process runs a thousand hosts' (10,000 samples a second)
        source.SAMPLE_INTERVAL_S = config.sample_interval_s
    started = time.perf_counter()
    fleet, built_mib = build(config)
    build_s = time.perf_counter() - started
    registered: set[str] = set()

    @fleet.app.get("/fleet")
    async def fleet_stats() -> FleetStats:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        vms = sum(len(h.agent.vms) for h in fleet.hosts.values())
        migrating = sum(1 for q in fleet.world.processes.values() if q.migration.get("status") == "active")
        return FleetStats(hosts=len(fleet.hosts), vms=vms, migrating=migrating, registered=len(registered),
                          rss_mib=round(_rss_mib(), 1),
                          rss_per_host_kib=round(built_mib * 1024 / max(len(fleet.hosts), 1), 2),
                          cpu_s=round(usage.ru_utime + usage.ru_stime, 2), speed=config.speed,
                          build_s=round(build_s, 2), state_dir=str(state))  # fmt: skip

    tune_for_service()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(_freeze_what_lasts())]
    host, _, port = config.listen.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(fleet.app, host=host or "127.0.0.1", port=int(port), log_level="warning",
                                           log_config=None, access_log=False, lifespan="off",
                                           backlog=4096))  # fmt: skip
    # uvicorn stops on SIGTERM, then raises the signal again under the handler it found: with the
    # default one the process would end there, before the VM records below are removed (and runs
    # of the simulator would add up to all of /dev/shm's inodes)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_after_cleanup)
    try:
        async with async_http(timeout=30, pooled=True, connections=32) as http:
            if config.lmo_url:
                for fake in fleet.hosts.values():

                    def seen(name: str = fake.name) -> None:
                        registered.add(name)

                    report = register_with_lmo(fake.agent, config.lmo_url, fake.url, config.report_interval_s, http,
                                               on_registered=seen)  # fmt: skip
                    tasks.append(asyncio.create_task(report))
            await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        fleet.close()
        if tmp is not None:
            tmp.cleanup()
