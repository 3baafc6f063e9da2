"""Charts of migrations: the one place that decides what a picture of a migration shows.

The CLI (``livemig migrations plot``, ``livemig evacuate --plot``) writes them as PNG or SVG
files and the LMO's dashboard serves them as SVG, from the same functions, so a chart in a ticket
and the chart on the dashboard never disagree. They are drawn on the server by matplotlib: one
library gives both formats, needs nothing at run time in the browser (no CDN, no vendored
JavaScript), and its SVG keeps text as text, so a page can be read and tested. matplotlib is
imported lazily (the CLI's other commands and the services' start-up do not pay for it) and only
through its object API with the Agg/SVG canvases, never ``pyplot``, so no global figure state
exists; drawing is serialised by a lock because matplotlib's caches are not thread-safe.

The numbers behind each chart come from small pure functions (``phase_spans``,
``precopy_series``, ``pause_parts``, ``concurrency_steps``) that the dashboard's tables use too.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from livemig.errors import InvalidRequest
from livemig.model.migration import TERMINAL_PHASES, Migration, MigrationSample, Phase, utcnow

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 1024 * 1024
Format = Literal["png", "svg"]
FORMATS: dict[str, Format] = {".png": "png", ".svg": "svg"}
CHARTS = ("timeline", "precopy", "pause")

# One colour per phase, shared by every chart and the dashboard's legend: the forward path in
# blues, the pause in red, the ways back in ambers and greys, and each ending in its own colour.
PHASE_COLOURS: dict[Phase, str] = {
    Phase.PENDING: "#c7ccd6",
    Phase.VALIDATING: "#9ecae1",
    Phase.PREPARING_TARGET: "#6baed6",
    Phase.SYNCING_FLOWS: "#4292c6",
    Phase.PRECOPY: "#2171b5",
    Phase.SWITCHOVER: "#d62728",
    Phase.CUTTING_OVER: "#9467bd",
    Phase.CLEANUP: "#74c476",
    Phase.SUCCEEDED: "#2ca02c",
    Phase.CANCELLING: "#bdbdbd",
    Phase.ABORTING: "#fdae6b",
    Phase.ROLLING_BACK: "#fd8d3c",
    Phase.CANCELLED: "#737373",
    Phase.ABORTED: "#e6550d",
    Phase.FAILED: "#a50f15",
}
REMAINING, DIRTY, THROUGHPUT, SHARE = "#2171b5", "#e6550d", "#31a354", "#636363"

_lock = threading.Lock()


# ---------------------------------------------------------------------- the numbers


@dataclass(frozen=True)
class PhaseSpan:
    """One timeline entry as a bar: from its transition to the next one (``end`` is None for a
    terminal phase, which has no duration)."""

    phase: Phase
    start: datetime
    end: datetime | None
    message: str

    @property
    def seconds(self) -> float:
        return 0.0 if self.end is None else (self.end - self.start).total_seconds()


def phase_spans(m: Migration, now: datetime | None = None) -> list[PhaseSpan]:
    """The timeline as spans; the current phase of a running migration lasts until ``now``."""
    spans = []
    for i, entry in enumerate(m.timeline):
        if i + 1 < len(m.timeline):
            end: datetime | None = m.timeline[i + 1].at
        else:
            end = None if entry.phase in TERMINAL_PHASES else max(now or utcnow(), entry.at)
        spans.append(PhaseSpan(entry.phase, entry.at, end, entry.message))
    return spans


@dataclass(frozen=True)
class PrecopySeries:
    """The pre-copy as a chart draws it: seconds since pre-copy began, MiB and MiB/s."""

    origin: datetime
    t: list[float]
    remaining_mib: list[float]
    dirty_mib_s: list[float]
    throughput_mib_s: list[float]
    rounds: list[tuple[float, int]]  # (t, round) where each round's first reading was taken
    share_mib_s: float | None  # the bandwidth reserved for this migration
    abort_above_mib_s: float | None  # the convergence policy aborts a dirty rate at or above this
    pause_at: float | None  # when the source paused (Switchover began)


def throughput_mib_s(sample: MigrationSample) -> float:
    """QEMU's ``mbps`` is megabits (10^6) per second."""
    return sample.mbps * 1e6 / 8 / MIB


