#!/usr/bin/env python3
"""What an unarmed fault point costs: the same code paths with and without their points, same run.

Every fault point starts with ``if REGISTRY.armed:`` (an empty list when nothing is armed). This
measures, interleaved round by round so machine noise hits both sides alike:

* ``guard``: the bare test, per call, against the same function without it;
* ``step_point``: ``await fault_point(...)`` (the controller's points) against awaiting a
  coroutine that does nothing;
* ``qmp``: hostd's QMP session with its points (``FaultedQmp.execute``) against the session it
  wraps, over a QMP stand-in that answers at once (so only the wrapper is measured);
* ``service_call``: ``AsyncService.run`` (every call between services: two points, the migration
  header, the firing header) against the same method as it was before fault points, over an
  in-process ASGI app;
* ``nbd_write_4k``: blockd's NBD server, random 4 KiB writes 16 deep from one client, against the
  same server whose request parser has its fault point removed (the source of
  ``_Connection._step_request`` without the lines of the point, compiled in the same module).

Prints JSON; ``ratio`` is with-points / baseline (time per operation, or IOPS for NBD).

    .venv/bin/python bench/fault_points.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import random
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import timeit
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from livemig.faults.points import fault_point
from livemig.faults.registry import REGISTRY
from livemig.host.qmpfaults import FaultedQmp
from livemig.region.freeport import free_port
from livemig.storage.blockd import Blockd
from livemig.storage.nbd import protocol as p
from livemig.storage.nbd import server as nbd_server
from livemig.storage.nbd.client import NbdClient
from livemig.wire.base import AsyncService, Call

MIB = 1 << 20


def strip_points(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled again from its source without its fault points: every
    ``if ... .armed ...:`` line and the block under it."""
    lines = textwrap.dedent(inspect.getsource(function)).splitlines()
    kept: list[str] = []
    skip_deeper_than: int | None = None
    removed = 0
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if line.strip() and indent > skip_deeper_than:
                removed += 1
                continue
            skip_deeper_than = None
        if line.lstrip().startswith("if ") and ".armed" in line:
            skip_deeper_than = indent
            removed += 1
            continue
        kept.append(line)
    if not removed:
        raise RuntimeError(f"{function.__qualname__} has no fault point to strip")
    namespace = dict(vars(sys.modules[function.__module__]))
    exec(compile("\n".join(kept), f"<{function.__qualname__} without fault points>", "exec"), namespace)
    stripped: Callable[..., Any] = namespace[function.__name__]
    return stripped


# ---------------------------------------------------------------------- micro


def guard() -> dict[str, float]:
    registry = REGISTRY

    def with_point() -> int:
        if registry.armed:
            return 0
        return 1

    def baseline() -> int:
        return 1

    return {"with_points_ns": _ns(with_point), "baseline_ns": _ns(baseline)}


def _ns(function: Callable[[], object], number: int = 1_000_000) -> float:
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e9


def _async_ns(make: Callable[[], Coroutine[Any, Any, object]], number: int = 200_000) -> float:
    async def loop() -> float:
        started = time.perf_counter()
        for _ in range(number):
            await make()
        return time.perf_counter() - started

    return min(asyncio.run(loop()) for _ in range(3)) / number * 1e9


async def _nothing() -> bool:
    return False


def step_point() -> dict[str, float]:
    return {"with_points_ns": _async_ns(lambda: fault_point("controller.before.PreCopy")),
            "baseline_ns": _async_ns(_nothing)}  # fmt: skip


class _InstantQmp:
    connected = True

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return {"status": "running"}


def qmp() -> dict[str, float]:
    inner = _InstantQmp()
    wrapped = FaultedQmp(inner, "vm", "A", lambda: "src")  # type: ignore[arg-type]
    return {"with_points_ns": _async_ns(lambda: wrapped.execute("query-status")),
            "baseline_ns": _async_ns(lambda: inner.execute("query-status"))}  # fmt: skip


# ---------------------------------------------------------------------- a call between services


async def _run_before_fault_points(self: AsyncService, request: Call[Any]) -> Any:
    """``AsyncService.run`` as it was before fault points (the baseline)."""
    try:
        reply = await self.http.request(request.method, self.base_url + request.path, **request.request_kwargs())
    except httpx.HTTPError as exc:
        raise self._unreachable(request, exc) from exc
    return self._read(request, reply)


