"""What `livemig evacuate --plan` prints about the LMO's pace: the bound it took from it, and how
long the wave would take without it (so the operator knows more replicas would shorten it)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from livemig.cli import main
from livemig.wire.lmo import ConcurrencyLimits, LmoPace, PlanCalibration, WavePlan

CALIBRATION = PlanCalibration(overhead_s=1.0, efficiency=0.9, payload=0.8, default_dirty_rate_mib_s=10.0, basis=0)


def printed(monkeypatch: pytest.MonkeyPatch, wave: WavePlan) -> str:
    text = io.StringIO()
    monkeypatch.setattr(main, "out", Console(file=text, width=200, color_system=None))
    main._print_plan(wave, "H1")
    return text.getvalue()


def test_a_plan_the_lmos_pace_lengthened_says_what_the_hosts_alone_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    pace = LmoPace(ended_per_s=56.1, held=712, replica="lmo-1", age_s=90)
    wave = WavePlan(hosts=["H1"], limits=ConcurrencyLimits(), vms=10, total_s=195.0, calibration=CALIBRATION,
                    lmo_pace=pace, hosts_bound_s=73.4)  # fmt: skip
    text = printed(monkeypatch, wave)
    assert "predicted: the wave takes 195.0 s" in text
    assert "with 712 or more running they end at most 56.1 a second (measured by lmo-1 90 s ago)" in text
    assert "the LMO's pace, not the hosts, sets this wave's length: 73.4 s if it kept up with QEMU" in text


def test_a_plan_the_hosts_bound_says_nothing_of_the_lmo(monkeypatch: pytest.MonkeyPatch) -> None:
    wave = WavePlan(hosts=["H1"], limits=ConcurrencyLimits(), vms=10, total_s=73.4, calibration=CALIBRATION)
    text = printed(monkeypatch, wave)
    assert "predicted: the wave takes 73.4 s" in text and "pace" not in text