def precopy_series(m: Migration) -> PrecopySeries:
    """Readings before QEMU sized the RAM (``setup``: no numbers yet) are left out."""
    starts = {e.phase: e.at for e in m.timeline}
    samples = [s for s in (m.samples or ([m.last_sample] if m.last_sample else [])) if s.total_bytes > 0]
    origin = starts.get(Phase.PRECOPY) or (samples[0].at if samples else m.created_at)
    if samples and samples[0].at < origin:
        origin = samples[0].at
    t = [(s.at - origin).total_seconds() for s in samples]
    rounds: list[tuple[float, int]] = []
    for when, sample in zip(t, samples, strict=True):
        if sample.dirty_sync_count and (not rounds or sample.dirty_sync_count > rounds[-1][1]):
            rounds.append((when, sample.dirty_sync_count))
    share = float(m.reserved_mib_s or m.params.max_bandwidth_mib_s)
    pause = starts.get(Phase.SWITCHOVER)
    return PrecopySeries(
        origin=origin,
        t=t,
        remaining_mib=[s.remaining_bytes / MIB for s in samples],
        dirty_mib_s=[s.dirty_rate_mib_s for s in samples],
        throughput_mib_s=[throughput_mib_s(s) for s in samples],
        rounds=rounds,
        share_mib_s=share,
        abort_above_mib_s=share * m.params.policy.rate_margin,
        pause_at=(pause - origin).total_seconds() if pause is not None else None,
    )


@dataclass(frozen=True)
class PausePart:
    key: str  # the MigrationStats field
    label: str
    ms: float | None
    explains: str


def pause_parts(m: Migration) -> list[PausePart]:
    """The pause three ways: what the guest saw (source STOP to destination RESUME, two hosts'
    clocks), QEMU's own downtime (the source's view; it can come out a little longer than the
    guest's), and the switchover hooks, which run inside QEMU's downtime."""
    s = m.stats
    return [
        PausePart("guest_pause_ms", "guest pause (STOP→RESUME)", s.guest_pause_ms,
                  "source STOP to destination RESUME: what the guest saw"),
        PausePart("pause_ms", "QEMU downtime", s.pause_ms,
                  "QEMU's own downtime: until the source had sent the last pages and device state"),
        PausePart("switchover_hook_ms", "switchover hooks", s.switchover_hook_ms,
                  "inside the downtime: pre-switchover event to migrate-continue (flow hand-off)"),
    ]  # fmt: skip


def admitted_span(m: Migration, now: datetime | None = None) -> tuple[datetime, datetime] | None:
    """From admission (entering Validating) to the end (or ``now``), the same span
    ``evacuation.peak_concurrency`` counts; None if never admitted."""
    start = next((e.at for e in m.timeline if e.phase is Phase.VALIDATING), None)
    if start is None:
        return None
    end = next((e.at for e in m.timeline if e.phase in TERMINAL_PHASES), None)
    return start, end or max(now or utcnow(), start)


def concurrency_steps(migrations: Sequence[Migration], now: datetime | None = None) -> list[tuple[datetime, int]]:
    """How many migrations ran at once, as (time, count) steps; an end before a start at a tie."""
    events: list[tuple[datetime, int]] = []
    for m in migrations:
        span = admitted_span(m, now)
        if span is not None:
            events += [(span[0], 1), (span[1], -1)]
    steps: list[tuple[datetime, int]] = []
    running = 0
    for at, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        if steps and steps[-1][0] == at:
            steps[-1] = (at, running)
        else:
            steps.append((at, running))
    return steps


# ---------------------------------------------------------------------- drawing


