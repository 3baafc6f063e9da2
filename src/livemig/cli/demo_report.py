"""The demo's report beyond QEMU's numbers: each migration's network numbers and its dashboard page.

Kept apart from the run (``demo.py``) so the arithmetic is unit-tested: one segment of the echo
run and two snapshots of the guest's UDP counters become one migration's numbers, and the flows
moved are read from the migration's own timeline (the bulk copy at SyncingFlows records how many
conntrack entries the destination imported).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from livemig.model.migration import Migration
from livemig.testing.netprobe import LONG_GAP_MS

UDP_COUNTERS = ("received", "lost", "duplicated", "reordered")


def dashboard_url(lmo_url: str, migration_id: str) -> str:
    return f"{lmo_url.rstrip('/')}/ui/migrations/{migration_id}"


def flows_moved(m: Migration) -> int:
    """How many flows the destination imported in the bulk copy, over all the VM's VNICs."""
    return sum(int(n) for entry in m.timeline for n in (entry.data.get("flows") or {}).values())


def echo_segment(echo: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((s for s in echo.get("segments", []) if s.get("label") == label), None)


def gap_phase(m: dict[str, Any], gap_end_unix: float | None, gap_ms: float | None) -> str | None:
    """When a migration's longest echo gap began: ``pause`` if it spans the guest's pause (STOP to
    RESUME), else the phase the migration was in (under TCG a pre-copy dirty sync can hold the
    vCPU longer than the pause). ``m`` is the demo's report of the migration."""
    if gap_end_unix is None or gap_ms is None:
        return None
    start = gap_end_unix - gap_ms / 1000
    stopped = m.get("stopped_at")
    if stopped is not None and start <= stopped + (m.get("guest_pause_ms") or 0) / 1000 and gap_end_unix >= stopped:
        return "pause"
    began = [e["phase"] for e in m.get("timeline", []) if datetime.fromisoformat(e["at"]).timestamp() <= start]
    return began[-1] if began else "before Pending"


def pause_gap(m: dict[str, Any], long_gaps: list[list[float]]) -> float | None:
    """The echo gap across the guest's pause (STOP to RESUME), from the probe's list of long gaps
    (``[end_unix, ms]``, those of at least ``netprobe.LONG_GAP_MS``); None: none listed."""
    stopped = m.get("stopped_at")
    if stopped is None:
        return None
    resumed = stopped + (m.get("guest_pause_ms") or 0) / 1000
    spanning = [ms for end, ms in long_gaps if end - ms / 1000 <= resumed and end >= stopped]
    return max(spanning, default=None)


def migration_network(
    m: dict[str, Any], echo: dict[str, Any], label: str, udp_before: dict[str, int] | None,
    udp_after: dict[str, int] | None,
) -> dict[str, Any]:  # fmt: skip
    """One migration's TCP numbers (its segment ``label`` of the ``echo`` run) and UDP numbers
    (the counters' change); ``None`` for what was not measured. ``m`` is the demo's report of the
    migration."""
    tcp = None
    if (segment := echo_segment(echo, label)) is not None:
        tcp = {"sent": segment["sent"], "received": segment["received"],
               "lost": segment["sent"] - segment["received"], "max_gap_ms": segment["max_gap_ms"],
               "max_gap_in": gap_phase(m, segment.get("max_gap_end_unix"), segment["max_gap_ms"]),
               "pause_gap_ms": pause_gap(m, echo.get("long_gaps") or [])}  # fmt: skip
    udp = None
    if udp_before is not None and udp_after is not None:
        udp = {name: udp_after.get(name, 0) - udp_before.get(name, 0) for name in UDP_COUNTERS}
    return {"tcp": tcp, "udp": udp}


NETWORK_COLUMNS = ("", "longest echo gap", "at the pause", "TCP lost", "UDP received", "UDP lost/dup", "flows moved")


def network_row(m: dict[str, Any]) -> list[str]:
    """One migration's row of :func:`network_table`."""
    net = m.get("network") or {}
    tcp, udp = net.get("tcp"), net.get("udp")
    row = [f"{m['from']} → {m['to']}"]
    if tcp is None:
        row += ["-", "-", "-"]
    else:
        gap = "-" if tcp["max_gap_ms"] is None else f"{tcp['max_gap_ms']:.0f} ms"
        at_pause = f"{tcp['pause_gap_ms']:.0f} ms" if tcp.get("pause_gap_ms") is not None else f"< {LONG_GAP_MS:.0f} ms"
        row += [gap + (f" ({tcp['max_gap_in']})" if tcp.get("max_gap_in") else ""), at_pause,
                f"{tcp['lost']} of {tcp['sent']}"]  # fmt: skip
    row += ["-", "-"] if udp is None else [str(udp["received"]), f"{udp['lost']}/{udp['duplicated']}"]
    return [*row, str(m["flows_moved"])]


def network_table(migrations: list[dict[str, Any]]) -> Table:
    """Per migration: the echo's longest gap and when it began, its gap across the pause, what TCP
    and UDP lost (and UDP duplicated), the flows moved."""
    table = Table(box=None, padding=(0, 1))
    for i, column in enumerate(NETWORK_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for m in migrations:
        table.add_row(*network_row(m))
    return table


def network_ok(migrations: list[dict[str, Any]], echo_error: str | None) -> bool:
    """The connection lived through every migration: no echo failed, none went missing."""
    tcps = [(m.get("network") or {}).get("tcp") for m in migrations]
    return echo_error is None and all(t is not None and t["lost"] == 0 and t["received"] > 0 for t in tcps)


def dashboard_lines(lmo_url: str, migrations: list[dict[str, Any]], *, token_file: Path | None,
                    running: bool) -> list[str]:  # fmt: skip
    """Where to see each migration in the dashboard, how to log in (never the token itself: it
    stays in the 0600 client file, as ``livemig up`` leaves it) and whether the region still runs."""
    base = lmo_url.rstrip("/")
    if token_file is None:
        lines = ["dashboard (an --insecure region: no login):"]
    else:
        lines = ["dashboard (its first page asks once for the admin token):", f"  login  {base}/ui/login",
                 f"  token  in {token_file}"]  # fmt: skip
    lines += [f"  {m['from']} → {m['to']}  {dashboard_url(lmo_url, m['id'])}" for m in migrations]
    if not running:
        lines.append("  (the demo stopped its region: `livemig demo --keep` leaves it running)")
    return lines
