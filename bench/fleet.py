#!/usr/bin/env python3
"""The LMO at fleet scale: the real control plane against thousands of simulated hosts.

Starts LMO replicas (``livemig lmo``: API, controller, store on SQLite or PostgreSQL) and one
simulated fleet (``livemig sim``: a real hostd agent per host over simulated QEMU, migrations as
long as RAM, dirty rate and the reserved bandwidth make them on a sped-up clock, failures at a
chosen rate), each its own process, talking real HTTP. Then, as a user would:

1. every host registers and reports its capacity; VMs are created through the API until the fleet
   holds ``--vms`` (sizes and dirty rates drawn from a fixed mix);
2. API latency (create VM, create migration, list, show) is sampled on the full fleet, first idle,
   then with ``--concurrent`` migrations kept running, while the controller's passes are read from
   each replica (``GET /controller``: pass time against migrations held) and every process's CPU
   from /proc;
3. on PostgreSQL, the same backlog of migrations is driven by one replica and by ``--replicas``
   (each with ``--capacity``): migrations finished per second, each replica's share and CPU;
4. a wave evacuating ``--wave`` of the hosts is planned (``POST /evacuations/plan``, timed), then
   run; its progress over time is plotted (``--plot``) and the plan is compared with what happened.

The baseline, in the same run: every latency is also measured on a fleet of ``--baseline-hosts``
hosts (one hundredth), so what grows with the fleet shows. Prints JSON.

    flock /tmp/livemig-heavy.lock .venv/bin/python bench/fleet.py --hosts 10000 --vms 100000 \\
        --concurrent 1000 --db postgresql --replicas 3 --plot docs/fleet-wave.png
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from livemig.control.controller import STEP_CONCURRENCY
from livemig.model import VmSpec
from livemig.model.migration import TERMINAL_PHASES, Migration, Phase
from livemig.plots import admitted_span, phase_spans
from livemig.region.freeport import consecutive_free_ports, free_ports
from livemig.region.proc import die_with_parent, wait_gone
from livemig.wire import timing
from livemig.wire.base import async_http

TERMINAL = ("Succeeded", "Failed", "Aborted", "Cancelled")
#: the VM mix: (memory MiB, working set MiB, dirty MiB/s, weight) — most guests idle-ish, a few busy
MIX = [(1024, 512, 2, 30), (2048, 1024, 8, 30), (4096, 2048, 20, 25), (8192, 4096, 60, 10), (4096, 3072, 400, 5)]
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: migrations of a throughput phase whose timelines are read for where their life went
LIFE_SAMPLE = 200
#: where a controller pass's time went, as GET /controller splits it
PASS_SPLIT = ("read_s", "admit_s", "step_s", "save_s")
#: seconds after which the concurrent phase may ask to move a VM again (its migration has ended,
#: or the request is refused with 409 and costs only the call)
REUSE_AFTER_S = 60.0
#: the concurrent phase's requests in flight at once replacing migrations that ended (as a wave's
#: controller-side creation would, not a burst of 32 clients a second; the ramp uses 32)
TOP_UP_CONCURRENCY = 8
#: sampled calls between two top-ups while the API is sampled under load
SAMPLE_CHUNK = 25


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (every reported number was measured)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 3)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99),
            "max_ms": percentile(values, 100)}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores: user, nice, system, irq, softirq,
    steal), so a phase's busy cores show whether the machine, not the LMO, set its pace."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def waited_seconds(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a core (the scheduler's
    ``run_delay``, /proc/PID/task/*/schedstat): CPU time says how much work a process did, this
    says how long the machine's cores kept it from doing it."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def machine_stalled_seconds() -> float | None:
    """Seconds in which at least one task on the machine waited for a core (pressure stall
    information, /proc/pressure/cpu ``some``; None where the kernel has none). Its rate is the
    share of the phase that the machine's cores were short."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
        return int(some.rsplit("total=", 1)[1]) / 1e6
    return None


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


# ---------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    drives: bool = True  # an LMO replica that drives migrations (not an API replica, capacity 0)
    #: seconds it may take to stop after SIGTERM before it is killed (the fleet removes its VM
    #: records from tmpfs as it stops: killed, it would leave them, and runs add up to all the inodes)
    grace_s: float = 15.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """Its process and those it started (a sharded simulator's other shards)."""
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            return [self.pid, *(int(c) for c in children)]
        return [self.pid]

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            if not wait_gone(self.popen.pid, self.grace_s):
                os.kill(self.popen.pid, signal.SIGKILL)
                wait_gone(self.popen.pid, 5)
        self.popen.wait()


