#!/usr/bin/env python3
"""Total migration time against its floor, swept over guest RAM x dirty rate x reserved bandwidth:
livemig's settings vs plain QEMU defaults in every cell, alternated, same guests, same run.

The floor is what the link allows: RAM / reserved bandwidth (``floor_ms``). A guest's untouched
pages are zero pages, which QEMU sends as a flag rather than 4 KiB, so the pages that must
really cross the link are also reported (``data_floor_ms``: pages sent / bandwidth, from QEMU's
``normal`` page count). Per cell and setting: total / floor, QEMU's pause, the guest's pause,
rounds, outcome. Where a guest dirties memory faster than the bandwidth (livemig aborts), a third
setting runs livemig with auto-converge: the pause, and the throttle QEMU applied.

One guest per RAM size (the workload's dirty rate is changed through its command channel), so
the run is bounded by migrations, not boots. Writes JSON (stdout and --out) and a PNG (--png).

    .venv/bin/python bench/sweep.py                # the default grid (about 15 minutes on 2 cores, TCG)
    .venv/bin/python bench/sweep.py --quick        # one RAM size, two rates, one bandwidth: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.guest.workload import workload_vm_spec
from livemig.model import Migration, MigrationParams, MigrationPolicies, Phase
from livemig.model.migration import AutoConverge, ConvergencePolicy
from livemig.region.local import Region
from livemig.wire.lmo import LmoClient

GRID = {"memory_mib": [256, 512], "dirty_mib_s": [0, 16, 48], "bandwidth_mib_s": [32, 128]}
QUICK = {"memory_mib": [256], "dirty_mib_s": [0, 48], "bandwidth_mib_s": [32]}
WSS_MIB = 128
#: auto-converge may need many throttled rounds: judge it by the throttle, not by the per-GiB clock
PATIENT = ConvergencePolicy(completion_timeout_s_per_gib=600, no_progress_timeout_s=90)


def settings(bandwidth: int, dirty: int) -> dict[str, MigrationParams]:
    """The settings for one cell, all at the cell's reserved bandwidth (the admitted share)."""
    common = {"max_bandwidth_mib_s": bandwidth, "min_bandwidth_mib_s": min(32, bandwidth)}
    chosen = {
        "livemig": MigrationParams(**common),
        # QEMU's own: downtime-limit 300 ms, no switchover hook (its max-bandwidth is the share too)
        "qemu_defaults": MigrationParams(downtime_limit_ms=300, pause_before_switchover=False, **common),
    }
    if dirty >= 0.9 * bandwidth:  # where the judgement aborts: what auto-converge buys
        chosen["livemig_auto_converge"] = MigrationParams(
            policy=PATIENT, policies=MigrationPolicies(auto_converge=AutoConverge(enabled=True)), **common
        )
    return chosen


def row(m: Migration, memory: int, dirty: int, bandwidth: int, setting: str) -> dict[str, Any]:
    stats = m.stats
    floor_ms = memory / bandwidth * 1000
    data_floor_ms = stats.normal_pages * 4096 / (1 << 20) / bandwidth * 1000 if stats.normal_pages else None
    ok = m.phase is Phase.SUCCEEDED
    return {
        "memory_mib": memory, "dirty_mib_s": dirty, "bandwidth_mib_s": bandwidth, "setting": setting,
        "outcome": m.phase.value, "reason": "" if ok else m.reason,
        "total_ms": stats.total_ms if ok else None, "floor_ms": round(floor_ms),
        "total_over_floor": round(stats.total_ms / floor_ms, 3) if ok and stats.total_ms else None,
        "data_floor_ms": round(data_floor_ms) if data_floor_ms else None,
        "total_over_data_floor": round(stats.total_ms / data_floor_ms, 3)
        if ok and stats.total_ms and data_floor_ms else None,
        "pause_ms": stats.pause_ms if ok else None, "guest_pause_ms": stats.guest_pause_ms if ok else None,
        "rounds": stats.rounds, "transferred_mib": round(stats.transferred_bytes / (1 << 20), 1),
        "cpu_throttle_pct": stats.cpu_throttle_pct,
        "throttle_by_round": [(e.data["round"], e.data["throttle_pct"]) for e in m.timeline
                              if "throttle_pct" in e.data],
        # per throttled round: (round, throttle %, dirty MiB/s, remaining MiB) as the LMO saw them
        "rounds_seen": [(e.data["round"], e.data["throttle_pct"], e.data.get("dirty_mib_s"),
                         e.data.get("remaining_mib")) for e in m.timeline if "throttle_pct" in e.data],
        "last_sample": m.last_sample.model_dump(mode="json") if m.last_sample else None,
    }  # fmt: skip


