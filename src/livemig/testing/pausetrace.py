"""Where a migration's pause goes: QEMU's trace (``LIVEMIG_QEMU_TRACE_DIR``, host/qemu.py) of both
QEMUs and the QMP event times hostd recorded, split into the steps between the source's ``STOP``
and the destination's ``RESUME``.

Why both sources: QMP events mark the edges every migration has (the source stopped, paused
before switchover, completed; the destination resumed), and the trace marks what happens inside
QEMU between them (the final dirty-bitmap sync, the device state saved and loaded, the
destination's start). All timestamps are wall clock on one machine, so they share one time line.
Trace lines look like ``<tid>@<seconds>.<micro>:<event> <args>`` (``-msg timestamp=on``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^\d+@(\d+\.\d+):(\w+)(?: (.*))?$")


@dataclass(frozen=True)
class TraceEvent:
    at: float
    name: str
    args: str


def read_trace(path: Path) -> list[TraceEvent]:
    """Every timestamped trace line of one QEMU's log (other lines, e.g. warnings, are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        found = _LINE.match(line.strip())
        if found:
            events.append(TraceEvent(float(found.group(1)), found.group(2), found.group(3) or ""))
    return events


def _first(events: list[TraceEvent], name: str, after: float, contains: str = "") -> TraceEvent | None:
    return next((e for e in events if e.name == name and e.at >= after and contains in e.args), None)


def _ms(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000, 2)


def split_pause(
    trace_dir: Path | None,
    stopped_at: float,
    resumed_at: float | None,
    pre_switchover_at: float | None = None,
    completed_at: float | None = None,
) -> dict[str, float | None]:
    """The pause from the source's ``STOP`` to the destination's ``RESUME``, step by step (ms).

    - ``stop_to_pre_switchover``: QEMU stopped the vCPUs and paused before switchover;
    - ``stop_to_complete``: STOP to QEMU starting to complete (the two steps below, when paused
      before switchover);
    - ``hook``: hostd's switchover hooks and its ``migrate-continue`` (to QEMU starting to complete);
    - ``bitmap_sync``: the final dirty-bitmap sync (QEMU's per-page path under TCG with the trim);
    - ``final_ram``: sending the pages dirtied since the last round;
    - ``device_save``: the source writing every device's state;
    - ``destination_lag``: from the source's ``completed`` to the destination's end of the stream;
    - ``device_load``: the destination loading device state (its first full section to the end);
    - ``destination_start``: end of the stream to the ``RESUME`` event (block activation, the
      bottom half that starts the vCPUs).
    Steps whose edges are missing (no trace, no hook) are ``None``.
    """
    source: list[TraceEvent] = []
    destination: list[TraceEvent] = []
    if trace_dir is not None and trace_dir.is_dir():
        for path in trace_dir.glob("*.log"):
            events = read_trace(path)
            window = [e for e in events if stopped_at - 1 <= e.at <= (resumed_at or stopped_at) + 1]
            if any(e.name == "migration_completion_vm_stop" for e in window):
                source = window
            elif any(e.name == "qemu_loadvm_state_post_main" for e in window):
                destination = window
    begin = stopped_at - 0.05  # the trace's vm_stop line precedes QEMU's STOP event by a little
    complete = _first(source, "savevm_state_complete_precopy", begin)
    sync_start = _first(source, "migration_bitmap_sync_start", complete.at if complete else stopped_at)
    sync_end = _first(source, "migration_bitmap_sync_end", sync_start.at if sync_start else begin)
    first_save = _first(source, "vmstate_save", sync_end.at if sync_end else begin)
    source_done = _first(source, "migrate_set_state", begin, "completed")
    done_at = completed_at or (source_done.at if source_done else None)
    first_load = _first(destination, "qemu_loadvm_state_section_startfull", begin)
    post_main = _first(destination, "qemu_loadvm_state_post_main", begin)
    hook_start = pre_switchover_at if pre_switchover_at is not None else None
    return {
        "stop_to_pre_switchover": _ms(pre_switchover_at, stopped_at),
        "stop_to_complete": _ms(complete.at if complete else None, stopped_at),
        "hook": _ms(complete.at if complete else None, hook_start),
        "bitmap_sync": _ms(sync_end.at if sync_end else None, sync_start.at if sync_start else None),
        "final_ram": _ms(first_save.at if first_save else None, sync_end.at if sync_end else None),
        "device_save": _ms(source_done.at if source_done else None, first_save.at if first_save else None),
        "destination_lag": _ms(post_main.at if post_main else None, done_at),
        "device_load": _ms(post_main.at if post_main else None, first_load.at if first_load else None),
        "destination_start": _ms(resumed_at, post_main.at if post_main else None),
    }