@dataclass
class Harness:
    """The processes of one run: LMO replicas and the simulated fleet."""

    workdir: Path
    db_url: str
    replicas: list[Proc] = field(default_factory=list)
    fleet: Proc | None = None

    def start_lmo(self, name: str, capacity: int, concurrency: int) -> Proc:
        (port,) = free_ports(1)
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "livemig.cli.main", "lmo", "--listen", f"127.0.0.1:{port}", "--db", self.db_url,
             "--replica", name, "--capacity", str(capacity), "--concurrency", str(concurrency),
             "--log-level", "warning", "--insecure"],  # the simulator is plain HTTP (testing/fleetserver.py)
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log, drives=capacity > 0)
        wait_http(proc, "/healthz", 60)
        self.replicas.append(proc)
        return proc

    def start_fleet(self, args: argparse.Namespace, hosts: int, prefix: str) -> Proc:
        port = consecutive_free_ports(args.sim_shards)
        log = self.workdir / f"fleet-{prefix}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "livemig.cli.main", "sim", "--hosts", str(hosts), "--prefix", prefix,
             "--shards", str(args.sim_shards),
             "--lmo", self.replicas[0].url, "--listen", f"127.0.0.1:{port}", "--speed", str(args.speed),
             "--failure-rate", str(args.failure_rate), "--memory-mib", str(args.host_memory),
             "--migration-bandwidth", str(args.host_bandwidth), "--report-interval", str(args.report_interval),
             "--sample-interval", str(args.sample_interval), "--seed", str(args.seed)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        self.fleet = Proc("fleet", popen, f"http://127.0.0.1:{port}", log, grace_s=300.0)
        wait_http(self.fleet, "/fleet", 600)
        return self.fleet

    def stop(self) -> None:
        for proc in [*self.replicas, *([self.fleet] if self.fleet else [])]:
            proc.stop()
        self.replicas, self.fleet = [], None

    def running(self) -> list[Proc]:
        """The replicas and the fleet whose processes still run."""
        return [p for p in [*self.replicas, *([self.fleet] if self.fleet else [])] if p.popen.poll() is None]

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each replica and the fleet, of this benchmark's own process, and of the
        whole machine (``machine``: everything, PostgreSQL included; its rate is busy cores)."""
        return {**{p.name: sum(cpu_seconds(pid) for pid in p.pids()) for p in self.running()},
                "benchmark": cpu_seconds(os.getpid()), "machine": machine_busy_seconds()}  # fmt: skip

    def waited(self) -> dict[str, float]:
        """Seconds each replica, the fleet and this benchmark waited for a core, and (``machine``)
        the seconds in which anything on the machine did (PostgreSQL included)."""
        stalled = machine_stalled_seconds()
        return {
            **{p.name: sum(waited_seconds(pid) for pid in p.pids()) for p in self.running()},
            "benchmark": waited_seconds(os.getpid()),
            **({"machine": stalled} if stalled is not None else {}),
        }


def rates(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict[str, float]:
    """Seconds per second of each process between two readings (of ``Harness.cpu``/``waited``)."""
    return {k: round((after[k] - before.get(k, 0)) / elapsed, 3) for k in after}


def wait_http(proc: Proc, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.name} exited: {proc.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{proc.name} did not answer {path} within {timeout:.0f} s")


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh store: a SQLite file, or a PostgreSQL database created for this run."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'lmo.db'}"
        return
    admin = kind if kind.startswith("postgresql+") else os.environ.get("LIVEMIG_TEST_POSTGRES_URL")
    if not admin:
        admin = subprocess.run(
            ["bash", "scripts/postgres.sh"], capture_output=True, text=True, check=True
        ).stdout.strip()
    from sqlalchemy import create_engine, text

    name = f"livemig_fleet_{os.getpid()}_{random.randrange(1 << 30)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        _drop(engine, name)
        engine.dispose()


def _drop(engine: Any, name: str, attempts: int = 10) -> None:
    """Drop the run's database; never lose the run over it. ``WITH (FORCE)`` cannot end a session
    of another role (an autovacuum worker on a database just written a hundred thousand rows),
    so it is retried, and in the end left behind with a warning."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            with engine.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            return
        except SQLAlchemyError as exc:
            if attempt == attempts - 1:
                print(f"warning: database {name} left behind: {exc.__class__.__name__}", file=sys.stderr)
            else:
                time.sleep(3.0)


# ---------------------------------------------------------------------- the user's side


class LmoRefused(RuntimeError):
    """The LMO refused a call the run needs: the run stops, and says why without a traceback."""


