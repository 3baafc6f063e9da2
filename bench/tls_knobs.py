#!/usr/bin/env python3
"""Does any QEMU 7.2 migration knob make the encrypted single stream cheap? Two bare QEMUs, one run.

Why this exists: QEMU's TLS channel (``io/channel-tls.c``) makes one TLS record and one ``send``
per write element, and the single stream alternates an 8-byte page header (in QEMUFile's buffer)
with a 4 KiB page queued from guest RAM (``qemu_put_buffer_async``), so the candidate knobs are
the ones that make QEMU 7.2 *copy* pages into its buffer instead, where adjacent writes merge:

* ``compress`` at ``compress-level`` 0 (zlib "stored"): every page goes through a compress thread
  whose output is copied into the stream (``qemu_put_qemu_file``); the destination needs the
  capability too (it hands each page to a decompress thread);
* ``xbzrle``: from the second round on, a page is copied (``send_async = false``), not queued;
* multifd with ``zlib`` at level 0: each channel writes a packet of pages as one buffer. QEMU 7.2
  ignores ``multifd-zlib-level`` over QMP (``migrate_params_apply`` does not copy it), so every
  QEMU here starts with ``-global migration.multifd-zlib-level=0`` (unused by the other arms).

One guest (the livemig workload, ``--memory`` MiB dirtying ``--rate`` MiB/s) migrates between two
local QEMUs over loopback TCP, ping-pong, one warm-up migration first (not counted), then
``--runs`` passes over the arms, every other pass in reverse order so drift hits all arms alike.
TLS arms use x509 credentials from a throwaway CA with ``verify-peer``, ``tls-hostname`` and
``tls-authz``, as hostd sets them. Every arm has livemig's downtime-limit (20 ms) and
max-bandwidth (2048 MiB/s). After each migration the guest's full memory check runs on the
destination. No LMO, hostd, blockd or vswitch: this measures QEMU's stream alone (bench/tls.py
measures a whole region).

    flock /tmp/livemig-heavy.lock .venv/bin/python bench/tls_knobs.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.guest.image import build_image, default_cache_dir, kernel_cmdline
from livemig.guest.workload import workload_vm_spec
from livemig.host import console
from livemig.host.qemu import TCG_RAM_TRIM_KIB, VmPaths, command_line, resolve_machine
from livemig.host.qmp import QmpSession
from livemig.model import VmSpec
from livemig.region.freeport import free_ports
from livemig.security import pki, qemu_tls

HOSTS = ("host-a", "host-b")
FINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Arm:
    """One way to run the stream: TLS or not, plus the capabilities and parameters that differ."""

    tls: bool
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


def compress(threads: int) -> tuple[dict[str, bool], dict[str, Any]]:
    return {"compress": True}, {"compress-level": 0, "compress-threads": threads, "decompress-threads": threads}


def multifd_zlib(channels: int) -> tuple[dict[str, bool], dict[str, Any]]:
    return {"multifd": True}, {"multifd-channels": channels, "multifd-compression": "zlib"}


ARMS: dict[str, Arm] = {
    "plain": Arm(False),
    "tls": Arm(True),
    "plain+compress1": Arm(False, *compress(1)),
    "tls+compress1": Arm(True, *compress(1)),
    "plain+compress2": Arm(False, *compress(2)),
    "tls+compress2": Arm(True, *compress(2)),
    "tls+xbzrle": Arm(True, {"xbzrle": True}, {"xbzrle-cache-size": 64 << 20}),
    "plain+multifd2-zlib0": Arm(False, *multifd_zlib(2)),
    "tls+multifd2-zlib0": Arm(True, *multifd_zlib(2)),
}
#: every capability an arm may turn on: each migration sets all of them, on or off, on both ends
CAPABILITIES = ("compress", "xbzrle", "multifd")


def guest_spec(memory_mib: int, rate: int) -> VmSpec:
    """The workload VM as hostd would resolve it on this QEMU (kernel boot, TCG RAM trim)."""
    spec = workload_vm_spec(memory_mib, rate, name="tlsknobs")
    assert spec.workload is not None
    image = build_image(default_cache_dir())
    append = kernel_cmdline(spec.workload.wss_mib, spec.workload.rate_mib_s)
    boot = spec.boot.model_copy(update={"kernel": str(image.kernel), "initrd": str(image.initrd), "append": append})
    return spec.model_copy(update={"machine": resolve_machine(spec.machine), "boot": boot,
                                   "ram_trim_kib": TCG_RAM_TRIM_KIB})  # fmt: skip


def credentials(work: Path) -> dict[str, tuple[Path, str]]:
    """Per host: its QEMU credentials directory and the tls-authz identity of its certificate."""
    pki.init_ca(work / "pki", "bench")
    out = {}
    for host in HOSTS:
        leaf = pki.issue(work / "pki", host, pki.Role.QEMU, [host, "127.0.0.1"])
        out[host] = (pki.qemu_tls_dir(work / "pki", host, work / f"tls-{host}"), qemu_tls.authz_identity(leaf.identity))
    return out


class Guest:
    """The one guest, on whichever QEMU holds it now."""

    def __init__(self, spec: VmSpec, work: Path) -> None:
        self.spec, self.work, self.count = spec, work, 0
        self.paths: VmPaths | None = None
        self.qmp: QmpSession | None = None

    async def launch(self, incoming: bool) -> tuple[VmPaths, QmpSession]:
        paths = VmPaths(self.work / f"qemu{self.count}")
        self.count += 1
        shutil.rmtree(paths.root, ignore_errors=True)
        paths.root.mkdir(parents=True)
        argv = [*command_line(self.spec, paths, "tcg", incoming=incoming),
                "-global", "migration.multifd-zlib-level=0"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*argv)
        if await proc.wait() != 0:
            raise RuntimeError(f"QEMU did not start: {paths.qemu_log.read_text(errors='replace')}")
        qmp = QmpSession(paths.root.name)
        await qmp.connect(paths.qmp)
        return paths, qmp

    async def boot(self) -> None:
        self.paths, self.qmp = await self.launch(incoming=False)
        deadline = time.monotonic() + 180
        while "LIVEMIG HB" not in (self.paths.console_log.read_text(errors="replace")
                                   if self.paths.console_log.exists() else ""):  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("the guest printed no heartbeat")
            await asyncio.sleep(0.5)

    async def migrate(self, arm: Arm, creds: dict[str, tuple[Path, str]], here: str, there: str) -> dict[str, Any]:
        assert self.paths is not None and self.qmp is not None
        source = self.qmp
        paths, destination = await self.launch(incoming=True)
        capabilities = [{"capability": "events", "state": True}] + [
            {"capability": c, "state": arm.capabilities.get(c, False)} for c in CAPABILITIES
        ]
        (port,) = free_ports(1)
        uri = f"tcp:127.0.0.1:{port}"
        for qmp in (destination, source):
            await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
            await qmp.execute("migrate-set-parameters", dict(arm.parameters))
        await source.execute("migrate-set-parameters", {"downtime-limit": 20, "max-bandwidth": 2048 << 20})
        if arm.tls:
            await qemu_tls.prepare_destination(destination.execute, creds[there][0], source=creds[here][1])
            await qemu_tls.prepare_source(source.execute, creds[here][0], destination_hostname=there)
        else:
            await qemu_tls.clear(source.execute)
        await destination.execute("migrate-incoming", {"uri": uri})
        with source.listener("MIGRATION") as listener:
            await source.execute("migrate", {"uri": uri})
            async for message in listener:
                event: dict[str, Any] = dict(message)
                if event["data"]["status"] in FINAL:
                    break
        reply: dict[str, Any] = await source.execute("query-migrate")
        for _ in range(50):  # QEMU fills in total-time just after the completed event
            if reply.get("status") != "completed" or reply.get("total-time"):
                break
            await asyncio.sleep(0.01)
            reply = await source.execute("query-migrate")
        if reply.get("status") != "completed":
            raise RuntimeError(f"migration {reply.get('status')}: {reply.get('error-desc')}")
        await source.execute("quit")
        await source.close()
        self.paths, self.qmp = paths, destination
        ok, said = await console.memory_check(paths.console, paths.console_log)
        ram = reply.get("ram", {})
        compression = reply.get("compression") or {}
        return {
            "status": reply.get("status"), "total_ms": reply.get("total-time"), "downtime_ms": reply.get("downtime"),
            "mbps": round(float(ram.get("mbps", 0.0))), "transferred_mb": round(ram.get("transferred", 0) / 1e6),
            "rounds": ram.get("dirty-sync-count"), "compressed_pages": compression.get("pages"),
            "compress_busy_rate": compression.get("busy-rate"), "memory_check": "ok" if ok else f"fail: {said}",
        }  # fmt: skip

    async def quit(self) -> None:
        if self.qmp is not None:
            await self.qmp.execute("quit")
            await self.qmp.close()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "completed"]

    def med(key: str) -> float | None:
        values = [float(r[key]) for r in done if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    return {
        "runs": len(rows), "completed": len(done), "checks_ok": sum(r["memory_check"] == "ok" for r in done),
        **{f"{key}_median": med(key) for key in ("total_ms", "downtime_ms", "mbps", "transferred_mb", "rounds")},
        "total_ms_all": [r["total_ms"] for r in rows], "downtime_ms_all": [r["downtime_ms"] for r in rows],
    }  # fmt: skip


async def run(arms: list[str], runs: int, memory: int, rate: int, work: Path) -> dict[str, Any]:
    creds = credentials(work)
    guest = Guest(guest_spec(memory, rate), work)
    await guest.boot()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    here = 0
    try:
        order = [arms[0]] + [a for n in range(runs) for a in (arms if n % 2 == 0 else arms[::-1])]
        for index, name in enumerate(order):
            row = await guest.migrate(ARMS[name], creds, HOSTS[here], HOSTS[1 - here])
            here = 1 - here
            print(json.dumps({"arm": name, "warm_up": index == 0, **row}), file=sys.stderr, flush=True)
            if index > 0:
                results[name].append(row)
    finally:
        await guest.quit()
    summary = {name: summarize(rows) for name, rows in results.items()}
    baseline = summary.get("plain", {}).get("total_ms_median")
    for arm in summary.values():
        total = arm["total_ms_median"]
        arm["total_vs_plain"] = round(total / baseline, 2) if total and baseline else None
    return {"arms": summary, "raw": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="migrations per arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    parser.add_argument("--rate", type=int, default=20, help="guest dirty rate, MiB/s")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if "plain" not in arms:
        arms.insert(0, "plain")  # the baseline always runs
    work = Path(tempfile.mkdtemp(prefix="livemig-tls-knobs-"))
    try:
        report = {"guest": {"memory_mib": args.memory, "dirty_rate_mib_s": args.rate}, "runs": args.runs,
                  **asyncio.run(run(arms, args.runs, args.memory, args.rate, work))}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
