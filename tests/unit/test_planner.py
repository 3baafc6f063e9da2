"""The wave planner's model, by hand-checkable cases: one migration's pre-copy, the policy's
verdicts, calibration from finished migrations, and the schedule under limits and budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from livemig.control.planner import calibrate, predict, schedule
from livemig.model.migration import (
    AutoConverge,
    ConcurrencyLimits,
    ConvergencePolicy,
    Migration,
    MigrationParams,
    MigrationPolicies,
    MigrationSample,
    MigrationStats,
    Phase,
)
from livemig.wire.lmo import LmoPace, PlanCalibration, PlannedMigration

EXACT = PlanCalibration(overhead_s=0.0, efficiency=1.0, payload=1.0, default_dirty_rate_mib_s=0.0, basis=0)


def test_an_idle_guest_takes_one_round_at_its_share() -> None:
    p = predict(1024, 0.0, 256, MigrationParams(), EXACT)
    assert p.verdict == "ok" and p.rounds == 1
    assert p.precopy_s == pytest.approx(4.0)  # 1024 MiB at 256 MiB/s


def test_each_round_sends_what_the_guest_dirtied_during_the_last() -> None:
    # 1024 MiB at 256 MiB/s: 4 s; 64 MiB/s dirty: 256 MiB (1 s), 64 MiB (0.25 s), 16 MiB (62.5 ms),
    # 4 MiB (15.6 ms) fits a 20 ms downtime limit: 4 rounds, then the 4 MiB in the pause
    p = predict(1024, 64.0, 256, MigrationParams(downtime_limit_ms=20), EXACT)
    assert p.rounds == 4
    assert p.precopy_s == pytest.approx(4 + 1 + 0.25 + 0.0625 + 4 / 256)
    assert p.verdict == "ok"


def test_calibration_scales_payload_bandwidth_and_adds_the_overhead() -> None:
    calibration = PlanCalibration(overhead_s=3.0, efficiency=0.5, payload=0.25, default_dirty_rate_mib_s=0, basis=4)
    p = predict(1024, 0.0, 256, MigrationParams(), calibration)
    assert p.precopy_s == pytest.approx(256 / 128)  # a quarter of RAM at half the share
    assert p.duration_s == pytest.approx(3.0 + 2.0)


def test_a_guest_dirtying_as_fast_as_its_share_is_aborted_unless_auto_converge_may_throttle() -> None:
    policy = ConvergencePolicy(min_rounds=2, rate_margin=0.9)
    aborted = predict(1024, 240.0, 256, MigrationParams(policy=policy), EXACT)
    assert aborted.verdict == "abort" and "aborts it after 2 rounds" in aborted.reason
    auto = MigrationPolicies(auto_converge=AutoConverge(enabled=True))
    throttled = predict(1024, 240.0, 256, MigrationParams(policy=policy, policies=auto), EXACT)
    assert throttled.verdict == "auto-converge" and throttled.duration_s > aborted.duration_s


def test_a_slowly_converging_guest_is_marked_for_auto_converge() -> None:
    p = predict(4096, 180.0, 256, MigrationParams(), EXACT)  # 70 % of the share: many rounds
    assert p.verdict == "auto-converge" and p.rounds > 5


def test_calibration_learns_from_successful_migrations_and_defaults_without_them() -> None:
    assert calibrate([], 12.0) == PlanCalibration(overhead_s=2.0, efficiency=1.0, payload=1.0,
                                                  default_dirty_rate_mib_s=12.0, basis=0)  # fmt: skip
    c = calibrate([finished(i, precopy_s=8.0) for i in range(3)], 0.0)
    # QEMU: 8 s moving 400 MiB (50 MiB/s of a 100 MiB/s share) of a 1024 MiB guest that dirtied nothing
    assert (c.overhead_s, c.efficiency, c.time_scale, c.basis) == (2.0, 0.5, 1.0, 3)
    assert c.payload == pytest.approx(400 / 1024, abs=0.001)


def test_the_payload_is_what_qemu_found_not_zero_even_when_re_sent_pages_moved_more() -> None:
    # the wave test's guest: 256 MiB, a quarter zero pages; 16 s moving 264 MiB, a fifth of it pages
    # the guest dirtied again after they were sent (QEMU reports no dirty rate once completed)
    m = finished(0, precopy_s=8.0)
    m.stats = MigrationStats(total_ms=16_000, transferred_bytes=264 << 20, duplicate_pages=16384, normal_pages=67584)
    m.last_sample = MigrationSample(at=m.created_at, status="completed", total_bytes=256 << 20)
    c = calibrate([m], 0.0)
    assert c.payload == pytest.approx(0.75)
    # so pre-copy at 4 MiB/s of dirtying, at a 16 MiB/s share, is predicted about as it went
    p = predict(256, 4.0, 16, MigrationParams(), c.model_copy(update={"efficiency": 1.0}))
    assert p.precopy_s == pytest.approx(16.0, rel=0.05)


def test_a_simulated_fleets_faster_clock_is_learned_and_predictions_are_in_the_lmos_seconds() -> None:
    c = calibrate([finished(i, precopy_s=0.4) for i in range(3)], 0.0)  # QEMU's 8 s went by in 0.4 s
    assert c.time_scale == pytest.approx(20.0) and c.overhead_s == pytest.approx(9.6)
    p = predict(1024, 0.0, 100, MigrationParams(), c.model_copy(update={"efficiency": 1.0, "payload": 1.0}))
    assert p.precopy_s == pytest.approx(10.24) and p.duration_s == pytest.approx(9.6 + 10.24 / 20)


def finished(i: int, precopy_s: float) -> Migration:
    """A migration that took 10 s from admission to success, ``precopy_s`` of them in pre-copy."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    m = Migration(id=f"m{i}", vm="vm", source="A", destination="B", reserved_mib_s=100)
    m.transition(Phase.VALIDATING, at=start)
    m.transition(Phase.PRECOPY, at=start + timedelta(seconds=0.2))
    m.transition(Phase.CUTTING_OVER, at=start + timedelta(seconds=0.2 + precopy_s))
    m.transition(Phase.SUCCEEDED, at=start + timedelta(seconds=10))
    m.stats = MigrationStats(total_ms=8000, transferred_bytes=400 << 20)
    m.last_sample = MigrationSample(at=start, status="completed", total_bytes=1024 << 20)
    return m