class Lmo:
    """An async client of the LMO API that records the latency of every call by name, and where
    the LMO says the call's time went (its ``Server-Timing``: the store, the hosts' hostd)."""

    def __init__(self, urls: list[str], connections: int = 64) -> None:
        self.urls = urls
        self.http = async_http(httpx.Timeout(120.0, connect=10.0), pooled=True, connections=connections)
        self.latency: dict[str, list[float]] = {}
        self.parts: dict[str, list[dict[str, float]]] = {}
        self._next = 0

    def url(self) -> str:
        self._next = (self._next + 1) % len(self.urls)
        return self.urls[self._next]

    async def call(self, name: str, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        started = time.perf_counter()
        reply = await self.http.request(method, self.url() + path, **kwargs)
        self.latency.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        self.parts.setdefault(name, []).append(timing.parse(reply.headers.get("server-timing", "")))
        if reply.status_code not in ok:
            raise LmoRefused(f"{method} {path}: {reply.status_code} {reply.text[:300]}")
        return reply.json() if reply.content else None

    def take(self, name: str) -> list[float]:
        self.parts.pop(name, None)
        return self.latency.pop(name, [])

    def take_split(self, name: str) -> dict[str, Any]:
        """The latency of ``name``'s calls with where it went, then forgotten: the summary, and
        of each call the time its hosts took to answer (``hostd``, the sum of the LMO's calls to
        them) and the rest (the LMO's own part: the store, its work and its waits for a core)."""
        parts = self.parts.pop(name, [])
        latency = self.latency.pop(name, [])
        hosts = [p.get("hostd", 0.0) for p in parts]
        return summary(latency) | {
            "hostd": summary(hosts),
            "store": summary([p.get("store", 0.0) for p in parts]),
            "lmo_own": summary([total - host for total, host in zip(latency, hosts, strict=True)]),
        }

    async def close(self) -> None:
        await self.http.aclose()


def migration_request(vm: str, destination: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"vm": vm, "destination": destination, "params": {"max_bandwidth_mib_s": args.share}}


def vm_spec(index: int, rng: random.Random) -> VmSpec:
    memory, wss, rate, _ = rng.choices(MIX, weights=[m[3] for m in MIX])[0]
    return VmSpec(name=f"vm{index:06d}", memory_mib=memory, workload={"wss_mib": wss, "rate_mib_s": rate})


async def request_migrations(lmo: Lmo, label: str, names: list[str], hosts: list[str], rng: random.Random,
                             args: argparse.Namespace, concurrency: int) -> list[str]:  # fmt: skip
    """POST /migrations for each of ``names`` to a host drawn at random, ``concurrency`` at a time,
    timed under ``label``; 409 (moving already) and 502 (its host did not answer) are the LMO's
    answers, not the benchmark's failures. The ids of the migrations created."""
    replies = await bounded(concurrency, [lambda vm=vm: lmo.call(label, "POST", "/migrations", ok=(201, 409, 502),
                                                       json=migration_request(vm, rng.choice(hosts), args))
                                for vm in names])  # fmt: skip
    return [r["id"] for r in replies if isinstance(r, dict) and "id" in r]


async def bounded(concurrency: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def wait_registered(lmo: Lmo, fleet: Proc, hosts: int, timeout: float = 900) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        stats = (await lmo.http.request("GET", fleet.url + "/fleet")).json()
        if stats["registered"] >= hosts:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise SystemExit(f"only {stats['registered']} of {hosts} hosts registered within {timeout:.0f} s")


async def seed(lmo: Lmo, first: int, count: int, rng: random.Random, concurrency: int) -> float:
    specs = [vm_spec(first + i, rng) for i in range(count)]
    started = time.monotonic()
    await bounded(concurrency, [lambda s=s: lmo.call("seed_vm", "POST", "/vms", json={"spec": s.model_dump()})
                                for s in specs])  # fmt: skip
    return count / (time.monotonic() - started)


async def sample_api(lmo: Lmo, vms: list[str], hosts: list[str], rng: random.Random, n: int, tag: str,
                     next_vm: list[int], share: int,
                     between: Callable[[], Awaitable[Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """``n`` of each call, one at a time (latency, not throughput): create VM, create migration,
    list, show; ``between`` (untimed, e.g. replacing the migrations that ended) runs after every
    :data:`SAMPLE_CHUNK` calls, never beside one."""
    calls = 0

    async def one(name: str, method: str, path: str, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if between is not None and calls % SAMPLE_CHUNK == 0:
            await between()
        return await lmo.call(name, method, path, **kwargs)

    created: list[str] = []
    for _ in range(n):
        spec = vm_spec(next_vm[0], rng)
        next_vm[0] += 1
        await one("create_vm", "POST", "/vms", json={"spec": spec.model_dump()})
        created.append(spec.name)
    # the fleet stays as seeded: what was created for the sample goes again (not timed)
    await bounded(8, [lambda name=name: lmo.call("delete_vm", "DELETE", f"/vms/{name}", ok=(204,)) for name in created])
    lmo.take("delete_vm")
    migrations: list[str] = []
    for vm in rng.sample(vms, min(n, len(vms))):
        request = {"vm": vm, "destination": rng.choice(hosts), "params": {"max_bandwidth_mib_s": share}}
        reply = await one("create_migration", "POST", "/migrations", ok=(201, 409), json=request)
        if reply and "id" in reply:
            migrations.append(reply["id"])
    for _ in range(n):
        await one("list", "GET", "/migrations", params={"active": True, "limit": 100})
    for migration in rng.sample(migrations, min(n, len(migrations))) or []:
        await one("show", "GET", f"/migrations/{migration}")
    return {op: lmo.take_split(op) | {"during": tag} for op in ("create_vm", "create_migration", "list", "show")}


async def controller_passes(lmo: Lmo, harness: Harness) -> list[dict[str, Any]]:
    status = []
    for proc in harness.replicas:
        status.append((await lmo.http.request("GET", proc.url + "/controller")).json())
    return status


async def counts(lmo: Lmo) -> dict[str, int]:
    return dict(await lmo.call("counts", "GET", "/migrations/counts"))


# ---------------------------------------------------------------------- phases


async def concurrent_phase(lmo: Lmo, harness: Harness, vms: list[str], hosts: list[str], rng: random.Random,
                           args: argparse.Namespace, next_vm: list[int]) -> dict[str, Any]:  # fmt: skip
    """Keep ``--concurrent`` migrations active for ``--duration`` seconds; sample the API and the
    controller meanwhile."""
    target, started = args.concurrent, time.monotonic()
    shuffled = list(vms)
    rng.shuffle(shuffled)
    idle = collections.deque(shuffled)
    moving: collections.deque[tuple[float, str]] = collections.deque()  # (asked at, VM)

    async def top_up(concurrency: int) -> int:
        active = (await counts(lmo)).get("active", 0)
        now = time.monotonic()
        while moving and now - moving[0][0] > REUSE_AFTER_S:  # moved by now (or refused): may go again
            idle.appendleft(moving.popleft()[1])
        names = [idle.pop() for _ in range(min(max(0, target - active), len(idle)))]
        moving.extend((now, vm) for vm in names)
        await request_migrations(lmo, "create_migration_load", names, hosts, rng, args, concurrency)
        return active

    # the ramp: POSTing a thousand migrations takes a while; the phase is measured once they run,
    # or once the number running stops growing (what this LMO can hold at the rate it finishes)
    ramp: list[int] = []
    while time.monotonic() - started < args.ramp_timeout:
        ramp.append(await top_up(32))
        if ramp[-1] >= 0.9 * target or (len(ramp) > 10 and ramp[-1] <= ramp[-11]):
            break
        await asyncio.sleep(1.0)
    ramp_s, started = time.monotonic() - started, time.monotonic()
    lmo.take("create_migration_load")
    cpu0, waited0, finished0 = harness.cpu(), harness.waited(), (await counts(lmo)).get("finished", 0)
    samples = []
    passes: list[dict[str, Any]] = []
    api: dict[str, Any] = {}
    sampled_among: list[int] = []
    # a sampled call is the only API call while it runs: the migrations that end meanwhile are
    # replaced between chunks of the sample (replacing them beside it would add ~50 POST
    # /migrations a second to the calls measured); the migrations active at each chunk's end
    # are reported

    async def between() -> None:
        sampled_among.append(await top_up(TOP_UP_CONCURRENCY))

    while time.monotonic() - started < args.duration:
        active = await top_up(TOP_UP_CONCURRENCY)
        samples.append({"t": round(time.monotonic() - started, 1), "active": active})
        if not api and time.monotonic() - started > args.duration / 3:
            sampled_among.append(active)
            api = await sample_api(lmo, vms, hosts, rng, args.samples, "concurrent migrations", next_vm, args.share,
                                   between)  # fmt: skip
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - started
    cpu1, waited1, finished1 = harness.cpu(), harness.waited(), (await counts(lmo)).get("finished", 0)
    create_latency = lmo.take("create_migration_load")
    for status in await controller_passes(lmo, harness):
        passes.extend({"replica": status["replica"], "held": p["held"], "stepped": p["stepped"],
                       "deferred": p.get("deferred", 0), "acting": p.get("acting", 0), "seconds": p["seconds"],
                       **{k: p.get(k, 0.0) for k in PASS_SPLIT}}
                      for p in status["passes"])  # fmt: skip
    drivers = [p for p in harness.replicas if p.drives]
    held = [p for p in passes if p["held"] >= 0.8 * args.concurrent / len(drivers)]
    return {
        "replicas": len(drivers),
        "api_replicas": len(harness.replicas) - len(drivers),
        "target_active": target,
        "ramp_s": round(ramp_s, 1),
        "ramp_active": ramp[-1] if ramp else 0,
        "active_p50": percentile([s["active"] for s in samples], 50),
        "finished_per_s": round((finished1 - finished0) / elapsed, 2),
        "create_migration_under_load": summary(create_latency),
        "api_under_load": api,
        "active_during_api_sample": {"min": min(sampled_among, default=None), "p50": percentile(sampled_among, 50)},
        "controller_pass": {
            **pass_summary(held),
            "held_p50": percentile([p["held"] for p in held], 50),
            "by_held": pass_curve(passes),
        },
        "cpu_s_per_s": rates(cpu0, cpu1, elapsed),
        "waited_for_core_s_per_s": rates(waited0, waited1, elapsed),
    }


def pass_summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Controller passes summed up: how many, their time, what they stepped and deferred, and
    where their time went (``GET /controller``'s split)."""

    def p50(key: str) -> float | None:
        return percentile([p[key] for p in passes], 50)

    return {"passes": len(passes), "p50_s": p50("seconds"), "p99_s": percentile([p["seconds"] for p in passes], 99),
            "stepped_p50": p50("stepped"), "acting_p50": p50("acting"), "deferred_p50": p50("deferred"),
            "split_p50_s": {k: p50(k) for k in PASS_SPLIT}}  # fmt: skip


def pass_curve(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Passes against migrations held, in buckets of 100."""
    buckets: dict[int, list[dict[str, Any]]] = {}
    for p in passes:
        buckets.setdefault(int(p["held"]) // 100 * 100, []).append(p)
    return [{"held": k, **pass_summary(v)} for k, v in sorted(buckets.items())]


async def drain(lmo: Lmo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await counts(lmo)).get("active", 0) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)


async def use_replicas(lmo: Lmo, harness: Harness, prefix: str, count: int, capacity: int,
                       args: argparse.Namespace) -> None:  # fmt: skip
    """Run exactly ``count`` replicas named ``prefix``-N with ``capacity`` (the others stop: a
    replica on the store takes its part of the migrations)."""
    for proc in [p for p in harness.replicas if not p.name.startswith(prefix)]:
        proc.stop()
        harness.replicas.remove(proc)
    while len(harness.replicas) < count:
        harness.start_lmo(f"{prefix}-{len(harness.replicas) + 1}", capacity, args.step_concurrency)
    lmo.urls = [p.url for p in harness.replicas]
    await asyncio.sleep(6)  # a lease's time: every replica seen by the others, a stopped one's leases free


async def cancel_active(lmo: Lmo) -> None:
    active = await lmo.call("active", "GET", "/migrations", params={"active": True})
    await bounded(32, [lambda m=m: lmo.call("cancel", "POST", f"/migrations/{m['id']}/cancel", ok=(202, 409))
                       for m in active])  # fmt: skip
    lmo.take("active")
    lmo.take("cancel")


async def throughput_phase(lmo: Lmo, harness: Harness, vms: list[str], hosts: list[str], rng: random.Random,
                           args: argparse.Namespace, replicas: int) -> dict[str, Any]:  # fmt: skip
    """A backlog of migrations, driven by ``replicas`` replicas of ``--capacity`` each: finished per
    second over ``--window`` seconds, each replica's share and CPU; then the rest is cancelled."""
    await use_replicas(lmo, harness, "tp", replicas, args.capacity, args)
    backlog = rng.sample(vms, min(args.backlog, len(vms)))
    before = {s["replica"]: s["finished"] for s in await controller_passes(lmo, harness)}
    chosen = set(backlog)
    waiting = [vm for vm in vms if vm not in chosen]
    rng.shuffle(waiting)

    created: list[str] = []

    async def queue(names: list[str]) -> None:
        created.extend(await request_migrations(lmo, "backlog", names, hosts, rng, args, 32))

    await queue(backlog)
    cpu0, waited0, started = harness.cpu(), harness.waited(), time.monotonic()
    finished0 = (await counts(lmo)).get("finished", 0)
    queued_min = replicas * args.capacity  # never starved: a replica always finds its capacity's worth
    while time.monotonic() - started < args.window:
        short = queued_min - (await counts(lmo)).get("Pending", 0)
        if short > 0:
            await queue([waiting.pop() for _ in range(min(short, len(waiting)))])
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    cpu1, waited1, finished1 = harness.cpu(), harness.waited(), (await counts(lmo)).get("finished", 0)
    lmo.take("backlog")
    status = await controller_passes(lmo, harness)
    shares = {s["replica"]: s["finished"] - before.get(s["replica"], 0) for s in status}
    lives = await migration_lives(lmo, rng.sample(created, min(LIFE_SAMPLE, len(created))))
    await cancel_active(lmo)
    await drain(lmo, 600)
    return {
        "replicas": replicas,
        "capacity_each": args.capacity,
        "finished_per_s": round((finished1 - finished0) / elapsed, 2),
        "finished_by_replica": shares,
        "held_by_replica": {s["replica"]: s["held"] for s in status},
        "pass_p50_s_by_replica": {s["replica"]: percentile([p["seconds"] for p in s["passes"]], 50) for s in status},
        "cpu_s_per_s": rates(cpu0, cpu1, elapsed),
        "waited_for_core_s_per_s": rates(waited0, waited1, elapsed),
        "life": lives,
    }


async def migration_lives(lmo: Lmo, ids: list[str]) -> dict[str, Any]:
    """Where a driven migration's life went: of those among ``ids`` that succeeded, the seconds
    from admission (Validating) to Succeeded (``plots.admitted_span``), and the p50 of each
    phase's time on their timelines (``plots.phase_spans``, a phase's spans summed), so a slower
    life with more replicas shows where it slowed."""
    held: list[float] = []
    succeeded: list[Migration] = []
    reads = [functools.partial(lmo.call, "life", "GET", f"/migrations/{i}") for i in ids]
    for reply in await bounded(8, reads):
        m = Migration.model_validate(reply)
        admitted = admitted_span(m)
        if m.phase is not Phase.SUCCEEDED or admitted is None:
            continue
        held.append((admitted[1] - admitted[0]).total_seconds())
        succeeded.append(m)
    lmo.take("life")
    return {"succeeded": len(held), "held_p50_s": percentile(held, 50), "held_p90_s": percentile(held, 90),
            "phase_p50_s": phase_p50s(succeeded)}  # fmt: skip


def phase_p50s(migrations: Sequence[Migration]) -> dict[str, float | None]:
    """The p50 over ``migrations`` of the time each spent in each non-terminal phase (a phase
    entered twice counts its spans summed, ``plots.phase_spans``)."""
    phases: dict[str, list[float]] = collections.defaultdict(list)
    for m in migrations:
        spent: dict[str, float] = collections.defaultdict(float)
        for span in phase_spans(m):
            if span.phase not in TERMINAL_PHASES:
                spent[span.phase.value] += span.seconds
        for phase, seconds in spent.items():
            phases[phase].append(seconds)
    return {phase: percentile(times, 50) for phase, times in phases.items()}


async def wave_phase(lmo: Lmo, harness: Harness, hosts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Plan a wave of ``--wave`` of the hosts (timed), run it, follow it, compare."""
    rng = random.Random(args.seed + 7)
    wave_hosts = sorted(rng.sample(hosts, max(1, int(len(hosts) * args.wave))))
    limits = {"per_host_outbound": args.wave_outbound, "per_host_inbound": args.wave_inbound,
              "region_total": args.concurrent}  # fmt: skip
    request = {"hosts": wave_hosts, "limits": limits, "measure": False, "params": {"max_bandwidth_mib_s": args.share}}
    started = time.perf_counter()
    plan = await lmo.call("plan", "POST", "/evacuations/plan", json=request)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    measured_plan = await lmo.call("plan_measured", "POST", "/evacuations/plan", json={**request, "measure": True})
    measured_s = time.perf_counter() - started
    if not args.run_wave:
        return {"hosts": len(wave_hosts), "vms": plan["vms"], "plan_s": round(plan_s, 2),
                "plan_measured_s": round(measured_s, 2), "predicted_s": plan["total_s"]}  # fmt: skip
    before = await counts(lmo)  # earlier phases' migrations: not the wave's
    started, wave_at = time.monotonic(), time.time()
    cpu = [(0.0, harness.cpu())]
    evacuation = await lmo.call("wave", "POST", "/evacuations", json={**request, "measure": False})
    progress: list[dict[str, Any]] = []
    while True:
        c = await counts(lmo)
        progress.append({"t": round(time.monotonic() - started, 1),
                         **{k: c.get(k, 0) - before.get(k, 0) for k in
                            ("Pending", "active", "Succeeded", "Failed", "Aborted")}})  # fmt: skip
        cpu.append((time.monotonic() - started, harness.cpu()))
        if not c.get("active", 0):
            break
        await asyncio.sleep(1.0)
    passes = [p for status in await controller_passes(lmo, harness) for p in status["passes"]]
    report = await lmo.call("wave_report", "GET", f"/evacuations/{evacuation['id']}")
    comparison = report.get("comparison") or {}
    return {
        "hosts": len(wave_hosts),
        "vms": measured_plan["vms"],
        "plan_s": round(plan_s, 2),
        "plan_measured_s": round(measured_s, 2),
        "measured_rates": measured_plan["measured"],
        "predicted_s": measured_plan["total_s"],
        "predicted_verdicts": measured_plan["verdicts"],
        "calibration": measured_plan["calibration"],
        "lmo_pace": measured_plan.get("lmo_pace"),
        "hosts_bound_s": measured_plan.get("hosts_bound_s"),
        "actual_s": comparison.get("actual_s"),
        "error": comparison.get("error"),
        "outcomes": comparison.get("outcomes"),
        "progress": progress,
        "planned_curve": planned_curve(report["evacuation"]["plan"] or {}),
        "by_thirds": wave_thirds(report),
        "by_time_thirds": wave_time_thirds(progress, cpu, passes, wave_at),
    }


def wave_time_thirds(
    progress: list[dict[str, Any]],
    cpu: list[tuple[float, dict[str, float]]],
    passes: list[dict[str, Any]],
    wave_at: float,
) -> list[dict[str, Any]]:
    """The wave's time in thirds: for each, migrations ended per second, each process's CPU, and
    the driving replica's passes (``pass_summary``), so a slower part shows what the LMO did then."""
    end = cpu[-1][0]
    thirds = []
    for n in range(3):
        lo, hi = end * n / 3, end * (n + 1) / 3
        a = min(cpu, key=lambda mark: abs(mark[0] - lo))
        b = min(cpu, key=lambda mark: abs(mark[0] - hi))
        done = [p["Succeeded"] + p["Failed"] + p["Aborted"] for p in progress if lo <= p["t"] <= hi]
        at = [{**p, **{k: p.get(k, 0.0) for k in PASS_SPLIT}} for p in passes
              if lo <= datetime.fromisoformat(p["at"]).timestamp() - wave_at < hi]  # fmt: skip
        thirds.append({"seconds": [round(lo, 1), round(hi, 1)],
                       "ended_per_s": round((done[-1] - done[0]) / (hi - lo), 1) if len(done) > 1 else None,
                       "cpu_s_per_s": rates(a[1], b[1], b[0] - a[0]) if b[0] > a[0] else None,
                       "passes": pass_summary(at)})  # fmt: skip
    return thirds


def wave_thirds(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The wave's migrations in thirds by when they were admitted: for each, when (seconds after
    the wave was created), the planned and the actual life (p50), their mean memory, and the p50
    of each phase's time, so a part of the wave that ends slower than planned shows why."""
    plan = {i["vm"]: i for i in (report["evacuation"]["plan"] or {}).get("items", [])}
    created = datetime.fromisoformat(report["evacuation"]["created_at"])
    admitted: list[tuple[float, float, Migration]] = []
    for doc in report["migrations"]:
        m = Migration.model_validate(doc)
        span = admitted_span(m)
        if span is None or not m.terminal:
            continue
        admitted.append(((span[0] - created).total_seconds(), (span[1] - span[0]).total_seconds(), m))
    admitted.sort(key=lambda a: a[0])
    thirds = []
    for n in range(3):
        part = admitted[n * len(admitted) // 3 : (n + 1) * len(admitted) // 3]
        if not part:
            continue
        planned = [plan[m.vm]["duration_s"] for _, _, m in part if plan.get(m.vm, {}).get("duration_s") is not None]
        thirds.append({
            "admitted_s": [round(part[0][0], 1), round(part[-1][0], 1)],
            "migrations": len(part),
            "memory_mib_mean": round(sum(plan.get(m.vm, {}).get("memory_mib", 0) for _, _, m in part) / len(part)),
            "planned_life_p50_s": percentile(planned, 50),
            "life_p50_s": percentile([life for _, life, _ in part], 50),
            "phase_p50_s": phase_p50s([m for _, _, m in part]),
        })  # fmt: skip
    return thirds


def planned_curve(plan: dict[str, Any], points: int = 200) -> list[list[float]]:
    """The plan's migrations ended against time, ``[[seconds, ended], ...]``, thinned to about
    ``points`` steps (each point keeps its exact count): small enough to keep in the JSON, so
    ``--replot`` redraws the wave's plot without running it again."""
    ends = sorted(i["start_s"] + i["duration_s"] for i in plan.get("items", []) if i.get("start_s") is not None)
    step = max(1, math.ceil(len(ends) / points))
    kept = [[round(ends[n - 1], 2), n] for n in range(step, len(ends) + 1, step)]
    if ends and kept[-1][1] != len(ends):
        kept.append([round(ends[-1], 2), len(ends)])
    return kept


def plot(path: Path, wave: dict[str, Any]) -> None:
    """The wave's progress over time: queued, running, done (and failed), with the plan's curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    t = [p["t"] for p in wave["progress"]]
    axes.plot(t, [p["Succeeded"] for p in wave["progress"]], label="succeeded", color="#2ca02c")
    axes.plot(t, [p["active"] - p["Pending"] for p in wave["progress"]], label="migrating", color="#2171b5")
    axes.plot(t, [p["Pending"] for p in wave["progress"]], label="queued", color="#c7ccd6")
    axes.plot(t, [p["Failed"] + p["Aborted"] for p in wave["progress"]], label="failed or aborted", color="#a50f15")
    curve = wave.get("planned_curve") or []
    if curve:
        axes.plot([t for t, _ in curve], [n for _, n in curve], label="planned: ended", color="#2ca02c",
                  linestyle="--")  # fmt: skip
    if wave.get("hosts_bound_s"):  # where the plan would end if the LMO kept up with QEMU
        axes.axvline(wave["hosts_bound_s"], color="#2ca02c", linestyle=":", label="planned, were the LMO no bound")
    axes.set_xlabel("seconds since the wave started")
    axes.set_ylabel("migrations")
    axes.set_title(f"wave: {wave['hosts']} hosts, {wave['vms']} VMs — predicted {wave['predicted_s']:.0f} s, "
                   f"took {wave['actual_s'] or float('nan'):.0f} s")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # outside: no line hidden
    figure.tight_layout()
    figure.savefig(path)


# ---------------------------------------------------------------------- the run


async def run_fleet(args: argparse.Namespace, workdir: Path, hosts: int, vms: int, *, full: bool) -> dict[str, Any]:
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"hosts": hosts, "vms": vms}
    with database(args.db, workdir) as db_url:
        harness = Harness(workdir, db_url)
        lmo = Lmo([])
        try:
            first = harness.start_lmo("lmo-1", max(2000, 2 * args.concurrent), args.step_concurrency)
            lmo.urls = [first.url]
            fleet = harness.start_fleet(args, hosts, "h")
            result["register_s"] = round(await wait_registered(lmo, fleet, hosts), 1)
            host_names = sorted(h["registration"]["name"] for h in
                                await lmo.call("hosts", "GET", "/hosts", params={"observe": False}))  # fmt: skip
            cpu0 = harness.cpu()
            started = time.monotonic()
            result["seed_vms_per_s"] = round(await seed(lmo, 0, vms, rng, args.seed_concurrency), 1)
            result["seed_s"] = round(time.monotonic() - started, 1)
            result["seed_cpu_s"] = {k: round(v - cpu0.get(k, 0), 1) for k, v in harness.cpu().items()}
            result["seed_create_vm"] = summary(lmo.take("seed_vm"))
            stats = (await lmo.http.request("GET", fleet.url + "/fleet")).json()
            result["fleet"] = stats | {"rss_per_vm_kib": round((stats["rss_mib"] * 1024) / max(stats["vms"], 1), 1)}
            result["lmo_rss_mib"] = round(rss_mib(first.pid), 1)
            names = [f"vm{i:06d}" for i in range(vms)]
            next_vm = [vms]
            result["api_idle"] = await sample_api(
                lmo, names, host_names, rng, args.samples, "idle", next_vm, args.share
            )
            await drain(lmo, 600)
            if not full:
                return result
            if args.concurrent_replicas > 1:  # the deployment for a wave: replicas share it (and the API)
                await use_replicas(lmo, harness, "lmo", args.concurrent_replicas, max(2000, 2 * args.concurrent), args)
            if args.api_replicas:  # the users' calls go to replicas that drive nothing (docs/fleet.md)
                api_replicas = [harness.start_lmo(f"api-{i + 1}", 0, args.step_concurrency)
                                for i in range(args.api_replicas)]  # fmt: skip
                lmo.urls = [p.url for p in api_replicas]
            result["concurrent"] = await concurrent_phase(lmo, harness, names, host_names, rng, args, next_vm)
            await drain(lmo, 900)
            for proc in harness.replicas[1:]:  # back to lmo-1 alone
                proc.stop()
            harness.replicas, lmo.urls = harness.replicas[:1], [first.url]
            if db_url.startswith("postgresql") and args.replicas > 1:
                result["throughput"] = [await throughput_phase(lmo, harness, names, host_names, rng, args, 1)]
                result["throughput"].append(
                    await throughput_phase(lmo, harness, names, host_names, rng, args, args.replicas)
                )
                one, many = result["throughput"][0]["finished_per_s"], result["throughput"][1]["finished_per_s"]
                result["replica_speedup"] = round(many / one, 2) if one else None
                await use_replicas(lmo, harness, "wave", 1, max(2000, 2 * args.concurrent), args)
            result["wave"] = await wave_phase(lmo, harness, host_names, args)
            result["lmo_rss_mib_end"] = {p.name: round(rss_mib(p.pid), 1) for p in harness.replicas}
        finally:
            await lmo.close()
            harness.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10000)
    parser.add_argument("--vms", type=int, default=100000)
    parser.add_argument("--concurrent", type=int, default=1000, help="migrations kept active")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of the concurrent phase")
    parser.add_argument("--db", default="sqlite", help="sqlite | postgresql | a postgresql+psycopg:// admin URL")
    parser.add_argument("--replicas", type=int, default=3, help="replicas in the throughput phase (PostgreSQL)")
    parser.add_argument("--capacity", type=int, default=2000, help="migrations each replica drives at most")
    parser.add_argument("--step-concurrency", type=int, default=STEP_CONCURRENCY)
    parser.add_argument(
        "--concurrent-replicas",
        type=int,
        default=1,
        help="replicas sharing the concurrent phase's migrations and API calls (PostgreSQL)",
    )
    parser.add_argument("--api-replicas", type=int, default=0,
                        help="API replicas (--capacity 0) taking the concurrent phase's calls")  # fmt: skip
    parser.add_argument("--ramp-timeout", type=float, default=300.0,
                        help="seconds the concurrent phase may take to reach 90 %% of --concurrent")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=3000,
                        help="migrations queued as the window opens (then kept at replicas x capacity)")  # fmt: skip
    parser.add_argument("--window", type=float, default=60.0, help="seconds the throughput is measured over")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--share", type=int, default=128, help="MiB/s each migration may use (max-bandwidth)")
    parser.add_argument("--failure-rate", type=float, default=0.01)
    parser.add_argument("--host-memory", type=int, default=65536, help="MiB each host offers")
    parser.add_argument("--host-bandwidth", type=int, default=1024, help="MiB/s each host reserves for migrations")
    parser.add_argument("--report-interval", type=float, default=300.0, help="seconds between a host's reports")
    parser.add_argument("--sample-interval", type=float, default=1.0,
                        help="seconds between hostd's samples of a migration (hostd's own: 0.1)")  # fmt: skip
    parser.add_argument("--sim-shards", type=int, default=1,
                        help="processes the simulated fleet is served by (livemig sim --shards)")  # fmt: skip
    parser.add_argument("--seed-concurrency", type=int, default=16)
    parser.add_argument("--samples", type=int, default=300, help="calls of each kind per latency sample")
    parser.add_argument("--wave", type=float, default=0.1, help="fraction of the hosts the wave evacuates")
    parser.add_argument("--wave-outbound", type=int, default=2)
    parser.add_argument("--wave-inbound", type=int, default=2)
    parser.add_argument("--run-wave", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--baseline-hosts", type=int, default=None, help="default: hosts / 100")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the wave's progress")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only draw --plot from a run's JSON (--out), running nothing")  # fmt: skip
    args = parser.parse_args()
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot (where to draw)")
        wave = json.loads(args.replot.read_text())["fleet"].get("wave", {})
        if not wave.get("progress"):
            parser.error(f"{args.replot} has no wave's progress to draw (a run with --no-run-wave?)")
        plot(args.plot, wave)
        return 0
    if (args.concurrent_replicas > 1 or args.api_replicas) and args.db == "sqlite":
        parser.error("--concurrent-replicas and --api-replicas need --db postgresql (replicas share the store)")
    baseline_hosts = args.baseline_hosts or max(10, args.hosts // 100)

    started = time.monotonic()
    fleet = f"the baseline's {baseline_hosts} hosts"
    try:
        with tempfile.TemporaryDirectory(prefix="livemig-fleet-") as tmp:
            workdir = Path(tmp)
            baseline_vms = baseline_hosts * args.vms // args.hosts
            baseline = asyncio.run(run_fleet(args, workdir / "baseline" if _mk(workdir / "baseline") else workdir,
                                             baseline_hosts, baseline_vms, full=False))  # fmt: skip
            fleet = f"the fleet's {args.hosts} hosts"
            result = asyncio.run(run_fleet(args, workdir / "full" if _mk(workdir / "full") else workdir, args.hosts,
                                           args.vms, full=True))  # fmt: skip
    except LmoRefused as refused:
        full = "CapacityError" in str(refused)
        hint = f": {fleet} are full (fewer --vms or --samples, or more --hosts or --baseline-hosts)" if full else ""
        print(f"fleet.py: the LMO refused a call the run needs{hint}\n  {refused}", file=sys.stderr)
        return 1
    report = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count()},
        "db": args.db if not args.db.startswith("postgresql+") else "postgresql",
        "speed": args.speed,
        "failure_rate": args.failure_rate,
        "baseline": baseline,
        "fleet": result,
        "goals": goals(result),
        "run_s": round(time.monotonic() - started, 1),
    }
    if args.plot and "wave" in result and result["wave"].get("progress"):
        plot(args.plot, result["wave"])
        report["plot"] = str(args.plot)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _mk(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return True


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked against this run."""
    concurrent = result.get("concurrent", {})
    api = concurrent.get("api_under_load", {})
    wave = result.get("wave", {})
    checks = {
        "create_vm_p99_ms<=50": (api.get("create_vm") or {}).get("p99_ms"),
        "create_migration_p99_ms<=100": (api.get("create_migration") or {}).get("p99_ms"),
        "controller_pass_p99_s<=1": concurrent.get("controller_pass", {}).get("p99_s"),
        "replicas_speedup>=2.5": result.get("replica_speedup"),
        "wave_plan_s<=10": wave.get("plan_s"),
    }
    limits = {"create_vm_p99_ms<=50": 50, "create_migration_p99_ms<=100": 100, "controller_pass_p99_s<=1": 1,
              "wave_plan_s<=10": 10}  # fmt: skip
    out: dict[str, Any] = {}
    for name, value in checks.items():
        if value is None:
            out[name] = None
        elif name == "replicas_speedup>=2.5":
            out[name] = {"value": value, "met": value >= 2.5}
        else:
            out[name] = {"value": value, "met": value <= limits[name]}
    return out


if __name__ == "__main__":
    sys.exit(main())
