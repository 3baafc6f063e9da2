"""Rendering migrations for people: a live progress bar and a timeline table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from livemig.model.migration import Migration
from livemig.wire.lmo import LmoClient

MIB = 1024 * 1024


def follow(client: LmoClient, migration: Migration, console: Console) -> Migration:
    """Show remaining MiB, dirty rate, throughput and round until the migration ends."""
    columns = (
        TextColumn("[bold]{task.fields[phase]:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(migration.vm, total=1.0, phase=migration.phase.value, detail="")

        def update(m: Migration) -> None:
            sample = m.last_sample
            detail, done = "", 0.0
            if sample is not None and sample.total_bytes:
                done = 1.0 - sample.remaining_bytes / sample.total_bytes
                detail = (f"remaining {sample.remaining_bytes / MIB:7.1f} MiB  "
                          f"dirty {sample.dirty_rate_mib_s:6.1f} MiB/s  "
                          f"{sample.mbps / 8:7.1f} MiB/s  round {sample.dirty_sync_count}")  # fmt: skip
            if m.terminal:
                done = 1.0 if m.phase.value == "Succeeded" else done
            progress.update(task, completed=done, phase=m.phase.value, detail=detail)

        return client.wait(migration.id, on_update=update)


def timeline_table(m: Migration) -> Table:
    table = Table(title=f"migration {m.id}: {m.vm} {m.source} → {m.destination}: {m.phase.value}")
    table.add_column("time (UTC)")
    table.add_column("+ms", justify="right")
    table.add_column("phase")
    table.add_column("what happened")
    start = m.timeline[0].at if m.timeline else m.created_at
    for entry in m.timeline:
        offset = (entry.at - start).total_seconds() * 1000
        table.add_row(entry.at.strftime("%H:%M:%S.%f")[:-3], f"{offset:.0f}", entry.phase.value, entry.message)
    return table


def stats_line(m: Migration) -> str:
    s = m.stats
    parts = [f"pause {s.pause_ms} ms" if s.pause_ms is not None else "pause -",
             f"total {s.total_ms} ms" if s.total_ms is not None else "total -",
             f"{s.transferred_bytes / MIB:.1f} MiB sent", f"{s.rounds} rounds"]  # fmt: skip
    if s.guest_pause_ms is not None:
        parts.append(f"guest paused {s.guest_pause_ms:.0f} ms (STOP to RESUME)")
    if s.switchover_hook_ms is not None:
        parts.append(f"switchover hook {s.switchover_hook_ms:.2f} ms")
    if m.guest_check is not None:
        parts.append(f"guest check {m.guest_check}")
    if m.disk_check is not None:
        parts.append(f"disk check {m.disk_check}")
    if m.reason:
        parts.append(f"reason: {m.reason}")
    return ", ".join(parts)
