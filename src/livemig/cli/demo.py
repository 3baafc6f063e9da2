"""The demo: a region, a real guest dirtying memory, two live migrations and their report.

The report proves, per migration: QEMU's numbers (pause, total, bytes, rounds), the guest's own
memory pattern check on the destination, that the guest's heartbeat continues on the destination,
and that the source QEMU process has exited (the VM runs on exactly one host). ``tls`` says what was
encrypted: ``migration`` (every stream ran over QEMU's TLS), ``nbd`` (blockd forced TLS on the
guest's disk, and the disk check passed through it), ``api`` (the LMO and every service over TLS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from livemig.cli.progress import follow, stats_line, timeline_table
from livemig.errors import LivemigError
from livemig.guest.image import build_image, default_cache_dir
from livemig.guest.workload import heartbeat_seq, wait_heartbeat_after, workload_vm_spec
from livemig.model.migration import ConditionType, Migration
from livemig.region.local import Region, RegionConfig
from livemig.region.proc import pid_alive
from livemig.wire import blockd as wire_blockd
from livemig.wire.blockd import BlockingBlockdClient
from livemig.wire.lmo import LmoClient

DEMO_VM = "demo"
DEMO_VOLUME = "demo-data"


def migration_report(m: Migration) -> dict[str, Any]:
    encrypted = m.condition(ConditionType.STREAM_ENCRYPTED)
    return {
        "stream_encrypted": encrypted is not None and encrypted.status,
        "id": m.id, "vm": m.vm, "from": m.source, "to": m.destination, "phase": m.phase.value,
        "pause_ms": m.stats.pause_ms, "guest_pause_ms": m.stats.guest_pause_ms, "total_ms": m.stats.total_ms,
        "transferred_bytes": m.stats.transferred_bytes, "rounds": m.stats.rounds,
        "guest_memory_check": m.guest_check or "not run",
        "disk_check": m.disk_check or "not run",
        "switchover_hook_ms": m.stats.switchover_hook_ms, "reason": m.reason,
        "timeline": [{"at": e.at.isoformat(), "phase": e.phase.value, "message": e.message}
                     for e in m.timeline],
    }  # fmt: skip


def migrate_and_prove(client: LmoClient, vm: str, destination: str, console: Console, quiet: bool) -> dict[str, Any]:
    before = client.vm(vm)
    if before.observed is None or before.observed.pid is None:
        raise LivemigError(f"VM {vm} is not running on {before.host}: {before.error}")
    source_pid = before.observed.pid
    last_seq = heartbeat_seq(client.console(vm, tail=50)) or 0
    migration = client.migrate(vm, destination)
    final = client.wait(migration.id) if quiet else follow(client, migration, console)
    report = migration_report(final)
    after = client.vm(vm)
    report["source_qemu_exited"] = not pid_alive(source_pid)
    report["runs_on"] = after.host
    report["heartbeat_after_migration"] = wait_heartbeat_after(lambda: client.console(vm, tail=50), last_seq)
    report["heartbeat_continues"] = report["heartbeat_after_migration"] > last_seq
    if not quiet:
        console.print(timeline_table(final))
        console.print(stats_line(final))
        console.print(f"heartbeat on {after.host}: seq {last_seq} → {report['heartbeat_after_migration']}; "
                      f"source QEMU pid {source_pid} exited: {report['source_qemu_exited']}")  # fmt: skip
    return report


def run_demo(state_dir: Path, *, quiet: bool, keep: bool, rate: int, memory_mib: int,
             console: Console) -> dict[str, Any]:  # fmt: skip
    cache = default_cache_dir()
    with console.status("building the guest image (cached after the first run)") as status:
        build_image(cache, progress=lambda msg: status.update(msg))
    region = Region(state_dir)
    region.down()  # a previous demo's leftovers
    config = region.up()
    console.print(
        f"region up: LMO {config.lmo_url}, hosts "
        + ", ".join(f"{h.name} (migration {h.migration_address})" for h in config.hosts)
    )
    migrations: list[dict[str, Any]] = []
    nbd_tls = blockd_nbd_tls(config)
    try:
        with LmoClient(config.lmo_url) as client:
            info = client.hosts()[0].info
            if info is not None:
                console.print(f"accelerator: {info.accel} ({info.accel_reason})")
            client.create_volume(DEMO_VOLUME, 64)
            client.create_vm(workload_vm_spec(memory_mib, rate, name=DEMO_VM, volume=DEMO_VOLUME), host="A")
            with console.status("booting the guest and waiting for the workload's heartbeat"):
                client.wait_for_console(DEMO_VM, "LIVEMIG HB", timeout=90)
            console.print(
                f"VM {DEMO_VM}: {memory_mib} MiB, dirtying {rate} MiB/s, appending a checksummed log "
                f"to volume {DEMO_VOLUME} (blockd, NBD); heartbeat seen on A"
            )
            for destination in ("B", "A"):
                migrations.append(migrate_and_prove(client, DEMO_VM, destination, console, quiet))
            if not keep:
                client.delete_vm(DEMO_VM)
                client.delete_volume(DEMO_VOLUME)
    finally:
        if not keep:
            region.down()
    tls = tls_report(config, nbd_tls, migrations) if migrations else []
    if not quiet:
        console.print(f"tls: {', '.join(tls) or 'none (an --insecure region)'}")
    ok = len(migrations) == 2 and all(
        m["phase"] == "Succeeded" and m["guest_memory_check"] == "ok" and m["disk_check"] == "ok"
        and m["heartbeat_continues"]
        and m["source_qemu_exited"] for m in migrations
    )  # fmt: skip
    if not quiet:
        console.print("[bold green]demo ok[/]" if ok else "[bold red]demo FAILED[/]")
    return {"ok": ok, "tls": tls, "migrations": migrations}


def tls_report(config: RegionConfig, nbd_tls: bool, migrations: list[dict[str, Any]]) -> list[str]:
    """What was encrypted, each from what the services say they did (not from how they were started)."""
    found = []
    if all(m["stream_encrypted"] for m in migrations):
        found.append("migration")
    if nbd_tls and all(m["disk_check"] == "ok" for m in migrations):
        found.append("nbd")
    if not config.insecure and config.lmo_url.startswith("https://"):
        found.append("api")
    return found


def blockd_nbd_tls(config: RegionConfig) -> bool:
    try:
        with BlockingBlockdClient(config.blockd_url, timeout=10) as blockd:
            return blockd.run(wire_blockd.health()).nbd_tls
    except LivemigError:
        return False