def planned(n: int, source: str = "A", destinations: tuple[str, ...] = ("B",)) -> list[PlannedMigration]:
    return [PlannedMigration(vm=f"vm{i}", source=source, destination=destinations[i % len(destinations)],
                             memory_mib=1024) for i in range(n)]  # fmt: skip


def test_the_schedule_runs_within_the_concurrency_limits() -> None:
    items = planned(4)
    total = schedule(items, MigrationParams(max_bandwidth_mib_s=256), ConcurrencyLimits(per_host_outbound=2),
                     {"A": 1024, "B": 1024}, EXACT)  # fmt: skip
    assert [i.start_s for i in items] == [0.0, 0.0, 4.0, 4.0]  # two at a time, 4 s each
    assert total == pytest.approx(8.0)


def test_the_schedule_runs_no_more_at_once_than_the_lmo_drives() -> None:
    """Twelve migrations between six pairs of hosts: the hosts would run them all at once, but two
    replicas of capacity 2 drive four at a time (the pace of a wave of thousands)."""
    items = [PlannedMigration(vm=f"vm{i}", source=f"s{i % 6}", destination=f"d{i % 6}", memory_mib=1024)
             for i in range(12)]  # fmt: skip
    budgets = {**{f"s{i}": 1024 for i in range(6)}, **{f"d{i}": 1024 for i in range(6)}}
    params = MigrationParams(max_bandwidth_mib_s=256)
    unbounded = schedule([i.model_copy() for i in items], params, ConcurrencyLimits(), budgets, EXACT)
    total = schedule(items, params, ConcurrencyLimits(), budgets, EXACT, driven_at_once=4)
    assert unbounded == pytest.approx(4.0)  # all at once, 4 s each
    assert [i.start_s for i in items] == [0.0] * 4 + [4.0] * 4 + [8.0] * 4
    assert total == pytest.approx(12.0)


