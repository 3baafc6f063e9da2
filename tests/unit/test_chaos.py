"""The chaos matrix, the invariant checks and ``livemig chaos`` without a region: what the matrix
covers, that every check can fail on the evidence it is given, and the command's outputs."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from livemig.chaos import invariants
from livemig.chaos.qemus import qemu_daemons
from livemig.chaos.runner import ChaosRunner
from livemig.chaos.scenarios import STAGES, Expect, matrix, select
from livemig.cli.main import app
from livemig.faults.model import Firing
from livemig.model.migration import Migration, Phase

TARGETS = ("lmo", "hostd-src", "hostd-dst", "blockd", "vswitch", "qemu-src", "qemu-dst")
FAULT_KINDS = {"crash": "crash", "error": "error", "hang": "hang/delay", "delay": "hang/delay", "sigstop": "sigstop"}


def test_the_matrix_covers_every_stage_target_and_fault_kind() -> None:
    scenarios = matrix()
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names)) >= 60
    covered: dict[str, set[str]] = defaultdict(set)
    for s in scenarios:
        target = "vswitch" if s.target.startswith("vswitch") else s.target
        if target in TARGETS and s.fault in FAULT_KINDS:
            covered[target].add(FAULT_KINDS[s.fault])
            covered[s.stage].add(target)
    for target in TARGETS:
        assert covered[target] >= {"crash", "hang/delay", "sigstop"} - ({"sigstop"} if target == "vswitch" else set())
        assert "error" in covered[target] or target == "qemu-src"
    for stage in STAGES:
        assert len(covered[stage]) >= 5, (stage, covered[stage])
    specials = {s.target for s in scenarios}
    assert {"partition", "stale-write", "postgres", "disk-full"} <= specials
    assert {s.expected for s in scenarios} == set(Expect)
    assert len(select(scenarios, ci_only=True)) >= 15
    assert all(s.why for s in scenarios)


def test_patterns_select_by_shell_pattern_or_substring() -> None:
    names = [s.name for s in select(matrix(), ["switchover/qemu-dst/*", "partition"])]
    assert names[:2] == ["switchover/qemu-dst/crash", "switchover/qemu-dst/sigstop"]
    assert "precopy/partition/mig-link" in names and "precopy/lmo/crash" not in names


def test_livemig_chaos_lists_one_scenario_a_line() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["chaos", "--list"])
    assert listed.exit_code == 0
    assert listed.stdout.splitlines() == [s.name for s in matrix()]
    as_json = runner.invoke(app, ["chaos", "--list", "--json", "--only", "precopy/partition/*"])
    assert json.loads(as_json.stdout) == {"scenarios": ["precopy/partition/mig-link"]}
    nothing = runner.invoke(app, ["chaos", "--only", "nope/never/*"])
    assert "no scenario matches" in str(nothing.exception), "livemig's main() prints it as one line"


def test_without_a_region_it_says_how_to_get_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["chaos", "--state-dir", str(tmp_path), "--only", "prepare/lmo/crash"])
    assert "no region runs in" in str(result.exception) and "--own-region" in str(result.exception)


class _NoNamespaces:
    """A region that cannot give namespace hosts: the scenario says so as its outcome."""

    def missing(self, need: str) -> str | None:
        return "needs namespace hosts (root: livemig up --netns)" if need == "netns" else None


def test_a_scenario_the_region_cannot_run_says_why() -> None:
    scenario = next(s for s in matrix() if s.name == "precopy/partition/mig-link")
    result = ChaosRunner(_NoNamespaces(), Path("/nonexistent")).run(scenario)  # type: ignore[arg-type]
    assert result.actual == "not run: needs namespace hosts (root: livemig up --netns)"
    assert result.expected == "Succeeded" and not result.passed


# ------------------------------------------------------------------ the checks can fail


def test_the_sampler_flags_two_running_qemus_and_counts_the_gap() -> None:
    sampler = invariants.RunstateSampler("web")
    sampler.observe(invariants.Sample(100.0, {"A:1": "running", "B:2": "inmigrate"}))
    sampler.observe(invariants.Sample(100.2, {"A:1": "postmigrate", "B:2": "running"}))
    assert sampler.report.violations == [], "a paused source and a running destination is fine"
    sampler.observe(invariants.Sample(100.4, {"A:1": "running", "B:2": "running"}))
    assert len(sampler.report.violations) == 1 and "A:1, B:2" in sampler.report.violations[0]
    sampler.observe(invariants.Sample(100.6, {"A:1": "paused"}))
    sampler.observe(invariants.Sample(101.9, {"A:1": "paused"}))
    assert round(sampler.report.longest_without_running_s, 3) == 1.3 and sampler.report.max_running == 2


def migration(phase: Phase, *phases: Phase) -> Migration:
    m = Migration(id="m-1", vm="web", source="A", destination="B", phase=phase, reason="" if phase is Phase.SUCCEEDED
                  else "because")  # fmt: skip
    for p in phases:
        m.transition(p)
    return m


def test_placement_after_success_rollback_and_loss() -> None:
    done = migration(Phase.SUCCEEDED, Phase.CUTTING_OVER, Phase.CLEANUP, Phase.SUCCEEDED)
    one_on_b = invariants.Sample(0, {"B:2": "running"})
    assert invariants.check_placement(done, "B", "running", one_on_b, lost=False) == []
    assert invariants.check_placement(done, "A", "running", invariants.Sample(0, {"A:1": "running"}), lost=False)
    failed = migration(Phase.FAILED, Phase.ROLLING_BACK, Phase.FAILED)
    both = invariants.Sample(0, {"A:1": "running", "B:2": "inmigrate"})
    problems = invariants.check_placement(failed, "A", "running", both, lost=False)
    assert any("exactly one running QEMU" in p for p in problems)
    only_a = invariants.Sample(0, {"A:1": "running"})
    assert invariants.check_placement(failed, "A", "running", only_a, lost=False) == []
    assert invariants.check_placement(failed, "A", None, invariants.Sample(0, {"B:9": "running"}), lost=True)
    assert invariants.check_terminal(migration(Phase.PRECOPY), 240) == ["migration m-1 is still PreCopy after 240 s"]
    assert invariants.check_terminal(Migration(id="m", vm="v", source="A", destination="B", phase=Phase.FAILED), 1)


def test_guest_volume_and_stale_write_checks() -> None:
    assert invariants.check_guest((True, "ok"), (True, "ok"), {"sent": 40, "received": 40, "error": None}) == []
    assert len(invariants.check_guest((False, "page 7"), (False, "crc"), {"sent": 9, "received": 8})) == 3
    mine = {"id": "b1", "vm": "web", "host": "B", "rejected_writes": 0, "fenced": False}
    assert invariants.check_volume("web", "B", [mine], "b1") == []
    left = {"id": "a1", "vm": "web", "host": "A", "rejected_writes": 3, "fenced": True}
    assert invariants.check_volume("web", "B", [mine, left], "b1") == ["attachments left behind: a1 on A"]
    assert len(invariants.check_volume("web", "B", [{**mine, "rejected_writes": 1}], "a1")) == 2
    assert invariants.check_stale_write(rejected=1, landed=False) == []
    assert len(invariants.check_stale_write(rejected=0, landed=True)) == 2


def test_every_firing_must_be_in_the_timeline() -> None:
    m = migration(Phase.SUCCEEDED)
    now = datetime.now(UTC)
    firing = Firing(id="hostd:B:1:1", seq=1, at=now, service="hostd", point="hostd.dst.launch", action="delay:1")
    missing = "fault firings missing from the timeline: hostd.dst.launch (hostd)"
    assert invariants.check_firings(m, [firing]) == [missing]
    assert m.record_firing(firing) and not m.record_firing(firing)
    assert invariants.check_firings(m, [firing]) == []
    earlier = firing.model_copy(update={"id": "x", "at": now - timedelta(hours=1)})
    m.record_firing(earlier)
    assert m.timeline[0].fault == earlier, "firings go in time order"


def test_a_stale_write_that_cannot_be_held_lets_the_migration_go_on(tmp_path: Path) -> None:
    """The scenario holds the LMO before Cleanup until the stale write is released; when there is
    no write to hold, the hold is released at once (not left to the 240 s bound) and the run says why."""
    from types import SimpleNamespace

    from livemig.chaos.runner import Armed, Run
    from livemig.chaos.scenarios import Arm

    scenario = next(s for s in matrix() if s.name == "precopy/stale-write/blockd")
    m = migration(Phase.PRECOPY)
    m.last_sample = SimpleNamespace(transferred_bytes=1 << 20)  # type: ignore[assignment]
    env = SimpleNamespace(lmo=SimpleNamespace(migration=lambda _id: m), source_export=lambda _host: None)
    runner = ChaosRunner(env, tmp_path)  # type: ignore[arg-type]
    released: list[str] = []
    runner._release = lambda armed: released.append(armed.id)  # type: ignore[method-assign]
    run = Run(scenario, "A", "B", migration=m)
    run.armed.append(Armed(Arm("lmo", "controller.before.Cleanup", "hang"), "lmo", "hold-1"))
    assert runner._stale_write(run) is None
    assert released == ["hold-1"]
    assert run.violations == ["no NBD export recorded for chaosvm on A"]


def test_no_qemu_daemon_of_a_vm_that_does_not_exist() -> None:
    assert qemu_daemons("no-such-vm-anywhere") == []


def test_the_json_rows_and_the_markdown_table() -> None:
    from livemig.chaos.scenarios import Result
    from livemig.cli.chaos import as_json, markdown

    results = [
        Result("precopy/blockd/crash", "Succeeded", "Succeeded", True, 9.24, "Succeeded: migrated; restarted blockd"),
        Result(
            "cutover/qemu-dst/crash",
            "Failed: VM lost",
            "rolled back",
            False,
            21.0,
            "Failed: ...",
            ["two QEMUs ran VM chaosvm at 12:00:00.000: A:1, B:2"],
        ),
        Result("precopy/partition/mig-link", "Succeeded", "not run: needs namespace hosts", True, 0.0, "why"),
    ]
    rows = json.loads(as_json(results))["scenarios"]
    assert [sorted(r) for r in rows] == [sorted(["scenario", "expected", "actual", "invariants_held", "seconds",
                                                 "detail"])] * 3  # fmt: skip
    assert rows[1]["invariants_held"] is False and "two QEMUs ran" in rows[1]["detail"]
    table = markdown(results, "livemig chaos --own-region", 1.5)
    assert "Produced by `livemig chaos --own-region` on " in table and "1 of 2 run passed" in table
    assert "| `cutover/qemu-dst/crash` | Failed: VM lost | rolled back | **no** | 21 |" in table
