"""The demo: a region, a real guest dirtying memory, two live migrations and their report.

The report proves, per migration: QEMU's numbers (pause, total, bytes, rounds), the guest's own
memory pattern check on the destination, that the guest's heartbeat continues on the destination,
and that the source QEMU process has exited (the VM runs on exactly one host). ``tls`` says what was
encrypted: ``migration`` (every stream ran over QEMU's TLS), ``nbd`` (blockd forced TLS on the
guest's disk, and the disk check passed through it), ``api`` (the LMO and every service over TLS).

The VM also has a VNIC on a VCN. As root, a TCP echo and a UDP stream from a gateway namespace
run across both migrations (``demo_net.py``) and each migration reports its longest echo gap, the
datagrams lost and duplicated, and the flows moved; without root the demo says what it skipped
and migrates all the same. It ends with each migration's page on the dashboard.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from livemig.cli import demo_net, demo_report
from livemig.cli.demo_net import Probes
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
        "flows_moved": demo_report.flows_moved(m), "stopped_at": m.stats.stopped_at,
        "timeline": [{"at": e.at.isoformat(), "phase": e.phase.value, "message": e.message}
                     for e in m.timeline],
    }  # fmt: skip


def migrate_and_prove(client: LmoClient, vm: str, destination: str, console: Console, quiet: bool,
                      probes: Probes | None = None, label: str = "migration") -> dict[str, Any]:  # fmt: skip
    """Migrate ``vm`` and prove it arrived whole. With ``probes``: the echo's segment ``label``
    spans exactly the migration, and the guest's UDP counters are read before and after it."""
    before = client.vm(vm)
    if before.observed is None or before.observed.pid is None:
        raise LivemigError(f"VM {vm} is not running on {before.host}: {before.error}")
    source_pid = before.observed.pid
    last_seq = heartbeat_seq(client.console(vm, tail=50)) or 0
    udp_before = probes.udp_counters() if probes else None
    if probes:
        probes.mark(label)
    migration = client.migrate(vm, destination)
    final = client.wait(migration.id) if quiet else follow(client, migration, console)
    udp_after = None
    if probes:
        probes.mark(f"after-{label}")
        udp_after = probes.udp_counters()
    report = migration_report(final)
    report["network"] = {"label": label, "udp_before": udp_before, "udp_after": udp_after} if probes else None
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
    skipped = demo_net.probes_unavailable()
    if skipped:
        console.print(f"network probes skipped: {skipped}; the VM still migrates with its VNIC on the VCN")
    network: dict[str, Any] = {"probes": "skipped" if skipped else "ran", "reason": skipped,
                               "guest_ip": demo_net.GUEST_IP}  # fmt: skip
    migrations: list[dict[str, Any]] = []
    nbd_tls = blockd_nbd_tls(config)
    netns: str | None = None
    probes: Probes | None = None
    workdir = Path(tempfile.mkdtemp(prefix="livemig-demo-"))
    try:
        with LmoClient(config.lmo_url) as client:
            info = client.hosts()[0].info
            if info is not None:
                console.print(f"accelerator: {info.accel} ({info.accel_reason})")
            demo_net.put_network(client, gateway_host="A")
            client.create_volume(DEMO_VOLUME, 64)
            spec = workload_vm_spec(memory_mib, rate, name=DEMO_VM, volume=DEMO_VOLUME)
            spec.devices.append(demo_net.guest_nic())
            client.create_vm(spec, host="A")
            with console.status("booting the guest and waiting for the workload's heartbeat"):
                client.wait_for_console(DEMO_VM, "LIVEMIG HB", timeout=90)
            console.print(
                f"VM {DEMO_VM}: {memory_mib} MiB, dirtying {rate} MiB/s, appending a checksummed log "
                f"to volume {DEMO_VOLUME} (blockd, NBD), VNIC {demo_net.GUEST_VNIC} at {demo_net.GUEST_IP} "
                "on the VCN; heartbeat seen on A"
            )
            if not skipped:
                client.wait_for_console(DEMO_VM, f"net={demo_net.GUEST_IP}", timeout=60)
                netns = network["gateway_netns"] = demo_net.open_gateway(client, state_dir)
                probes = Probes(client, DEMO_VM, netns, workdir)
                if not probes.warm_up():  # measured all the same: the report shows what was lost
                    console.print(f"[red]no echo or no UDP datagram reached {demo_net.GUEST_IP} from {netns}[/]")
            for i, destination in enumerate(("B", "A"), 1):
                migrations.append(migrate_and_prove(client, DEMO_VM, destination, console, quiet, probes,
                                                    label=f"migration-{i}"))  # fmt: skip
            if probes is not None:
                network.update(finish_probes(probes, migrations))
            if not keep:
                client.delete_vm(DEMO_VM)
                client.delete_volume(DEMO_VOLUME)
    finally:
        if probes is not None:
            probes.finish()  # never leave a probe running
        if not keep:
            region.down()  # its vswitch closes the gateway's tap
            if netns is not None:
                demo_net.close_gateway(netns)
        shutil.rmtree(workdir, ignore_errors=True)
    tls = tls_report(config, nbd_tls, migrations) if migrations else []
    token_file = None if config.insecure else region.client_file
    for m in migrations:
        m["dashboard_url"] = demo_report.dashboard_url(config.lmo_url, m["id"])
    ok = len(migrations) == 2 and all(
        m["phase"] == "Succeeded" and m["guest_memory_check"] == "ok" and m["disk_check"] == "ok"
        and m["heartbeat_continues"]
        and m["source_qemu_exited"] for m in migrations
    ) and (probes is None or demo_report.network_ok(migrations, network["tcp"].get("error")))  # fmt: skip
    dashboard = {"login_url": f"{config.lmo_url}/ui/login" if token_file else None,
                 "token_file": str(token_file) if token_file else None, "region_running": keep}  # fmt: skip
    report = {"ok": ok, "tls": tls, "migrations": migrations, "network": network, "dashboard": dashboard}
    if not quiet:
        print_summary(console, report, config.lmo_url, token_file, keep)
    return report


