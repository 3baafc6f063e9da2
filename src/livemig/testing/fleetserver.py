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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from livemig.gctune import tune_for_service
from livemig.host import source
from livemig.host.api import register_with_lmo
from livemig.region.proc import die_with_parent
from livemig.testing.fakehost import FakeFleet
from livemig.testing.fakeqemu import QemuBehaviour
from livemig.testing.fleetshards import ShardMap, ShardStreams, add_stream_routes
from livemig.wire.base import AsyncHttp, async_http

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
    shards: int = 1  # processes serving the fleet (shard j on the listen port + j)
    shard: int = 0  # which one this process is (shard 0 starts the others and answers /fleet for all)

    def names(self) -> list[str]:
        """Every host's name, the whole fleet's."""
        width = max(5, len(str(self.hosts - 1)))
        return [f"{self.prefix}{i:0{width}d}" for i in range(self.hosts)]

    @property
    def shard_map(self) -> ShardMap:
        host, _, port = self.listen.rpartition(":")
        return ShardMap(self.hosts, self.shards, host or "127.0.0.1", int(port) - self.shard)

    def served(self) -> dict[int, str]:
        """The hosts this shard serves, by their number in the fleet."""
        names = self.names()
        return {i: names[i] for i in self.shard_map.indices(self.shard)}

    def argv(self, shard: int) -> list[str]:
        """``livemig sim``'s arguments for another shard of this fleet."""
        host, _, _ = self.listen.rpartition(":")
        argv = ["sim", "--hosts", str(self.hosts), "--listen", f"{host}:{self.shard_map.base_port + shard}",
                "--prefix", self.prefix, "--memory-mib", str(self.memory_mib),
                "--migration-bandwidth", str(self.migration_bandwidth_mib_s), "--speed", str(self.speed),
                "--failure-rate", str(self.failure_rate), "--seed", str(self.seed),
                "--report-interval", str(self.report_interval_s), "--shards", str(self.shards),
                "--shard", str(shard)]  # fmt: skip
        if self.lmo_url:
            argv += ["--lmo", self.lmo_url]
        if self.sample_interval_s is not None:
            argv += ["--sample-interval", str(self.sample_interval_s)]
        return argv


class FleetStats(BaseModel):
    """The simulation's own numbers; with shards, shard 0 answers the sums over those answering."""

    hosts: int
    vms: int
    migrating: int
    registered: int
    rss_mib: float
    rss_per_host_kib: float
    cpu_s: float
    speed: float
    build_s: float
    state_dir: str  # the hosts' VM records (removed when the simulation stops); shard 0's
    shards: int = 1  # processes serving the fleet
    shards_answering: int = 1  # of them, those whose numbers are in this answer
    pids: list[int] = []  # their processes (CPU and memory of the whole simulation)

    def plus(self, other: FleetStats) -> FleetStats:
        """This shard's numbers and another's, summed."""
        return self.model_copy(update={
            "hosts": self.hosts + other.hosts, "vms": self.vms + other.vms,
            "migrating": self.migrating + other.migrating, "registered": self.registered + other.registered,
            "rss_mib": round(self.rss_mib + other.rss_mib, 1), "cpu_s": round(self.cpu_s + other.cpu_s, 2),
            "build_s": max(self.build_s, other.build_s), "shards_answering": self.shards_answering + 1,
            "pids": self.pids + other.pids,
        })  # fmt: skip


def build(config: FleetConfig, remote: ShardStreams | None = None) -> tuple[FakeFleet, float]:
    """This shard's part of the fleet and the memory (MiB) building it took."""
    host, _, port = config.listen.rpartition(":")
    before = _rss_mib()
    fleet = FakeFleet(speed=config.speed, state_dir=config.state_dir, seed=config.seed + config.shard,
                      base_url=f"http://{host or '127.0.0.1'}:{port}", record_calls=False, tls=False,
                      insecure=True, remote=remote)  # fmt: skip
    for index, name in config.served().items():
        behaviour = QemuBehaviour(failure_rate=config.failure_rate)
        fleet.add_host(name, config.memory_mib, config.migration_bandwidth_mib_s, behaviour, index=index)
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
    streams = ShardStreams(config.shard_map, config.shard) if config.shards > 1 else None
    others = _start_other_shards(config) if config.shards > 1 and config.shard == 0 else []
    fleet, built_mib = build(config, streams)
    build_s = time.perf_counter() - started
    registered: set[str] = set()
    if streams is not None:
        add_stream_routes(fleet.app, fleet.world)
    http_of: list[AsyncHttp] = []  # the client made below, for the sums over shards

    @fleet.app.get("/fleet")
    async def fleet_stats(local: bool = False) -> FleetStats:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        vms = sum(len(h.agent.vms) for h in fleet.hosts.values())
        migrating = sum(1 for q in fleet.world.processes.values() if q.migration.get("status") == "active")
        mine = FleetStats(hosts=len(fleet.hosts), vms=vms, migrating=migrating, registered=len(registered),
                          rss_mib=round(_rss_mib(), 1),
                          rss_per_host_kib=round(built_mib * 1024 / max(len(fleet.hosts), 1), 2),
                          cpu_s=round(usage.ru_utime + usage.ru_stime, 2), speed=config.speed,
                          build_s=round(build_s, 2), state_dir=str(state), shards=config.shards,
                          pids=[os.getpid()])  # fmt: skip
        if local or config.shard != 0 or not http_of:
            return mine
        for shard in range(1, config.shards):
            with contextlib.suppress(Exception):  # one not up yet (or gone) adds nothing
                reply = await http_of[0].request("GET", config.shard_map.url(shard) + "/fleet",
                                                 params={"local": "true"})  # fmt: skip
                if reply.status_code == 200:
                    mine = mine.plus(FleetStats.model_validate(reply.json()))
        return mine

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
            http_of.append(http)
            if streams is not None:
                streams.http = http
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
        _stop(others)
        fleet.close()
        if tmp is not None:
            tmp.cleanup()


def _start_other_shards(config: FleetConfig) -> list[subprocess.Popen[bytes]]:
    argvs = [[sys.executable, "-m", "livemig.cli.main", *config.argv(shard)] for shard in range(1, config.shards)]
    return [subprocess.Popen(argv, preexec_fn=die_with_parent) for argv in argvs]


def _stop(shards: list[subprocess.Popen[bytes]], grace_s: float = 60.0) -> None:
    """Each shard removes its own VM records as it stops: SIGTERM, and time to do it."""
    for shard in shards:
        if shard.poll() is None:
            shard.terminate()
    for shard in shards:
        try:
            shard.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            shard.kill()
            shard.wait()