@contextmanager
def _drawing() -> Iterator[None]:
    import matplotlib

    with _lock, matplotlib.rc_context({
        "font.size": 8.5, "font.family": "DejaVu Sans", "axes.titlesize": 9.5, "axes.titleweight": "bold",
        "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none", "svg.hashsalt": "livemig",
        "figure.dpi": 100, "savefig.dpi": 110, "legend.fontsize": 7.5, "legend.frameon": False,
    }):  # fmt: skip
        yield


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _render(fig: Figure, fmt: Format) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": "livemig"}
    fig.savefig(buffer, format=fmt, metadata=metadata, facecolor="white")
    return buffer.getvalue()


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3]


def draw_timeline(ax: Axes, m: Migration, now: datetime | None = None) -> None:
    """The phase Gantt: one row per timeline entry, bars from each transition to the next."""
    spans = phase_spans(m, now)
    ax.set_title(f"phases of {m.id}: {m.vm} {m.source} → {m.destination}", loc="left")
    if not spans:
        ax.text(0.5, 0.5, "no timeline yet", ha="center", va="center", transform=ax.transAxes)
        return
    origin = spans[0].start
    last = max((s.end or s.start) for s in spans)
    width = max((last - origin).total_seconds(), 1e-3)
    for row, span in enumerate(spans):
        left = (span.start - origin).total_seconds()
        colour = PHASE_COLOURS[span.phase]
        if span.end is None:
            ax.plot([left], [row], marker="D", color=colour, markersize=7, zorder=3)
            label = f"{_clock(span.start)}  (+{left:.2f} s)"
        else:
            ax.barh(row, max(span.seconds, width / 400), left=left, height=0.6, color=colour, zorder=2)
            label = f"{_clock(span.start)}  {duration(span.seconds)}"
        inside = span.end is not None and span.seconds > width * 0.55
        ax.text(left + (0.01 * width if inside else span.seconds + 0.012 * width), row, label,
                va="center", ha="left", fontsize=7.5, color="white" if inside else "#333333")  # fmt: skip
    ax.set_yticks(range(len(spans)), [s.phase.value for s in spans])
    ax.invert_yaxis()
    ax.set_xlim(0, width * 1.32)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel(f"seconds since {origin:%Y-%m-%d %H:%M:%S} UTC")
    ax.grid(axis="x", color="#eeeeee", zorder=0)


def millis(value: float | None) -> str:
    """Milliseconds as QEMU and the record give them: whole numbers stay whole, others keep two
    digits (the charts and the dashboard's tables print the same text)."""
    if value is None:
        return "—"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{text} ms"


def duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def draw_precopy(ax: Axes, m: Migration) -> None:
    """Remaining MiB (left axis) against dirty rate, throughput and the reserved share (right)."""
    series = precopy_series(m)
    ax.set_title(f"pre-copy of {m.vm}: {len(series.t)} samples", loc="left")
    ax.set_xlabel("seconds since pre-copy began")
    ax.set_ylabel("remaining MiB", color=REMAINING)
    if not series.t:
        ax.text(0.5, 0.5, "no pre-copy samples yet", ha="center", va="center", transform=ax.transAxes)
        return
    rates = ax.twinx()
    rates.spines["right"].set_visible(True)
    rates.set_ylabel("MiB/s")
    (remaining,) = ax.plot(series.t, series.remaining_mib, color=REMAINING, linewidth=1.8, label="remaining MiB")
    remaining.set_gid("remaining")  # the dashboard's tests count this line's points
    ax.fill_between(series.t, series.remaining_mib, color=REMAINING, alpha=0.12, linewidth=0)
    (dirty,) = rates.plot(series.t, series.dirty_mib_s, color=DIRTY, linewidth=1.3, label="dirty rate MiB/s")
    dirty.set_gid("dirty")
    (sent,) = rates.plot(series.t, series.throughput_mib_s, color=THROUGHPUT, linewidth=1.3,
                         label="throughput MiB/s")  # fmt: skip
    sent.set_gid("throughput")
    handles = [remaining, dirty, sent]
    if series.share_mib_s is not None:
        handles.append(rates.axhline(series.share_mib_s, color=SHARE, linestyle="-", linewidth=1,
                                     label=f"reserved share {series.share_mib_s:.0f} MiB/s"))  # fmt: skip
    if series.abort_above_mib_s is not None:
        handles.append(rates.axhline(series.abort_above_mib_s, color=DIRTY, linestyle=":", linewidth=1,
                                     label=f"abort at dirty ≥ {series.abort_above_mib_s:.0f} MiB/s"))  # fmt: skip
    top = max([*series.dirty_mib_s, *series.throughput_mib_s, series.share_mib_s or 0.0]) * 1.15
    rates.set_ylim(0, max(top, 1.0))
    ax.set_ylim(0, max(max(series.remaining_mib) * 1.1, 1.0))
    right = max(max(series.t), series.pause_at or 0.0, 0.1) * 1.02
    labelled = -right
    for when, number in series.rounds:
        ax.axvline(when, color="#999999", linestyle="--", linewidth=0.7, zorder=1)
        if when - labelled >= right * 0.04:  # the last rounds come fast: label only those with room
            labelled = when
            ax.annotate(f"round {number}", (when, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                        textcoords="offset points", fontsize=7, color="#555555", va="top", rotation=90)  # fmt: skip
    if series.pause_at is not None:
        ax.axvline(series.pause_at, color=PHASE_COLOURS[Phase.SWITCHOVER], linewidth=1.2, zorder=1)
        ax.annotate("pause", (series.pause_at, 0.5), xycoords=("data", "axes fraction"), xytext=(-3, 0),
                    textcoords="offset points", fontsize=7, ha="right",
                    color=PHASE_COLOURS[Phase.SWITCHOVER])  # fmt: skip
    ax.set_xlim(0, right)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3)


