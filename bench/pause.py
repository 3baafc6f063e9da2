#!/usr/bin/env python3
"""Pause and total migration time: livemig's settings vs plain QEMU defaults, same guest, same run.

Starts its own region, boots the demo guest (512 MiB, dirtying --rate MiB/s), then migrates it
A<->B --runs times with each setting, interleaved (livemig, defaults, livemig, ...) so machine noise
hits both alike. Prints JSON: percentiles per setting and the ratios livemig/defaults.

Two pauses per migration: QEMU's ``downtime`` (``pause_ms``: it stops counting when the source
has sent everything) and the pause the guest saw (``guest_pause_ms``: the source's ``STOP`` to the
destination's ``RESUME``). ``where_the_pause_goes`` splits the latter into its steps (p50 per
step, ms) from QMP event times and QEMU's own trace of both QEMUs (livemig.testing.pausetrace).

    .venv/bin/python bench/pause.py --runs 10 --rate 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from livemig.guest.workload import workload_vm_spec
from livemig.host.qemu import TRACE_DIR_ENV
from livemig.model import Migration, MigrationParams, Phase
from livemig.region.local import Region
from livemig.testing.pausetrace import split_pause
from livemig.wire.lmo import LmoClient

SETTINGS = {
    "livemig": MigrationParams(),
    # QEMU's own defaults: downtime-limit 300 ms, max-bandwidth 128 MiB/s, no switchover hook
    "qemu_defaults": MigrationParams(downtime_limit_ms=300, max_bandwidth_mib_s=128, pause_before_switchover=False),
}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported number was measured)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pauses = [r["pause_ms"] for r in runs if r["pause_ms"] is not None]
    guest_pauses = [r["guest_pause_ms"] for r in runs if r["guest_pause_ms"] is not None]
    totals = [r["total_ms"] for r in runs if r["total_ms"] is not None]
    steps = sorted({step for r in runs for step in r["pause_steps_ms"]})
    return {
        "runs": len(runs),
        "succeeded": sum(r["phase"] == "Succeeded" for r in runs),
        "pause_ms_p50": percentile(pauses, 50),
        "pause_ms_p99": percentile(pauses, 99),
        "guest_pause_ms_p50": percentile(guest_pauses, 50),
        "guest_pause_ms_p99": percentile(guest_pauses, 99),
        "where_the_pause_goes": {
            step: percentile([r["pause_steps_ms"][step] for r in runs if r["pause_steps_ms"].get(step) is not None], 50)
            for step in steps
        },
        "total_ms_p50": percentile(totals, 50),
        "total_ms_p99": percentile(totals, 99),
        "rounds_p50": percentile([r["rounds"] for r in runs], 50),
        "guest_checks_ok": sum(r["guest_memory_check"] == "ok" for r in runs),
        "raw": runs,
    }


def pause_steps(m: Migration, trace_dir: Path | None) -> dict[str, float | None]:
    """The guest's pause of one migration split into its steps (livemig.testing.pausetrace)."""
    stats = m.stats
    if stats.stopped_at is None:
        return {}
    resumed = stats.stopped_at + stats.guest_pause_ms / 1000 if stats.guest_pause_ms is not None else None
    switchover = next((e.at.timestamp() for e in m.timeline if e.phase is Phase.SWITCHOVER), None)
    return split_pause(trace_dir, stats.stopped_at, resumed,
                       pre_switchover_at=switchover if stats.switchover_hook_ms is not None else None,
                       completed_at=stats.completed_at)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="migrations per setting")
    parser.add_argument("--rate", type=int, default=20, help="guest dirty rate, MiB/s")
    parser.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    parser.add_argument("--wss", type=int, default=128, help="guest working set, MiB")
    parser.add_argument("--no-trace", action="store_true", help="no QEMU trace (QMP event times only)")
    parser.add_argument("--livemig-downtime-ms", type=int, help="livemig's downtime-limit (default: its own)")
    parser.add_argument("--keep-trace", type=Path, help="write QEMU's trace files here and keep them")
    args = parser.parse_args()

    if args.livemig_downtime_ms is not None:
        SETTINGS["livemig"] = MigrationParams(downtime_limit_ms=args.livemig_downtime_ms)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        trace_dir = None if args.no_trace else args.keep_trace or Path(tmp) / "trace"
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
            os.environ[TRACE_DIR_ENV] = str(trace_dir)  # hostd passes it on to every QEMU it starts
        region = Region(Path(tmp) / "region")
        config = region.up()
        try:
            with LmoClient(config.lmo_url) as lmo:
                lmo.create_vm(workload_vm_spec(args.memory, args.rate, args.wss, name="bench"), host="A")
                lmo.wait_for_console("bench", "LIVEMIG HB", timeout=90)
                host = "A"
                for i in range(args.runs):
                    for name, params in SETTINGS.items():
                        destination = "B" if host == "A" else "A"
                        m = lmo.wait(lmo.migrate("bench", destination, params).id, timeout=600)
                        results[name].append({"pause_ms": m.stats.pause_ms, "total_ms": m.stats.total_ms,
                                              "guest_pause_ms": m.stats.guest_pause_ms,
                                              "pause_steps_ms": pause_steps(m, trace_dir),
                                              "rounds": m.stats.rounds, "phase": m.phase.value,
                                              "guest_memory_check": m.guest_check or "not run",
                                              "transferred_bytes": m.stats.transferred_bytes})  # fmt: skip
                        print(f"run {i + 1}/{args.runs} {name:13s} {host}->{destination}: "
                              f"pause {m.stats.pause_ms} ms guest pause {m.stats.guest_pause_ms} ms "
                              f"total {m.stats.total_ms} ms {m.phase.value} "
                              f"{json.dumps(results[name][-1]['pause_steps_ms'])}", file=sys.stderr)  # fmt: skip
                        if m.phase is Phase.SUCCEEDED:
                            host = destination
                lmo.delete_vm("bench")
        finally:
            region.down()
    report: dict[str, Any] = {
        "guest": {"memory_mib": args.memory, "dirty_rate_mib_s": args.rate, "wss_mib": args.wss},
        "settings": {name: params.model_dump() for name, params in SETTINGS.items()},
        **{name: summarize(runs) for name, runs in results.items()},
    }
    ours, theirs = report["livemig"], report["qemu_defaults"]
    report["ratio"] = {
        key: (round(ours[key] / theirs[key], 3) if ours[key] is not None and theirs[key] else None)
        for key in ("pause_ms_p50", "pause_ms_p99", "guest_pause_ms_p50", "total_ms_p50")
    }
    report["goal_met"] = bool(
        ours["pause_ms_p50"] is not None and ours["pause_ms_p50"] <= 20 and ours["pause_ms_p99"] <= 50
        and all(r is not None and r < 1 for r in report["ratio"].values())
    )  # fmt: skip
    report["guest_pause_goal"] = {"p50_ms": 10, "p99_ms": 20, "met": bool(
        ours["guest_pause_ms_p50"] is not None and ours["guest_pause_ms_p50"] <= 10
        and ours["guest_pause_ms_p99"] <= 20)}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if ours["succeeded"] == ours["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