def print_summary(console: Console, report: dict[str, Any], lmo_url: str, token_file: Path | None,
                  keep: bool) -> None:  # fmt: skip
    """After both migrations: the network per migration, what was encrypted, the dashboard pages."""
    network, migrations = report["network"], report["migrations"]
    netns = network.get("gateway_netns")
    if network["probes"] == "ran":
        console.print(f"network: one TCP connection echoing every {demo_net.ECHO_INTERVAL_MS} ms and "
                      f"{demo_net.UDP_PPS} UDP datagrams/s from namespace {netns} (a tap VNIC on A) "
                      f"to the VM at {demo_net.GUEST_IP}")  # fmt: skip
        console.print(demo_report.network_table(migrations))
        if network["tcp"].get("error"):
            console.print(f"  [red]the TCP echo failed: {network['tcp']['error']}[/]")
    console.print(f"tls: {', '.join(report['tls']) or 'none (an --insecure region)'}")
    for line in demo_report.dashboard_lines(lmo_url, migrations, token_file=token_file, running=keep):
        console.print(line)
    if keep and netns is not None:
        console.print(f"gateway namespace {netns} stays: `ip netns exec {netns} ...` reaches "
                      f"{demo_net.GUEST_IP}; `ip netns del {netns}` when done")  # fmt: skip
    console.print("[bold green]demo ok[/]" if report["ok"] else "[bold red]demo FAILED[/]")


def finish_probes(probes: Probes, migrations: list[dict[str, Any]]) -> dict[str, Any]:
    """Stop the probes; each migration's network numbers, and the totals."""
    echo, udp = probes.finish()
    counters = probes.udp_counters() or {}
    for m in migrations:
        taken = m["network"]
        m["network"] = demo_report.migration_network(m, echo, taken["label"], taken["udp_before"],
                                                     taken["udp_after"])  # fmt: skip
    tcp = {k: echo.get(k) for k in ("sent", "received", "error", "max_gap_ms")}
    return {"tcp": {"interval_ms": demo_net.ECHO_INTERVAL_MS, **tcp},
            "udp": {"pps": demo_net.UDP_PPS, "sent": udp.get("sent"), **counters}}  # fmt: skip


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