def run_grid(grid: dict[str, list[int]], lmo: LmoClient) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for memory in grid["memory_mib"]:
        name = f"sweep{memory}"
        lmo.create_vm(workload_vm_spec(memory, 0, min(WSS_MIB, memory - 64), name=name), host="A")
        lmo.wait_for_console(name, "LIVEMIG HB", timeout=120)
        host = "A"
        for dirty in grid["dirty_mib_s"]:
            lmo.console_input(name, f"rate {dirty}")
            time.sleep(2)  # the workload settles at its new rate
            for bandwidth in grid["bandwidth_mib_s"]:
                for setting, params in settings(bandwidth, dirty).items():
                    destination = "B" if host == "A" else "A"
                    m = lmo.wait(lmo.migrate(name, destination, params).id, timeout=900)
                    rows.append(row(m, memory, dirty, bandwidth, setting))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("throttle_by_round",
                                                                                       "rounds_seen")}),
                          file=sys.stderr)  # fmt: skip
                    if m.phase is Phase.SUCCEEDED:
                        host = destination
        lmo.delete_vm(name)
    return rows


def judge_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_cell: dict[tuple[int, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_cell.setdefault((r["memory_mib"], r["dirty_mib_s"], r["bandwidth_mib_s"]), {})[r["setting"]] = r
    idle = [r for r in rows if r["dirty_mib_s"] == 0 and r["setting"] == "livemig" and r["total_over_floor"]]
    both = [(cell, s) for cell, s in by_cell.items() if s.get("livemig", {}).get("pause_ms") is not None
            and s.get("qemu_defaults", {}).get("pause_ms") is not None]  # fmt: skip
    worse = [f"{m} MiB, {d} MiB/s dirty, {b} MiB/s: livemig {s['livemig']['pause_ms']} ms vs defaults "
             f"{s['qemu_defaults']['pause_ms']} ms" for (m, d, b), s in both
             if s["livemig"]["pause_ms"] >= s["qemu_defaults"]["pause_ms"]]  # fmt: skip
    rescued = [{"cell": {"memory_mib": m, "dirty_mib_s": d, "bandwidth_mib_s": b},
                "livemig": s["livemig"]["outcome"], "auto_converge": s["livemig_auto_converge"]["outcome"],
                "pause_ms": s["livemig_auto_converge"]["pause_ms"],
                "guest_pause_ms": s["livemig_auto_converge"]["guest_pause_ms"],
                "cpu_throttle_pct": s["livemig_auto_converge"]["cpu_throttle_pct"],
                "throttle_by_round": s["livemig_auto_converge"]["throttle_by_round"]}
               for (m, d, b), s in by_cell.items() if "livemig_auto_converge" in s]  # fmt: skip
    return {
        "idle_total_over_floor_max": max((r["total_over_floor"] for r in idle), default=None),
        "idle_total_over_data_floor_max": max((r["total_over_data_floor"] or 0 for r in idle), default=None),
        "idle_within_1_15_of_floor": bool(idle) and all(r["total_over_floor"] <= 1.15 for r in idle),
        "livemig_pause_below_defaults_in_every_cell_both_converge": bool(both) and not worse,
        "cells_where_both_converge": len(both),
        "cells_where_livemig_pause_is_not_below": worse,
        "fast_dirtier_with_auto_converge": rescued,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"livemig": "tab:blue", "qemu_defaults": "tab:orange", "livemig_auto_converge": "tab:green"}
    labels = [f"{r['memory_mib']}M/{r['dirty_mib_s']}d/{r['bandwidth_mib_s']}bw" for r in rows]
    cells = list(dict.fromkeys(labels))
    width = 0.27
    for i, setting in enumerate(colors):
        picked = {label: r for label, r in zip(labels, rows, strict=True) if r["setting"] == setting}
        xs = [c + (i - 1) * width for c in range(len(cells))]
        ratio = [picked[c]["total_over_floor"] if c in picked and picked[c]["total_over_floor"] else 0 for c in cells]
        pause = [picked[c]["pause_ms"] if c in picked and picked[c]["pause_ms"] else float("nan") for c in cells]
        left.bar(xs, ratio, width, color=colors[setting], label=setting)
        right.bar(xs, pause, width, color=colors[setting], label=setting)
        for x, c in zip(xs, cells, strict=True):
            if c in picked and picked[c]["outcome"] != "Succeeded":
                left.text(x, 0.02, "abort", rotation=90, fontsize=7, ha="center", va="bottom")
    left.axhline(1.0, color="gray", lw=0.8, ls="--")
    left.axhline(1.15, color="red", lw=0.8, ls=":")
    left.set_ylabel("total / (RAM / bandwidth)")
    right.set_ylabel("QEMU pause (ms)")
    right.set_yscale("log")  # an aborted or missing cell has no bar
    for ax in (left, right):
        ax.set_xticks(range(len(cells)), cells, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("livemig vs QEMU defaults: RAM (MiB) / dirty rate (MiB/s) / reserved bandwidth (MiB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid: one RAM size, two rates")
    parser.add_argument("--out", type=Path, default=Path("sweep.json"), help="JSON written here too")
    parser.add_argument("--png", type=Path, default=Path("sweep.png"))
    args = parser.parse_args()
    grid = QUICK if args.quick else GRID
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="livemig-sweep-") as tmp:
        region = Region(Path(tmp))
        config = region.up()
        try:
            with LmoClient(config.lmo_url) as lmo:
                rows = run_grid(grid, lmo)
        finally:
            region.down()
    report = {"grid": grid, "wss_mib": WSS_MIB, "seconds": round(time.monotonic() - started),
              "goals": judge_goals(rows), "cells": rows}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    plot(rows, args.png)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