def service_call(calls: int, baseline_first: bool) -> dict[str, float]:
    app = FastAPI()

    @app.get("/x")
    async def x() -> dict[str, int]:
        return {"ok": 1}

    async def measure(run: Callable[[AsyncService, Call[Any]], Coroutine[Any, Any, Any]]) -> float:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            service = AsyncService("bench", "http://bench", http)
            request: Call[Any] = Call("GET", "/x", lambda r: r.status_code)
            started = time.perf_counter()
            for _ in range(calls):
                await run(service, request)
            return (time.perf_counter() - started) / calls * 1e6

    asyncio.run(measure(AsyncService.run))  # warm up both paths (imports, app start)
    runs = {"baseline_us": _run_before_fault_points, "with_points_us": AsyncService.run}
    order = list(runs) if baseline_first else list(reversed(runs))
    measured = {name: asyncio.run(measure(runs[name])) for name in order}
    return {"with_points_us": measured["with_points_us"], "baseline_us": measured["baseline_us"]}


# ---------------------------------------------------------------------- NBD


class _Baseline(nbd_server._Connection):
    _step_request = strip_points(nbd_server._Connection._step_request)


class _BaselineServer(nbd_server.NbdServer):
    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Baseline(self), host, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])


def _pipelined() -> Callable[..., float]:
    spec = importlib.util.spec_from_file_location("bench_blockd", Path(__file__).with_name("blockd.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipelined: Callable[..., float] = module.pipelined
    return pipelined


def nbd_writes(requests: int, depth: int, size_mib: int) -> dict[str, float]:
    pipelined = _pipelined()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    tmp = tempfile.TemporaryDirectory(prefix="livemig-bench-faults-")
    blockd = Blockd(Path(tmp.name))
    blockd.create_volume("bench", size_mib * MIB)
    attachment = blockd.attach("bench", "vm", "A")
    servers = {"with_points": nbd_server.NbdServer(blockd), "baseline": _BaselineServer(blockd)}
    ports = {}
    for name, server in servers.items():
        ports[name] = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", free_port()), loop).result(10)[1]
    blocks = size_mib * MIB // 4096
    offsets = [random.randrange(blocks) * 4096 for _ in range(requests)]
    iops: dict[str, list[float]] = {name: [] for name in servers}
    try:
        with NbdClient("127.0.0.1", ports["baseline"], attachment.export_name, structured=False) as client:
            pipelined(client, p.Command.WRITE, 4096, [i * 4096 for i in range(blocks)], depth)  # allocate once
        for round_ in range(5):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                with NbdClient("127.0.0.1", ports[name], attachment.export_name, structured=False) as client:
                    iops[name].append(requests / pipelined(client, p.Command.WRITE, 4096, offsets, depth))
    finally:
        for server in servers.values():
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        tmp.cleanup()
    return {"with_points_iops": statistics.median(iops["with_points"]),
            "baseline_iops": statistics.median(iops["baseline"]), "rounds": len(iops["baseline"])}  # fmt: skip


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each measurement")
    parser.add_argument("--calls", type=int, default=2000, help="service calls per round")
    parser.add_argument("--nbd-requests", type=int, default=20000, help="4 KiB writes per NBD round")
    args = parser.parse_args()
    REGISTRY.disarm_all()
    rounds: dict[str, list[dict[str, float]]] = {"guard": [], "step_point": [], "qmp": [], "service_call": []}
    for round_ in range(args.rounds):
        rounds["guard"].append(guard())
        rounds["step_point"].append(step_point())
        rounds["qmp"].append(qmp())
        rounds["service_call"].append(service_call(args.calls, baseline_first=round_ % 2 == 0))
    report: dict[str, Any] = {}
    for name, results in rounds.items():
        report[name] = {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
    report["nbd_write_4k"] = {k: round(v) for k, v in nbd_writes(args.nbd_requests, 16, 64).items()}
    for result in report.values():
        with_points, baseline = (v for k, v in result.items() if k.startswith(("with_points", "baseline")))
        result["ratio"] = round(with_points / baseline, 3)
        if "with_points_ns" in result:
            result["added_ns"] = round(with_points - baseline, 1)
    report["note"] = ("ratio = with points / baseline: time per operation (1.0 = no cost), IOPS for nbd_write_4k; "
                      "nothing is armed in either")  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
