"""``livemig chaos``: the fault matrix against a region, with real guests, judged by the invariants.

Against the running local region (``livemig up``), or with ``--own-region`` a throwaway one made for
it (namespace hosts, blockd on a size-limited disk and, with ``--db``, PostgreSQL, as far as this
machine allows). Prints one row per scenario: what must happen, what happened, whether every
invariant held, how long it took. Every scenario's faults are undone afterwards, even when the
scenario fails; the chaos VM, its volume and its network are removed at the end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from livemig.chaos.scenarios import Result, Scenario, matrix, select
from livemig.errors import LivemigError
from livemig.region.local import Region, default_state_dir

err = Console(stderr=True)


def list_scenarios(patterns: list[str] | None, ci_only: bool) -> list[str]:
    return [s.name for s in select(matrix(), patterns, ci_only)]


def own_region(state_dir: Path, db_url: str | None, say: Any) -> Region:
    """A region made for the matrix: namespace hosts and a 256 MiB disk for blockd as root."""
    region = Region(state_dir)
    root = os.geteuid() == 0
    say(f"starting a region in {state_dir} ({'namespace hosts, blockd on a 256 MiB tmpfs' if root else 'loopback'})")
    region.up(("A", "B"), accel=os.environ.get("LIVEMIG_ACCEL", "auto"), db_url=db_url, netns=root,
              migration_bandwidth_mib_s=256, blockd_disk_mib=256 if root else None)  # fmt: skip
    return region


def run_matrix(region: Region, scenarios: list[Scenario], say: Any, work_dir: Path) -> list[Result]:
    """Run ``scenarios`` in order against ``region``; cleans up after itself whatever happens."""
    from livemig.chaos.environment import ChaosEnv
    from livemig.chaos.runner import ChaosRunner

    env = ChaosEnv(region, say=say)
    results: list[Result] = []
    try:
        env.setup()
        runner = ChaosRunner(env, work_dir)
        for index, scenario in enumerate(scenarios, 1):
            say(f"[{index}/{len(scenarios)}] {scenario.name} (expect {scenario.expected.value})")
            result = runner.run(scenario)
            results.append(result)
            mark = "ok" if result.passed or result.actual.startswith("not run") else "FAILED"
            say(f"    {mark}: {result.actual}, invariants {'held' if result.invariants_held else 'VIOLATED'}, "
                f"{result.seconds:.0f} s" + "".join(f"\n      - {v}" for v in result.violations))  # fmt: skip
    finally:
        env.teardown()
    return results


def table(results: list[Result]) -> Table:
    out = Table(title="livemig chaos")
    for column in ("scenario", "expected", "actual", "invariants held", "seconds"):
        out.add_column(column, no_wrap=column in ("scenario", "seconds"), overflow="fold")
    for r in results:
        held = "yes" if r.invariants_held else "[red]NO[/]"
        actual = r.actual if r.passed or r.actual.startswith("not run") else f"[red]{r.actual}[/]"
        out.add_row(r.scenario, r.expected, actual, held, f"{r.seconds:.0f}")
    return out


def as_json(results: list[Result]) -> str:
    rows: list[dict[str, Any]] = [
        {"scenario": r.scenario, "expected": r.expected, "actual": r.actual, "invariants_held": r.invariants_held,
         "seconds": r.seconds, "detail": "; ".join([r.detail, *r.violations]) if r.violations else r.detail}
        for r in results
    ]  # fmt: skip
    return json.dumps({"scenarios": rows}, indent=2)


def markdown(results: list[Result], command: str, minutes: float) -> str:
    """The table as Markdown, with the command that produced it and when (for docs/)."""
    ran = [r for r in results if not r.actual.startswith("not run")]
    lines = [
        "# The chaos matrix",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({len(results)} scenarios, "
        f"{sum(r.passed for r in ran)} of {len(ran)} run passed, {minutes:.0f} min).",
        "",
        "| scenario | expected | actual | invariants held | seconds | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        detail = "; ".join([r.detail, *r.violations]).replace("|", "/").replace("\n", " ")
        held = "yes" if r.invariants_held else "**no**"
        lines.append(f"| `{r.scenario}` | {r.expected} | {r.actual} | {held} | {r.seconds:.0f} | {detail} |")
    return "\n".join(lines) + "\n"


def chaos(state_dir: Path | None, only: list[str] | None, ci_only: bool, own: bool, db_url: str | None,
          print_json: bool, quiet: bool, markdown_path: Path | None = None) -> int:  # fmt: skip
    """Run the matrix; the exit status is 0 only if every scenario that ran passed."""
    scenarios = select(matrix(), only, ci_only)
    if not scenarios:
        raise LivemigError(f"no scenario matches {only}: see livemig chaos --list")

    def say(line: str) -> None:
        if not quiet:
            err.print(line, highlight=False)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="livemig-chaos-") as tmp:
        if own:
            region = own_region(Path(tmp) / "region", db_url, say)
        else:
            region = Region(state_dir or default_state_dir())
            if region.running() is None:
                raise LivemigError(f"no region runs in {region.state_dir}: start one with `livemig up` "
                                   "(as root: --netns --blockd-disk-mib 256) or pass --own-region")  # fmt: skip
        try:
            results = run_matrix(region, scenarios, say, Path(tmp))
        finally:
            if own:
                region.down()
    if print_json:
        sys.stdout.write(as_json(results) + "\n")
    else:
        Console().print(table(results))
    ran = [r for r in results if not r.actual.startswith("not run")]
    passed = sum(r.passed for r in ran)
    minutes = (time.monotonic() - started) / 60
    say(f"{passed} of {len(ran)} scenarios passed ({len(results) - len(ran)} not run) in {minutes:.1f} min")
    if markdown_path is not None:
        command = os.environ.get("LIVEMIG_CHAOS_COMMAND") or " ".join(["livemig", *sys.argv[1:]])
        markdown_path.write_text(markdown(results, command, minutes))
    return 0 if passed == len(ran) else 1
