"""The pre-copy history a migration keeps, and the charts drawn from it (synthetic migrations)."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image

from livemig import plots
from livemig.errors import InvalidRequest
from livemig.model.migration import (
    SAMPLE_CAP,
    ConcurrencyLimits,
    Migration,
    MigrationParams,
    MigrationSample,
    MigrationStats,
    Phase,
    TimelineEntry,
    merge_samples,
)

T0 = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
MIB = 1024 * 1024


def sample(t: float, remaining_mib: float = 100.0, rnd: int = 1, dirty_mib_s: float = 0.0, mbps: float = 0.0,
           status: str = "active") -> MigrationSample:  # fmt: skip
    return MigrationSample(at=T0 + timedelta(seconds=t), status=status, total_bytes=256 * MIB,
                           remaining_bytes=int(remaining_mib * MIB), dirty_pages_rate=int(dirty_mib_s * MIB / 4096),
                           mbps=mbps, dirty_sync_count=rnd)  # fmt: skip


def migration(end: Phase = Phase.SUCCEEDED, precopy_s: float = 6.0, share: int = 64, t0: datetime = T0,
              name: str = "web", mid: str = "m-synthetic") -> Migration:  # fmt: skip
    """A migration as the controller would have recorded it: phases, 0.1 s samples, QEMU's numbers."""
    m = Migration(id=mid, vm=name, source="A", destination="B", reserved_mib_s=share,
                  params=MigrationParams(max_bandwidth_mib_s=share))  # fmt: skip
    steps = [(Phase.PENDING, 0.0), (Phase.VALIDATING, 0.05), (Phase.PREPARING_TARGET, 0.1),
             (Phase.SYNCING_FLOWS, 1.0), (Phase.PRECOPY, 1.05)]  # fmt: skip
    m.timeline = [TimelineEntry(at=t0 + timedelta(seconds=t), phase=p) for p, t in steps]
    readings = []
    for i in range(1, int(precopy_s * 10) + 1):
        t = 1.05 + i / 10
        rnd = 1 + i // 20
        readings.append(sample(t, remaining_mib=max(0.0, 160 - i * 2.5), rnd=rnd, dirty_mib_s=20.0 if rnd > 1 else 0,
                               mbps=share * 8 * MIB / 1e6))  # fmt: skip
    readings = [r.model_copy(update={"at": r.at + (t0 - T0)}) for r in readings]
    m.record_samples(readings)
    last = 1.05 + precopy_s
    if end is Phase.SUCCEEDED:
        tail = [(Phase.SWITCHOVER, 0.0), (Phase.CUTTING_OVER, 0.02), (Phase.CLEANUP, 0.3), (Phase.SUCCEEDED, 0.9)]
        m.stats = MigrationStats(status="completed", pause_ms=11, total_ms=6100, guest_pause_ms=96.4,
                                 switchover_hook_ms=2.35, transferred_bytes=300 * MIB, rounds=4)  # fmt: skip
    else:
        tail = [(Phase.ABORTING, 0.0), (Phase.ROLLING_BACK, 0.1), (end, 0.5)]
        m.reason = "dirty rate 210 MiB/s exceeds reserved bandwidth 32 MiB/s after 2 rounds"
    m.timeline += [TimelineEntry(at=t0 + timedelta(seconds=last + dt), phase=p) for p, dt in tail]
    m.phase = end
    return m


# ---------------------------------------------------------------------- the history


def test_overlapping_reports_are_merged_once_in_order():
    held = merge_samples([], [sample(0.1), sample(0.2), sample(0.3)])
    merged = merge_samples(held, [sample(0.2), sample(0.3), sample(0.4), sample(0.5)])
    assert [s.at for s in merged] == [sample(t).at for t in (0.1, 0.2, 0.3, 0.4, 0.5)]