def draw_pause(ax: Axes, m: Migration) -> None:
    """The pause as bars from the moment the source stopped."""
    parts = pause_parts(m)
    ax.set_title("the pause, from the moment the source stopped", loc="left")
    known = [p for p in parts if p.ms is not None]
    if not known:
        ax.text(0.5, 0.5, "no pause: the source never stopped", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    longest = max(p.ms or 0.0 for p in known)
    colours = {"guest_pause_ms": "#fcbba1", "pause_ms": PHASE_COLOURS[Phase.SWITCHOVER],
               "switchover_hook_ms": "#67000d"}  # fmt: skip
    for row, part in enumerate(parts):
        if part.ms is None:
            ax.text(0, row, "  not reported", va="center", fontsize=7.5, color="#777777")
            continue
        ax.barh(row, part.ms, height=0.6, color=colours[part.key], zorder=2, gid=f"pause-{part.key}")
        ax.text(part.ms + longest * 0.01, row, millis(part.ms), va="center", fontsize=8)
    ax.set_yticks(range(len(parts)), [p.label for p in parts])
    ax.invert_yaxis()
    ax.set_xlim(0, max(longest, 0.001) * 1.25)
    ax.set_xlabel("ms")
    ax.grid(axis="x", color="#eeeeee", zorder=0)


def draw_evacuation(rows: Axes, counts: Axes, migrations: Sequence[Migration], title: str, limit: int = 0,
                    now: datetime | None = None) -> None:  # fmt: skip
    """Every migration on one time axis (phase-coloured) and, below, how many ran at once
    against the region limit (0: none)."""
    rows.set_title(title, loc="left")
    entries = [e.at for m in migrations for e in m.timeline]
    if not entries:
        rows.text(0.5, 0.5, "no migrations", ha="center", va="center", transform=rows.transAxes)
        return
    origin = min(entries)
    seen: dict[Phase, str] = {}
    for row, m in enumerate(migrations):
        for span in phase_spans(m, now):
            left = (span.start - origin).total_seconds()
            if span.end is None:
                rows.plot([left], [row], marker="D", color=PHASE_COLOURS[span.phase], markersize=5, zorder=3)
            else:
                rows.barh(row, span.seconds, left=left, height=0.6, color=PHASE_COLOURS[span.phase], zorder=2)
            seen.setdefault(span.phase, PHASE_COLOURS[span.phase])
    rows.set_yticks(range(len(migrations)), [f"{m.vm} → {m.destination}" for m in migrations])
    rows.invert_yaxis()
    rows.grid(axis="x", color="#eeeeee", zorder=0)
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows.legend(handles=[Patch(color=c, label=p.value) for p, c in seen.items()], loc="upper left",
                bbox_to_anchor=(1.0, 1.0), fontsize=7)  # fmt: skip
    steps = concurrency_steps(migrations, now)
    if steps:
        xs = [(at - origin).total_seconds() for at, _ in steps]
        (line,) = counts.step(xs, [n for _, n in steps], where="post", color=REMAINING, linewidth=1.5)
        line.set_gid("concurrency")
        counts.fill_between(xs, [n for _, n in steps], step="post", color=REMAINING, alpha=0.15, linewidth=0)
        if limit:
            counts.axhline(limit, color=SHARE, linestyle=":", linewidth=1, label=f"region limit {limit}")
            counts.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        counts.set_ylim(0, max([n for _, n in steps] + [limit, 1]) + 0.5)
    counts.set_ylabel("running at once")
    counts.set_xlabel(f"seconds since {origin:%Y-%m-%d %H:%M:%S} UTC")
    counts.yaxis.set_major_locator(MaxNLocator(integer=True))
    counts.grid(axis="x", color="#eeeeee", zorder=0)


# ---------------------------------------------------------------------- files and bytes


def migration_chart(m: Migration, chart: str, fmt: Format = "svg", now: datetime | None = None) -> bytes:
    """One of ``CHARTS`` for the dashboard."""
    if chart not in CHARTS:
        raise InvalidRequest(f"unknown chart {chart!r}: one of {', '.join(CHARTS)}")
    with _drawing():
        if chart == "timeline":
            fig = _figure(8.6, 0.9 + 0.26 * max(len(m.timeline), 1))
            draw_timeline(fig.add_subplot(), m, now)
        elif chart == "precopy":
            fig = _figure(8.6, 3.4)
            draw_precopy(fig.add_subplot(), m)
        else:
            paused = any(p.ms is not None for p in pause_parts(m))
            fig = _figure(8.6, 1.7 if paused else 0.7)
            draw_pause(fig.add_subplot(), m)
        return _render(fig, fmt)


def migration_report(m: Migration, fmt: Format = "png", now: datetime | None = None) -> bytes:
    """Timeline, pre-copy and pause in one picture: what ``livemig migrations plot`` writes."""
    with _drawing():
        timeline_h = 0.9 + 0.26 * max(len(m.timeline), 1)
        fig = _figure(9.0, timeline_h + 3.4 + 1.7)
        grid = fig.add_gridspec(3, 1, height_ratios=[timeline_h, 3.4, 1.7])
        draw_timeline(fig.add_subplot(grid[0]), m, now)
        draw_precopy(fig.add_subplot(grid[1]), m)
        draw_pause(fig.add_subplot(grid[2]), m)
        fig.suptitle(f"migration {m.id}: {m.phase.value}" + (f" — {m.reason}" if m.reason else ""),
                     fontsize=10, ha="left", x=0.01, wrap=True)  # fmt: skip
        return _render(fig, fmt)


def evacuation_chart(migrations: Sequence[Migration], title: str, fmt: Format = "svg", limit: int = 0,
                     now: datetime | None = None) -> bytes:  # fmt: skip
    """An evacuation's migrations on one time axis, with the concurrency over time below."""
    with _drawing():
        rows_h = 0.8 + 0.3 * max(len(migrations), 1)
        fig = _figure(9.0, rows_h + 1.8)
        grid = fig.add_gridspec(2, 1, height_ratios=[rows_h, 1.8])
        rows = fig.add_subplot(grid[0])
        draw_evacuation(rows, fig.add_subplot(grid[1], sharex=rows), migrations, title, limit, now)
        return _render(fig, fmt)


def format_for(path: Path) -> Format:
    """PNG or SVG by the file's suffix; anything else is refused before anything is drawn."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidRequest(f"cannot tell the format of {path.name}: name it .png or .svg")
    return fmt


def write(path: Path, data: bytes) -> None:
    """Write through a temporary file, so a failed write never leaves half a picture."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}") from exc