def test_the_schedule_shares_a_host_budget_as_admission_does() -> None:
    items = planned(3)
    total = schedule(items, MigrationParams(max_bandwidth_mib_s=512, min_bandwidth_mib_s=256), ConcurrencyLimits(),
                     {"A": 1024, "B": 1024}, EXACT)  # fmt: skip
    # 512 + 512 fill A's outbound budget; the third waits for one to end, then gets 512
    assert [i.share_mib_s for i in items] == [512, 512, 512]
    assert [i.start_s for i in items] == [0.0, 0.0, 2.0]
    assert total == pytest.approx(4.0)


def test_a_migration_no_share_fits_is_reported_not_scheduled() -> None:
    items = planned(1)
    schedule(items, MigrationParams(min_bandwidth_mib_s=64), ConcurrencyLimits(), {"A": 32, "B": 1024}, EXACT)
    assert items[0].verdict == "cannot-move" and items[0].start_s is None


def test_planning_ten_thousand_migrations_is_quick() -> None:
    import time

    items = [PlannedMigration(vm=f"vm{i}", source=f"s{i % 1000}", destination=f"d{i % 3000}", memory_mib=2048,
                              dirty_rate_mib_s=float(i % 50)) for i in range(10_000)]  # fmt: skip
    budgets = {**{f"s{i}": 1024 for i in range(1000)}, **{f"d{i}": 1024 for i in range(3000)}}
    started = time.perf_counter()
    total = schedule(items, MigrationParams(), ConcurrencyLimits(per_host_outbound=2, per_host_inbound=2,
                                                                 region_total=1000), budgets, EXACT)  # fmt: skip
    assert time.perf_counter() - started < 10
    assert total > 0 and all(i.start_s is not None for i in items)


def test_migrations_end_no_faster_than_the_lmos_measured_pace_while_as_many_run() -> None:
    """Twelve 4 s migrations all at once: QEMU would end them all at 4 s, but an LMO measured to end
    two a second with four or more running ends them one every half second from 4 s on (each
    takes its turn when QEMU ends it, while all twelve still run), each holding its share
    meanwhile."""
    items = [PlannedMigration(vm=f"vm{i}", source=f"s{i}", destination=f"d{i}", memory_mib=1024)
             for i in range(12)]  # fmt: skip
    budgets = {**{f"s{i}": 1024 for i in range(12)}, **{f"d{i}": 1024 for i in range(12)}}
    params = MigrationParams(max_bandwidth_mib_s=256)
    pace = LmoPace(ended_per_s=2.0, held=4, replica="lmo-1", age_s=10)
    free = schedule([i.model_copy() for i in items], params, ConcurrencyLimits(), budgets, EXACT)
    total = schedule(items, params, ConcurrencyLimits(), budgets, EXACT, pace=pace)
    assert free == pytest.approx(4.0)
    ends = sorted((i.start_s or 0) + (i.duration_s or 0) for i in items)
    assert ends == pytest.approx([4.0 + 0.5 * k for k in range(12)])
    assert total == pytest.approx(9.5)


def test_a_pace_measured_with_more_running_than_the_wave_runs_does_not_bound_it() -> None:
    items = planned(4, destinations=("B", "C"))
    budgets = {"A": 4096, "B": 4096, "C": 4096}
    pace = LmoPace(ended_per_s=0.1, held=100, replica="lmo-1", age_s=10)
    total = schedule(items, MigrationParams(max_bandwidth_mib_s=256), ConcurrencyLimits(), budgets, EXACT, pace=pace)
    assert total == pytest.approx(4.0)