def test_a_ten_minute_precopy_stays_within_the_cap_evenly_with_every_round_and_the_newest_reading():
    m = Migration(id="m-long", vm="v", source="A", destination="B")
    t = 0.0
    for _poll in range(3000):  # the controller polls every ~0.2 s; hostd keeps its last 20 readings
        window = [sample(t + k / 10, remaining_mib=50, rnd=1 + int(t + k / 10) // 60) for k in range(2)]
        m.record_samples(window)
        t += 0.2
    assert len(m.samples) <= SAMPLE_CAP
    assert m.last_sample == m.samples[-1] and m.samples[-1].at == sample(t - 0.1).at, "the tail is the newest"
    assert m.samples[0].at == T0, "the beginning of the pre-copy is never thinned away"
    rounds = {s.dirty_sync_count for s in m.samples}
    assert rounds == set(range(1, 11)), "each round keeps its first reading"
    gaps = [(b.at - a.at).total_seconds() for a, b in zip(m.samples, m.samples[1:], strict=False)]
    assert max(gaps) <= 600 / (SAMPLE_CAP // 4), f"evenly spread, not only the latest readings: {max(gaps)} s"
    assert len(m.model_dump_json()) < 80_000, "small in the store, which rewrites it every pass"


def test_more_rounds_than_the_cap_still_stay_within_it():
    held: list[MigrationSample] = []
    for i in range(2000):
        held = merge_samples(held, [sample(i / 10, rnd=i + 1)], cap=100)
    assert len(held) <= 100 and held[-1].dirty_sync_count == 2000


# ---------------------------------------------------------------------- the numbers


def test_phase_spans_end_at_the_next_transition_and_a_running_one_at_now():
    m = migration()
    spans = plots.phase_spans(m)
    assert [s.phase for s in spans] == [e.phase for e in m.timeline]
    assert spans[0].seconds == pytest.approx(0.05) and spans[-1].end is None
    running = migration()
    running.timeline = running.timeline[:5]
    now = running.timeline[-1].at + timedelta(seconds=3)
    assert plots.phase_spans(running, now)[-1].seconds == pytest.approx(3.0)


def test_precopy_series_has_rounds_share_and_throughput_in_mib_s():
    m = migration(share=64)
    series = plots.precopy_series(m)
    assert len(series.t) == len(m.samples) and series.t[0] == pytest.approx(0.1)
    assert [r for _, r in series.rounds] == [1, 2, 3, 4]
    assert series.share_mib_s == 64 and series.abort_above_mib_s == pytest.approx(64 * 0.9)
    assert series.throughput_mib_s[0] == pytest.approx(64.0), "QEMU's mbps is megabits per second"
    assert series.dirty_mib_s[-1] == pytest.approx(20.0, rel=0.01)
    assert series.pause_at == pytest.approx(6.0)


def test_pause_parts_are_the_records_numbers():
    parts = {p.key: p.ms for p in plots.pause_parts(migration())}
    assert parts == {"guest_pause_ms": 96.4, "pause_ms": 11, "switchover_hook_ms": 2.35}


def test_concurrency_counts_admitted_migrations_and_ends_before_starts_at_a_tie():
    a = migration(mid="m-a")
    b = migration(mid="m-b", t0=a.timeline[-1].at - timedelta(seconds=0.05))  # admitted as a ends
    b.timeline[1].at = a.timeline[-1].at
    c = migration(mid="m-c", t0=T0 + timedelta(seconds=1))
    steps = plots.concurrency_steps([a, b, c])
    assert max(n for _, n in steps) == 2 and steps[-1][1] == 0
    queued = migration(mid="m-q")
    queued.timeline = queued.timeline[:1]  # never admitted
    assert plots.concurrency_steps([queued]) == []


# ---------------------------------------------------------------------- the pictures


def distinct_colours(png: bytes) -> int:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24) or [])


def test_the_report_png_is_a_real_picture():
    png = plots.migration_report(migration(), "png")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width >= 800 and image.height >= 800
    assert distinct_colours(png) > 50, "phases, lines and text, not a blank canvas"


def test_the_precopy_svg_draws_one_point_per_sample_and_keeps_text_as_text():
    m = migration()
    svg = plots.migration_chart(m, "precopy").decode()
    path = re.search(r'<g id="remaining">\s*<path d="([^"]+)"', svg)
    assert path is not None
    assert len(re.findall(r"[ML] ", path.group(1))) == len(m.samples)
    assert "remaining MiB" in svg and "reserved share 64 MiB/s" in svg and "round 2" in svg


def test_charts_of_an_aborted_migration_say_what_happened():
    m = migration(Phase.ABORTED, share=32)
    assert "no pause: the source never stopped" in plots.migration_chart(m, "pause").decode()
    report = plots.migration_report(m, "svg").decode()
    assert "Aborted" in report and "exceeds reserved bandwidth" in report
    m.samples, m.last_sample = [], None
    assert "no pre-copy samples yet" in plots.migration_chart(m, "precopy").decode()


def test_the_evacuation_chart_shows_every_migration_and_the_concurrency():
    ms = [migration(mid=f"m-{i}", name=f"vm{i}", t0=T0 + timedelta(seconds=2 * i)) for i in range(3)]
    for m in ms:
        m.params.limits = ConcurrencyLimits(region_total=2)
    svg = plots.evacuation_chart(ms, "evacuation e-1 of A", limit=2).decode()
    assert all(f"vm{i} → B" in svg for i in range(3)) and 'id="concurrency"' in svg and "region limit 2" in svg
    assert distinct_colours(plots.evacuation_chart(ms, "e", "png")) > 20


def test_unknown_formats_and_charts_are_refused(tmp_path):
    with pytest.raises(InvalidRequest, match=r"\.png or \.svg"):
        plots.format_for(tmp_path / "chart.jpg")
    with pytest.raises(InvalidRequest, match="unknown chart"):
        plots.migration_chart(migration(), "pie")
    assert plots.format_for(tmp_path / "A.SVG") == "svg"


def test_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.png"
    plots.write(target, b"png bytes")
    assert target.read_bytes() == b"png bytes" and [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(InvalidRequest, match="cannot write"):
        plots.write(tmp_path / "missing-dir" / "x.png", b"")
