"""The wave planner against a real evacuation: two hosts, four real guests (QEMU, TCG) leaving
host A, planned with `livemig evacuate A --plan --measure` before anything moves, then run with
`livemig evacuate A`; the prediction is within 30 % of what happened.

The planner learns what its model cannot know (the time a migration spends outside pre-copy, the
bandwidth pre-copy reaches, how much of a guest's RAM travels) from recent migrations. A fresh
region has none, so two guests of the same kind are migrated first, two at a time as the wave
will run them: what an operator's fleet would already have in its history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.guest.workload import workload_vm_spec
from livemig.model import Migration, MigrationParams, Phase
from livemig.region.local import Region
from livemig.testing.processes import qemu_pids_running
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
WAVE = [f"wave{i}" for i in range(4)]
CALIBRATION = ["calib0", "calib1"]
#: each migration's reserved share: small enough that pre-copy, which the model predicts from the
#: guest's size and dirty rate, is most of a migration's time
SHARE_MIB_S = 16
LIMITS = ["--per-host-outbound", "2", "--per-host-inbound", "2", "--region-total", "2"]


def cli(state_dir: Path, *args: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", *args, "--json", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_planned_evacuation_of_four_guests_takes_what_the_plan_said(tmp_path: Path, guest_image: object) -> None:
    region = Region(tmp_path)
    config = region.up(("A", "B"))
    try:
        with LmoClient(config.lmo_url) as lmo:
            for name in [*CALIBRATION, *WAVE]:
                lmo.create_vm(workload_vm_spec(memory_mib=256, rate=4, wss_mib=128, name=name), host="A")
            for name in [*CALIBRATION, *WAVE]:
                lmo.wait_for_console(name, "LIVEMIG HB", timeout=180)
            calibration = [lmo.migrate(name, "B", MigrationParams(max_bandwidth_mib_s=SHARE_MIB_S))
                           for name in CALIBRATION]  # fmt: skip
            for m in calibration:
                assert lmo.wait(m.id, timeout=300).phase is Phase.SUCCEEDED
            share = ["--max-bandwidth", str(SHARE_MIB_S)]
            plan = cli(tmp_path, "evacuate", "A", "--plan", "--measure", *LIMITS, *share)
            (tmp_path / "plan.json").write_text(json.dumps(plan, indent=1))  # what a failure is read from
            assert plan["vms"] == 4 and plan["measured"] == 4 and plan["verdicts"] == {"ok": 4}, plan["verdicts"]
            assert plan["calibration"]["basis"] == 2
            items = plan["items"]
            assert {i["destination"] for i in items} == {"B"} and {i["vm"] for i in items} == set(WAVE)
            assert all(i["dirty_rate_source"] == "measured" and 0 < i["dirty_rate_mib_s"] < SHARE_MIB_S for i in items)
            assert lmo.migrations(active=True) == [] and {lmo.vm(n).host for n in WAVE} == {"A"}, "nothing moved"
            report = cli(tmp_path, "evacuate", "A", *LIMITS, *share)
            (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
            migrations = [Migration.model_validate(m) for m in report["migrations"]]
            assert [m.phase for m in migrations] == [Phase.SUCCEEDED] * 4, [(m.vm, m.reason) for m in migrations]
            assert all(m.guest_check == "ok" for m in migrations)
            comparison = report["comparison"]
            assert comparison["actual_s"] is not None and comparison["error"] is not None
            assert abs(comparison["error"]) <= 0.30, (
                f"predicted {comparison['predicted_s']:.1f} s (plan: {plan['total_s']:.1f} s), took "
                f"{comparison['actual_s']:.1f} s: {comparison['items']}"
            )
            assert abs(comparison["predicted_s"] - plan["total_s"]) <= 0.15 * plan["total_s"], "the same model twice"
            for name in WAVE:
                assert lmo.vm(name).host == "B" and len(qemu_pids_running(name)) == 1
    finally:
        region.down()
