"""``livemig``: start a region, manage VMs, migrate them, and run the services themselves."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TimeRemainingColumn
from rich.table import Table

from livemig.cli import client
from livemig.cli.config import load_into_defaults
from livemig.cli.security import pki_app, token_app
from livemig.errors import LivemigError
from livemig.model.migration import (
    AutoConverge,
    Compression,
    ConcurrencyLimits,
    Migration,
    MigrationParams,
    MigrationPolicies,
    Phase,
)
from livemig.model.vm import VmSpec, WorkloadSpec
from livemig.region.local import Region, default_state_dir
from livemig.security.pki import LeafFiles, Role
from livemig.wire import lmo as wire_lmo
from livemig.wire.base import Credentials, configure
from livemig.wire.lmo import Evacuation, EvacuationReport, LmoClient, NetKind, VmView

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
vm_app = typer.Typer(no_args_is_help=True, help="Create, inspect and delete VMs.")
migrations_app = typer.Typer(no_args_is_help=True, help="List and inspect migrations.")
image_app = typer.Typer(no_args_is_help=True, help="The livemig guest image.")
app.add_typer(vm_app, name="vm")
app.add_typer(migrations_app, name="migrations")
app.add_typer(image_app, name="image")
app.add_typer(pki_app, name="pki")
app.add_typer(token_app, name="token")
out = Console()
err = Console(stderr=True)

StateDir = Annotated[Path | None, typer.Option("--state-dir", help="region state (default $LIVEMIG_STATE)")]
Url = Annotated[str | None, typer.Option("--url", help="LMO URL (default: $LIVEMIG_URL or the local region)")]


def _first_error(exc: ValueError) -> str:
    """pydantic's first complaint in one line (its full text spans many)."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


@app.callback()
def _global_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="LIVEMIG_CONFIG",
            help="the CLI's config file (url, ca, token); default: client.toml in the region's state dir",
        ),
    ] = None,
) -> None:
    client.use_config_file(config)


fail = client.fail
warn_insecure = client.warn_insecure
lmo = client.lmo


# ---------------------------------------------------------------------- services


LogLevel = Annotated[str, typer.Option(help="debug | info | warning | error")]
LogFormat = Annotated[
    str, typer.Option("--log-format", help="text | json (one object per line); lines about a migration name it")
]


def _configure_logging(level: str, fmt: str = "text", *, service: str | None = None, host: str | None = None) -> None:
    """Every line to stderr in ``fmt``, uvicorn's too; each line logged for a migration carries its
    id and VM (``livemig.logs``)."""
    from livemig import logs

    if level.lower() not in logs.LEVELS:
        fail(f"--log-level must be debug, info, warning or error, not {level!r}")
    if fmt not in logs.FORMATS:
        fail(f"--log-format must be text or json, not {fmt!r}")
    logs.configure(level, fmt, host=host, service=service)


ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="a TOML file of these settings, named like the flags (a flag given wins)",
                 is_eager=True, callback=lambda ctx, param, value: load_into_defaults(ctx, param, value)),
]  # fmt: skip
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="this service's certificate (PEM, region CA)")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="its key (PEM, keep it 0600)")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="the region CA's certificate")]
Insecure = Annotated[bool, typer.Option("--insecure", help="plain HTTP, no authentication: a lab only")]


def _service_tls(role: Role, name: str | None, cert: Path | None, key: Path | None, ca: Path | None,
                 insecure: bool) -> LeafFiles | None:  # fmt: skip
    """The service's leaf (its server certificate and, for the clients it makes, its client one).

    On by default: without a certificate a service refuses to start unless told ``--insecure``."""
    from livemig.security import pki

    what = f"{role.value}{f' {name}' if name else ''}"
    if insecure:
        if cert is not None or key is not None:
            fail(f"{what}: --insecure and --tls-cert/--tls-key contradict each other; choose one")
        warn_insecure(f"{what} serves")
        return None
    if cert is None or key is None or ca is None:
        fail(f"{what} serves mutual TLS: give --tls-cert, --tls-key and --tls-ca (or a --config naming them; "
             "`livemig pki issue` makes them), or --insecure for a lab")  # fmt: skip
    leaf = pki.leaf_from_paths(cert, key, ca)
    if leaf.identity.role is not role:
        fail(f"{cert} is a certificate of role {leaf.identity.role.value}; {what} needs role {role.value}")
    if name is not None and leaf.identity.name != pki.host_leaf_name(name):
        fail(f"{cert} names {leaf.identity.name!r}, not this {role.value}'s host {name!r}")
    configure(Credentials(ca=ca, cert=cert, key=key))  # every client this process makes presents it
    return leaf


def _serve(app_: object, listen: str, tls: LeafFiles | None = None, optional_client_certs: bool = False) -> None:
    """Serve ``app_`` with uvicorn, whose loggers follow :func:`_configure_logging` (log_config=None)."""
    import ssl

    import uvicorn

    from livemig.security.tls import ReloadingServerContext, uvicorn_tls
    from livemig.wire.base import SERVER_KEEPALIVE_S

    host, _, port = listen.rpartition(":")
    extra = {}
    if tls is not None:
        mode = ssl.CERT_OPTIONAL if optional_client_certs else ssl.CERT_REQUIRED
        extra = uvicorn_tls(ReloadingServerContext(tls, client_certs=mode))
    uvicorn.run(app_, host=host or "127.0.0.1", port=int(port), log_level="warning",  # type: ignore[arg-type]
                log_config=None, timeout_keep_alive=SERVER_KEEPALIVE_S, **extra)  # fmt: skip


@app.command()
def hostd(
    name: Annotated[str, typer.Option(help="host name, unique in the region")],
    listen: Annotated[str, typer.Option(help="API address host:port")] = "127.0.0.1:7701",
    state_dir: Annotated[Path, typer.Option(help="where VM records, sockets and logs live")] = Path(
        "/var/lib/livemig/host"
    ),
    migration_address: Annotated[str, typer.Option(help="address incoming migrations listen on")] = "127.0.0.1",
    lmo_url: Annotated[str | None, typer.Option("--lmo", help="register with this LMO")] = None,
    accel: Annotated[str, typer.Option(help="auto | kvm | tcg")] = "auto",
    memory_mib: Annotated[int | None, typer.Option(help="memory offered to VMs (default: RAM - 1 GiB)")] = None,
    migration_bandwidth: Annotated[int, typer.Option(help="MiB/s reserved for migrations, each way")] = 1024,
    vswitch: Annotated[str | None, typer.Option(help="this host's vswitch API URL")] = None,
    overlay: Annotated[str | None, typer.Option(help="this host's vswitch VXLAN endpoint ip:port")] = None,
    netns: Annotated[str | None, typer.Option(help="namespace host: run QEMUs in this netns, tc on its mig0")] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="where the LMO reaches this hostd (default: https://LISTEN)")
    ] = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    qemu_cert: Annotated[
        Path | None, typer.Option(help="this host's QEMU certificate (role qemu): migration streams and NBD over TLS")
    ] = None,
    qemu_key: Annotated[Path | None, typer.Option(help="its key")] = None,
    insecure: Insecure = False,
    config: ConfigFile = None,
    ovmf_dir: Annotated[Path | None, typer.Option(help="OVMF firmware files (default /usr/share/OVMF)")] = None,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run a host agent (QEMU lifecycle, migration source/destination)."""
    from livemig.faults.points import configure_service
    from livemig.host.accel import choose_accel
    from livemig.host.agent import HostAgent
    from livemig.host.api import create_app
    from livemig.host.runtime import LocalQemu
    from livemig.host.tls import QemuTls
    from livemig.security import pki

    _configure_logging(log_level, log_format, service="hostd", host=name)
    choice = choose_accel(accel)
    if memory_mib is None:
        memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024) - 1024
    if migration_bandwidth <= 0 or memory_mib <= 0:
        fail("--migration-bandwidth and --memory-mib must be positive")
    if netns is not None:
        from livemig.region.netplumb import netns_exists

        if not netns_exists(netns):
            fail(f"network namespace {netns!r} does not exist (`livemig up --netns` creates them)")
    leaf = _service_tls(Role.HOSTD, name, tls_cert, tls_key, tls_ca, insecure)
    qemu = None
    if leaf is not None:
        if qemu_cert is None or qemu_key is None:
            fail(f"hostd {name}: QEMU needs its own certificate (role qemu) for migration and NBD TLS: "
                 "give --qemu-cert and --qemu-key")  # fmt: skip
        qemu = QemuTls(pki.leaf_from_paths(qemu_cert, qemu_key, leaf.ca), state_dir / "tls" / "qemu")
        if qemu.identity.name != leaf.identity.name:
            fail(f"{qemu_cert} is the QEMU certificate of {qemu.identity.name!r}, not of host {name!r}")
    configure_service("hostd", host=name)  # once it is sure to serve (a refused start leaves the process as it was)
    runtime = LocalQemu(ovmf_dir=ovmf_dir)
    agent = HostAgent(name, state_dir, migration_address, choice, memory_mib, migration_bandwidth,
                      vswitch_url=vswitch, overlay=overlay, netns=netns, qemu_tls=qemu, runtime=runtime)  # fmt: skip
    logging.getLogger(__name__).info("hostd %s: accelerator %s (%s)", name, choice.name, choice.reason)
    api_url = url or f"{'http' if leaf is None else 'https'}://{listen}"
    _serve(create_app(agent, lmo_url, api_url, insecure=leaf is None), listen, leaf)


@app.command("lmo")
def lmo_command(
    listen: Annotated[str, typer.Option(help="API address host:port")] = "127.0.0.1:7700",
    db: Annotated[str, typer.Option(help="SQLAlchemy URL of the store")] = "sqlite:///livemig.db",
    blockd: Annotated[str | None, typer.Option(help="blockd admin API URL (volumes)")] = None,
    migration_tls: Annotated[bool, typer.Option(help="ask hosts to encrypt migration streams (QEMU's TLS)")] = True,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    config: ConfigFile = None,
    replica: Annotated[
        str | None, typer.Option(help="this replica's name in leases (default: host-pid-random)")
    ] = None,
    capacity: Annotated[
        int, typer.Option(help="most migrations this replica drives at once (0: an API replica, driving none)")
    ] = 2000,
    concurrency: Annotated[int, typer.Option(help="migrations a controller pass steps at the same time")] = 32,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run the LMO control plane (API + migration controller).

    One TLS listener for users (bearer tokens, no client certificate) and services (their certificates)."""
    from livemig.control.api import create_app
    from livemig.control.store import Store
    from livemig.faults.points import configure_service
    from livemig.gctune import tune_for_service

    if capacity < 0 or concurrency < 1:
        fail("--capacity must be at least 0 (an API replica) and --concurrency at least 1")
    if capacity == 0 and not db.startswith("postgresql"):
        fail("--capacity 0 makes an API replica, whose migrations other replicas drive: they share "
             "the store only on PostgreSQL (--db postgresql+psycopg://...)")  # fmt: skip
    _configure_logging(log_level, log_format, service="lmo")
    leaf = _service_tls(Role.LMO, None, tls_cert, tls_key, tls_ca, insecure)
    configure_service("lmo")
    if not migration_tls:
        logging.getLogger(__name__).warning("LMO: migration streams will be plain TCP (--no-migration-tls)")
    app_ = create_app(Store(db), blockd_url=blockd, insecure=leaf is None, migration_tls=migration_tls and bool(leaf),
                      replica=replica, capacity=capacity, concurrency=concurrency)  # fmt: skip
    tune_for_service()
    _serve(app_, listen, leaf, optional_client_certs=True)


@app.command("sim")
def sim_command(
    hosts: Annotated[int, typer.Option(help="simulated hosts")] = 100,
    lmo_url: Annotated[str | None, typer.Option("--lmo", help="register every host with this LMO")] = None,
    listen: Annotated[str, typer.Option(help="address host:port every simulated host answers on")] = "127.0.0.1:7900",
    prefix: Annotated[str, typer.Option(help="host names are PREFIX00000, PREFIX00001, ...")] = "sim",
    memory_mib: Annotated[int, typer.Option(help="memory each host offers to VMs")] = 65536,
    migration_bandwidth: Annotated[int, typer.Option(help="MiB/s each host reserves for migrations, each way")] = 1024,
    speed: Annotated[float, typer.Option(help="simulated seconds per real second")] = 10.0,
    failure_rate: Annotated[float, typer.Option(help="fraction of migrations that fail mid-way")] = 0.0,
    report_interval: Annotated[float, typer.Option(help="seconds between a host's capacity reports")] = 1.0,
    sample_interval: Annotated[
        float | None, typer.Option(help="seconds between hostd's samples of a migration (default: hostd's own)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the failures")] = 0,
    shards: Annotated[
        int, typer.Option(help="processes serving the hosts, each a slice on its own port (listen port + 0, 1, ...)")
    ] = 1,
    shard: Annotated[int, typer.Option(hidden=True, help="which shard this process is (set by shard 0)")] = 0,
    log_level: LogLevel = "warning",
    log_format: LogFormat = "text",
) -> None:
    """Run a simulated fleet: real hostd agents over simulated QEMU, registered with an LMO, in one
    process or (--shards) several, as real hosts answer independently. Point an LMO at a copy of
    your fleet's shape to try a wave (`livemig evacuate --plan`, then the wave itself) before
    touching real hosts."""
    import asyncio

    from livemig.testing.fleetserver import FleetConfig, serve

    if hosts < 1 or memory_mib < 1 or migration_bandwidth < 1 or speed <= 0 or not 0 <= failure_rate <= 1:
        fail("--hosts, --memory-mib, --migration-bandwidth and --speed must be positive, --failure-rate in 0..1")
    if report_interval <= 0 or (sample_interval is not None and sample_interval <= 0):
        fail("--report-interval and --sample-interval must be positive")
    if not 1 <= shards <= hosts or not 0 <= shard < shards:
        fail(f"--shards must be 1..--hosts ({hosts}), and --shard 0..{shards - 1}")
    _, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) - shard + shards - 1 > 65535:
        fail(f"--listen needs a port with {shards} ports free from it (one per shard)")
    _configure_logging(log_level, log_format, service="hostd")
    config = FleetConfig(hosts=hosts, listen=listen, prefix=prefix, memory_mib=memory_mib,
                         migration_bandwidth_mib_s=migration_bandwidth, speed=speed, failure_rate=failure_rate,
                         seed=seed, lmo_url=lmo_url, report_interval_s=report_interval,
                         sample_interval_s=sample_interval, shards=shards, shard=shard)  # fmt: skip
    asyncio.run(serve(config))


@app.command("vswitch")
def vswitch_command(
    name: Annotated[str, typer.Option(help="this host's name in the mapping")],
    listen: Annotated[str, typer.Option(help="API address host:port")] = "127.0.0.1:7480",
    overlay: Annotated[str, typer.Option(help="VXLAN endpoint ip:port (port 0: any free port)")] = "127.0.0.1:4789",
    state_dir: Annotated[
        Path | None, typer.Option(help="keep mapping, security lists and VNIC ports here across restarts")
    ] = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    config: ConfigFile = None,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run a host's vswitch: the VCN dataplane (VXLAN overlay, security lists, flow state).

    The overlay itself is not encrypted (like a datacentre underlay; see docs/security.md)."""
    from livemig.faults.points import configure_service
    from livemig.network.api import run_vswitch

    _configure_logging(log_level, log_format, service="vswitch", host=name)
    leaf = _service_tls(Role.VSWITCH, name, tls_cert, tls_key, tls_ca, insecure)
    configure_service("vswitch", host=name)
    run_vswitch(name, listen, overlay, log_level=log_level, state_dir=state_dir, tls=leaf)


@app.command("blockd")
def blockd_command(
    data_dir: Annotated[Path, typer.Option(help="volumes (sparse files) and their metadata")] = Path(
        "/var/lib/livemig/blockd"
    ),
    listen: Annotated[str, typer.Option(help="admin API address host:port")] = "127.0.0.1:7410",
    nbd_listen: Annotated[str, typer.Option(help="NBD server address host:port")] = "127.0.0.1:10809",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = False,
    config: ConfigFile = None,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run blockd: block volumes over NBD with write fencing.

    With its certificate, NBD is forced-TLS (clients of role qemu or hostd) and the admin API mutual TLS."""
    from livemig.faults.points import configure_service
    from livemig.storage.service import run_blockd

    _configure_logging(log_level, log_format, service="blockd")
    leaf = _service_tls(Role.BLOCKD, None, tls_cert, tls_key, tls_ca, insecure)
    configure_service("blockd")
    run_blockd(data_dir, listen, nbd_listen, tls=leaf)


# ---------------------------------------------------------------------- region


@app.command()
def up(
    state_dir: StateDir = None,
    hosts: Annotated[str, typer.Option(help="comma-separated host names")] = "A,B",
    accel: Annotated[str, typer.Option(help="auto | kvm | tcg")] = "auto",
    db: Annotated[str | None, typer.Option(help="store URL (default SQLite in the state dir)")] = None,
    netns: Annotated[
        bool, typer.Option(help="root: each host in its own network namespace, tc on its migration interface")
    ] = False,
    migration_bandwidth: Annotated[int, typer.Option(help="each host's migration budget, MiB/s each way")] = 1024,
    blockd_disk_mib: Annotated[
        int | None, typer.Option(help="root: blockd's data on a tmpfs of this size (a disk that can fill)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="a lab without TLS or authentication (every command then says so)")
    ] = False,
) -> None:
    """Start a local region: the LMO, blockd, and per host a hostd and a vswitch (loopback, or namespace hosts).

    Secure by default: a region CA and a certificate per service and host in STATE_DIR/pki, mutual
    TLS between services, TLS on every migration stream and NBD connection, and an admin token for
    you in STATE_DIR/client.toml (which every livemig command reads)."""
    if migration_bandwidth <= 0 or (blockd_disk_mib is not None and blockd_disk_mib <= 0):
        fail("--migration-bandwidth and --blockd-disk-mib must be positive")
    region = Region(state_dir)
    config = region.up(tuple(h.strip() for h in hosts.split(",") if h.strip()), accel=accel, db_url=db,
                       netns=netns, migration_bandwidth_mib_s=migration_bandwidth,
                       blockd_disk_mib=blockd_disk_mib, insecure=insecure)  # fmt: skip
    out.print(f"region up in {region.state_dir}: LMO {config.lmo_url}")
    out.print(f"  dashboard {config.lmo_url}/ui")
    for host in config.hosts:
        where = f", netns {host.netns}" if host.netns else ""
        out.print(f"  host {host.name}: API {host.url}, migration address {host.migration_address}{where}")
    if config.insecure:
        warn_insecure("the region")
    else:
        out.print(f"  tls: migration, nbd, api (region CA {region.pki_dir / 'ca-cert.pem'})")
        out.print(f"  your admin token and the CA are in {region.client_file} (livemig commands read it; "
                  "the dashboard asks for the token once)")  # fmt: skip


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop the local region and its VMs."""
    Region(state_dir).down()
    out.print("region down")


AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _print_json(data: object) -> None:
    """JSON on stdout for scripts: pydantic models and lists of them as the API returns them."""
    sys.stdout.write(json.dumps(to_jsonable_python(data), indent=2) + "\n")


def _table(title: str, *columns: str, keep: tuple[str, ...] = ()) -> Table:
    """A table whose ``keep`` columns (ids, phases: things people copy) are never cut or wrapped;
    the others wrap to fit 80 columns."""
    table = Table(title=title)
    for column in columns:
        if column in keep:
            table.add_column(column, no_wrap=True, overflow="fold", min_width=len(column))
        else:
            table.add_column(column, overflow="fold")
    return table


@app.command()
def status(url: Url = None, state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Hosts (accelerator, memory, migration budget) and VMs of the region."""
    with lmo(url, state_dir) as client:
        hosts, vms = client.hosts(), client.vms()
        if as_json:
            _print_json({"hosts": hosts, "vms": vms})
            return
        table = _table("hosts", "host", "accel", "free/total MiB", "budget MiB/s", "migration address", "VMs",
                       keep=("host",))  # fmt: skip
        for h in hosts:
            reg, info = h.registration, h.info
            budget = str(reg.migration_bandwidth_mib_s) + (" (maintenance)" if reg.maintenance else "")
            if info:
                table.add_row(reg.name, f"{info.accel} ({info.accel_reason})",
                              f"{info.memory_free_mib}/{info.memory_mib}", budget, reg.migration_address,
                              ", ".join(info.vms))  # fmt: skip
            else:
                table.add_row(reg.name, "-", "-", budget, reg.migration_address, h.error or "")
        out.print(table)
        _print_vms(vms)


# ---------------------------------------------------------------------- VMs


def _print_vms(vms: list[VmView]) -> None:
    table = _table("VMs", "name", "host", "state", "MiB", "vCPUs", "machine", keep=("name", "host"))
    for vm in vms:
        state = vm.observed.state.value if vm.observed else (vm.error or "?")
        table.add_row(vm.name, vm.host, state, str(vm.spec.memory_mib), str(vm.spec.vcpus), vm.spec.machine)
    out.print(table)


@vm_app.command("create")
def vm_create(
    name: str,
    memory: Annotated[int, typer.Option(help="guest memory, MiB")] = 512,
    vcpus: Annotated[int, typer.Option()] = 1,
    host: Annotated[str | None, typer.Option(help="host to place it on")] = None,
    rate: Annotated[int, typer.Option(help="workload dirty rate, MiB/s")] = 20,
    wss: Annotated[int, typer.Option(help="workload working set, MiB")] = 128,
    boot_volume: Annotated[
        str | None, typer.Option("--boot-volume", help="your own VM: boot this volume (livemig volume import)")
    ] = None,
    firmware: Annotated[str, typer.Option(help="with --boot-volume: uefi | bios")] = "uefi",
    vnic: Annotated[str | None, typer.Option(help="with --boot-volume: a NIC on this VNIC (address by DHCP)")] = None,
    ssh_key: Annotated[
        list[Path] | None, typer.Option("--ssh-key", help="with --boot-volume: public key for cloud-init (repeatable)")
    ] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="a full VmSpec as JSON")] = None,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Boot a VM: the livemig guest workload, your own disk image (--boot-volume), or any VmSpec as JSON."""
    with lmo(url, state_dir) as client:
        try:
            if spec_file is not None:
                spec = VmSpec.model_validate_json(spec_file.read_text())
            elif boot_volume is not None:
                spec = _own_vm_spec(client, name, memory, vcpus, boot_volume, firmware, vnic, ssh_key or [])
            else:
                spec = VmSpec(name=name, memory_mib=memory, vcpus=vcpus,
                              workload=WorkloadSpec(wss_mib=wss, rate_mib_s=rate))  # fmt: skip
        except (ValueError, OSError) as exc:
            fail(f"invalid VM spec: {exc}")
        view = client.create_vm(spec, host)
        pid = view.observed.pid if view.observed else "?"
        out.print(f"VM {view.name} runs on host {view.host} (QEMU pid {pid})")


def _own_vm_spec(
    client: LmoClient, name: str, memory: int, vcpus: int, boot_volume: str, firmware: str, vnic: str | None,
    ssh_keys: list[Path],
) -> VmSpec:  # fmt: skip
    """A VM booting a user's image: its boot volume, a NIC on a VNIC, cloud-init with the keys."""
    devices: list[dict[str, object]] = [
        {"kind": "volume", "id": "root", "pci_addr": "0x4", "volume": boot_volume, "boot_index": 0}
    ]
    if vnic is not None:
        found = [v for v in client.run(wire_lmo.network_objects(NetKind.VNICS)) if v.get("id") == vnic]
        if not found:
            fail(f"no VNIC {vnic!r} in the region (livemig net list vnics)")
        devices.insert(0, {"kind": "nic", "id": "nic0", "pci_addr": "0x3", "mac": found[0]["mac"],
                           "backend": "vswitch", "vnic": vnic})  # fmt: skip
    data: dict[str, object] = {"name": name, "memory_mib": memory, "vcpus": vcpus, "firmware": firmware,
                               "devices": devices}  # fmt: skip
    if ssh_keys:
        keys = [line for key in ssh_keys for line in key.read_text().splitlines() if line.strip()]
        data["cloud_init"] = {"hostname": name, "ssh_authorized_keys": keys}
    return VmSpec.model_validate(data)


@vm_app.command("list")
def vm_list(url: Url = None, state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """All VMs with their host and QEMU runstate."""
    with lmo(url, state_dir) as client:
        vms = client.vms()
    if as_json:
        _print_json(vms)
    else:
        _print_vms(vms)


@vm_app.command("show")
def vm_show(name: str, url: Url = None, state_dir: StateDir = None) -> None:
    """One VM's spec and observed state, as JSON."""
    with lmo(url, state_dir) as client:
        _print_json(client.vm(name))


@vm_app.command("delete")
def vm_delete(name: str, url: Url = None, state_dir: StateDir = None) -> None:
    """Stop a VM and forget it."""
    with lmo(url, state_dir) as client:
        client.delete_vm(name)
        out.print(f"VM {name} deleted")


@vm_app.command("console")
def vm_console(
    name: str,
    tail: Annotated[int, typer.Option(help="lines to show")] = 40,
    send: Annotated[str | None, typer.Option(help="send one line to the guest first")] = None,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """The VM's serial console (the guest workload's heartbeats and check results)."""
    with lmo(url, state_dir) as client:
        if send is not None:
            client.console_input(name, send)
        sys.stdout.write(client.console(name, tail))


@vm_app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_ssh(
    ctx: typer.Context,
    name: str,
    user: Annotated[str, typer.Option("--user", "-l", help="login name in the guest")] = "debian",
    identity: Annotated[Path | None, typer.Option("--identity", "-i", help="private key file")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="an ssh -o option (repeatable)")] = None,
    netns: Annotated[str | None, typer.Option(help="gateway namespace (default: lmgw-<subnet>)")] = None,
    print_only: Annotated[bool, typer.Option("--print", help="print the ssh command line instead")] = False,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """SSH to a VM on the VCN, through its subnet's gateway namespace (root; `livemig net gateway`).

    Anything after the options (after `--`) is the command to run in the guest."""
    import shlex

    from livemig.cli.guestnet import ssh_argv

    known_hosts = Region(state_dir).state_dir / "known_hosts"
    with lmo(url, state_dir) as client:
        argv = ssh_argv(client, name, user=user, identity=identity, netns=netns, known_hosts=known_hosts,
                        options=option, command=list(ctx.args))  # fmt: skip
    if print_only:
        out.print(shlex.join(argv), highlight=False, soft_wrap=True)
        return
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    os.execvp(argv[0], argv)


volume_app = typer.Typer(no_args_is_help=True, help="Block volumes served by blockd.")
app.add_typer(volume_app, name="volume")


@volume_app.command("create")
def volume_create(
    name: str,
    size_mib: Annotated[int, typer.Option("--size-mib", help="size in MiB")] = 64,
    preallocate: Annotated[bool, typer.Option(help="reserve every block now: writes never meet a full disk")] = False,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Create a volume (sparse, or preallocated)."""
    with lmo(url, state_dir) as client:
        client.create_volume(name, size_mib, preallocate)
        out.print(f"volume {name}: {size_mib} MiB{' (preallocated)' if preallocate else ''}")


@volume_app.command("list")
def volume_list(url: Url = None, state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Volumes with size, allocation and the current writer attachment."""
    with lmo(url, state_dir) as client:
        volumes = client.run(wire_lmo.volumes())
    if as_json:
        _print_json(volumes)
        return
    table = _table("volumes", "name", "size MiB", "allocated MiB", "attachments", "writer", keep=("name", "writer"))
    for v in volumes:
        table.add_row(v.name, f"{v.size_bytes / 2**20:.0f}", f"{v.allocated_bytes / 2**20:.1f}", str(v.attachments),
                      v.writer or "-")  # fmt: skip
    out.print(table)


@volume_app.command("show")
def volume_show(name: str, url: Url = None, state_dir: StateDir = None) -> None:
    """One volume with its attachments and their fencing counters, as JSON."""
    with lmo(url, state_dir) as client:
        _print_json(client.volume(name))


def _progress_bar(description: str, total_bytes: int) -> tuple[Progress, Callable[[float], None]]:
    """A rich progress bar on stderr (stdout stays for results) fed by qemu-img's percentages."""
    bar = Progress("{task.description}", BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=True),
                   TimeRemainingColumn(), console=err, transient=False)  # fmt: skip
    task = bar.add_task(description, total=total_bytes)
    return bar, lambda percent: bar.update(task, completed=total_bytes * percent / 100)


@volume_app.command("import")
def volume_import(
    name: str,
    image: Annotated[Path, typer.Argument(help="a raw or qcow2 disk image on this machine")],
    fmt: Annotated[str | None, typer.Option("--format", help="raw | qcow2 (default: what qemu-img info reads)")] = None,
    grow: Annotated[bool, typer.Option("--grow", help="grow the volume if the image is larger")] = False,
    size_mib: Annotated[int | None, typer.Option("--size-mib", help="size of a new volume")] = None,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Copy a disk image into a volume over NBD (created if missing); sparse stays sparse."""
    from livemig.cli.transfer import import_image
    from livemig.storage.images import inspect_image

    info = inspect_image(image, fmt)  # refused here, before the LMO is asked for anything
    with lmo(url, state_dir) as client:
        bar, progress = _progress_bar(f"import {image.name} → {name}", info.virtual_size)
        with bar:
            result = import_image(client, name, image, fmt=info.format, grow=grow, size_mib=size_mib, progress=progress,
                                  state_dir=state_dir)  # fmt: skip
        view = client.volume(name).volume
    how = "created" if result.created else ("grown" if result.grown else "existing")
    out.print(f"volume {name} ({how}, {view.size_bytes / 2**20:.0f} MiB): {result.image.format} image "
              f"{image} imported, {view.allocated_bytes / 2**20:.1f} MiB allocated")  # fmt: skip


@volume_app.command("export")
def volume_export(
    name: str,
    image: Annotated[Path, typer.Argument(help="the image file to write")],
    fmt: Annotated[str, typer.Option("--format", help="raw | qcow2")] = "qcow2",
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Copy a volume into a disk image file over NBD (written aside, renamed when complete)."""
    from livemig.cli.transfer import export_image

    with lmo(url, state_dir) as client:
        size = client.volume(name).volume.size_bytes
        bar, progress = _progress_bar(f"export {name} → {image.name}", size)
        with bar:
            export_image(client, name, image, fmt=fmt, force=force, progress=progress, state_dir=state_dir)
    out.print(f"volume {name} ({size / 2**20:.0f} MiB) exported to {image} ({fmt}, {image.stat().st_size} bytes)")


@volume_app.command("delete")
def volume_delete(name: str, url: Url = None, state_dir: StateDir = None) -> None:
    """Delete a volume (refused while attached)."""
    with lmo(url, state_dir) as client:
        client.delete_volume(name)
        out.print(f"volume {name} deleted")


net_app = typer.Typer(no_args_is_help=True, help="The virtual network: VCNs, subnets, security lists, VNICs.")
app.add_typer(net_app, name="net")
NET_KINDS = ("vcns", "subnets", "security-lists", "vnics")  # the order objects depend on each other


@net_app.command("apply")
def net_apply(
    path: Annotated[
        Path, typer.Argument(help='JSON: {"vcns": [...], "subnets": [...], "security-lists": [...], "vnics": [...]}')
    ],
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Create or update network objects from a JSON file (each object needs its "id")."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {exc}")
    if not isinstance(doc, dict) or set(doc) - set(NET_KINDS):
        fail(f"{path}: expected an object with keys among {', '.join(NET_KINDS)}")
    with lmo(url, state_dir) as client:
        for kind in NET_KINDS:
            for obj in doc.get(kind, []):
                if not isinstance(obj, dict) or "id" not in obj:
                    fail(f"{kind}: every object needs an id")
                client.put_network_object(kind, obj)
                out.print(f"{kind[:-1]} {obj['id']} applied")


@net_app.command("gateway")
def net_gateway(
    vnic: Annotated[str, typer.Argument(help='a VNIC of the subnet, placed on a host (its "host")')],
    netns: Annotated[str | None, typer.Option(help="namespace (default: lmgw-<subnet>)")] = None,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Root: plug VNIC into its host's vswitch as a tap inside a network namespace, to reach its subnet."""
    from livemig.cli.guestnet import open_gateway

    if os.geteuid() != 0:
        fail("a gateway is a tap device in a network namespace: run this as root")
    with lmo(url, state_dir) as client:
        namespace, address = open_gateway(client, vnic, netns, state_dir)
    out.print(f"VNIC {vnic} is {address} in namespace {namespace}: `livemig vm ssh NAME` reaches VMs of its "
              f"subnet (or `ip netns exec {namespace} ...`)")  # fmt: skip


@net_app.command("list")
def net_list(
    kind: Annotated[str, typer.Argument(help="vcns | subnets | security-lists | vnics")] = "vnics",
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Network objects of one kind, as JSON."""
    if kind not in NET_KINDS:
        fail(f"kind must be one of {', '.join(NET_KINDS)}")
    with lmo(url, state_dir) as client:
        _print_json(client.run(wire_lmo.network_objects(NetKind(kind))))


@net_app.command("delete")
def net_delete(kind: str, object_id: str, url: Url = None, state_dir: StateDir = None) -> None:
    """Delete a network object (refused while something uses it)."""
    if kind not in NET_KINDS:
        fail(f"kind must be one of {', '.join(NET_KINDS)}")
    with lmo(url, state_dir) as client:
        client.run(wire_lmo.delete_network_object(NetKind(kind), object_id))
        out.print(f"{kind[:-1]} {object_id} deleted")


# ---------------------------------------------------------------------- migrations


@app.command()
def migrate(
    vm: str,
    to: Annotated[str, typer.Option("--to", help="destination host")],
    downtime_ms: Annotated[int | None, typer.Option(help="QEMU downtime-limit")] = None,
    bandwidth: Annotated[int | None, typer.Option(help="max bandwidth, MiB/s")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once accepted")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only run the pre-flight checks")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the final record as JSON")] = False,
    auto_converge: Annotated[
        bool | None, typer.Option("--auto-converge/--no-auto-converge", help="throttle the vCPUs rather than abort")
    ] = None,
    throttle_initial: Annotated[int, typer.Option(help="auto-converge: first throttle, %")] = 20,
    throttle_increment: Annotated[int, typer.Option(help="auto-converge: added per round, %")] = 10,
    max_throttle: Annotated[int, typer.Option(help="auto-converge: the most, %")] = 99,
    multifd: Annotated[int | None, typer.Option(help="parallel migration streams (0: one)")] = None,
    compression: Annotated[str | None, typer.Option(help="none, xbzrle or zstd (zstd needs --multifd)")] = None,
    xbzrle_cache_mib: Annotated[int, typer.Option(help="XBZRLE's cache, MiB")] = 64,
    zstd_level: Annotated[int, typer.Option(help="zstd's level")] = 1,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Live-migrate VM to another host, with a live progress bar.

    Without any policy option the VM's own policies (its spec's ``migration``) apply; with one,
    this migration's policies are exactly what the options say."""
    from livemig.cli.progress import follow, stats_line, timeline_table

    params = MigrationParams()
    if downtime_ms is not None:
        params.downtime_limit_ms = downtime_ms
    if bandwidth is not None:
        params.max_bandwidth_mib_s = bandwidth
    if auto_converge is not None or multifd is not None or compression is not None:
        try:
            params.policies = MigrationPolicies(
                auto_converge=AutoConverge(enabled=bool(auto_converge), initial_pct=throttle_initial,
                                           increment_pct=throttle_increment, max_pct=max_throttle),
                multifd_channels=multifd or 0, compression=Compression(compression or "none"),
                xbzrle_cache_mib=xbzrle_cache_mib, zstd_level=zstd_level,
            )  # fmt: skip
        except ValueError as exc:  # pydantic's ValidationError is one
            fail(f"migration policies: {_first_error(exc)}")
    with lmo(url, state_dir) as client:
        if dry_run:
            report = client.preflight(vm, to, params)
            if as_json:
                _print_json(report)
            else:
                table = _table(f"pre-flight: {vm} {report.source} -> {to}", "check", "result", "detail")
                for check in report.checks:
                    table.add_row(check.name, "[green]ok[/]" if check.ok else "[red]FAIL[/]", check.detail)
                out.print(table)
                if report.policies is not None:
                    out.print(f"policies: {report.policies.describe()}")
            raise typer.Exit(0 if report.ok else 1)
        migration = client.migrate(vm, to, params)
        if no_wait:
            out.print(f"migration {migration.id} accepted")
            return
        final = client.wait(migration.id) if as_json else follow(client, migration, out)
        if as_json:
            sys.stdout.write(final.model_dump_json(indent=2) + "\n")
        else:
            out.print(timeline_table(final))
            out.print(stats_line(final))
        if final.phase.value != "Succeeded":
            raise typer.Exit(1)


@migrations_app.command("list")
def migrations_list(
    url: Url = None,
    state_dir: StateDir = None,
    as_json: AsJson = False,
    active: Annotated[bool, typer.Option("--active", help="only migrations that have not ended")] = False,
) -> None:
    """Every migration with its phase and QEMU's numbers (the reason: `migrations show ID`)."""
    with lmo(url, state_dir) as client:
        migrations = client.migrations(active=active)
    if as_json:
        _print_json(migrations)
        return
    table = _table("migrations", "id", "vm", "from → to", "phase", "pause ms", "total ms", keep=("id", "phase"))
    for m in migrations:
        table.add_row(m.id, m.vm, f"{m.source} → {m.destination}", m.phase.value, str(m.stats.pause_ms or "-"),
                      str(m.stats.total_ms or "-"))  # fmt: skip
    out.print(table)


@migrations_app.command("show")
def migrations_show(
    migration_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """One migration's timeline, numbers and reason."""
    from livemig.cli.progress import stats_line, timeline_table

    with lmo(url, state_dir) as client:
        m = client.migration(migration_id)
        if as_json:
            sys.stdout.write(m.model_dump_json(indent=2) + "\n")
        else:
            out.print(timeline_table(m))
            out.print(stats_line(m))


@migrations_app.command("plot")
def migrations_plot(
    migration_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="the picture: FILE.png or FILE.svg")],
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Draw a migration's phase timeline, pre-copy chart and pause to a PNG or SVG file."""
    from livemig import plots

    fmt = plots.format_for(output)  # a bad name is refused before anything is asked or drawn
    with lmo(url, state_dir) as client:
        m = client.migration(migration_id)
    plots.write(output, plots.migration_report(m, fmt))
    out.print(f"migration {m.id} ({m.phase.value}) drawn to {output}")


def _plot_evacuation(path: Path, evacuation: Evacuation, migrations: list[Migration], console: Console) -> None:
    from livemig import plots

    hosts = evacuation.hosts or [evacuation.host]
    title = f"evacuation {evacuation.id} of {hosts[0] if len(hosts) == 1 else f'{len(hosts)} hosts'}"
    limit = evacuation.limits.region_total
    plots.write(path, plots.evacuation_chart(migrations, title, plots.format_for(path), limit=limit))
    console.print(f"evacuation {evacuation.id} drawn to {path}")


@migrations_app.command("cancel")
def migrations_cancel(migration_id: str, url: Url = None, state_dir: StateDir = None) -> None:
    """Cancel a migration; the VM keeps running on its source."""
    with lmo(url, state_dir) as client:
        m = client.cancel(migration_id)
        out.print(f"migration {m.id}: cancel requested ({m.phase.value})")


@app.command()
def evacuate(
    hosts: Annotated[list[str], typer.Argument(help="the hosts to empty (a wave: all at once)")],
    per_host_outbound: Annotated[int, typer.Option(help="concurrent migrations out of one host")] = 2,
    per_host_inbound: Annotated[int, typer.Option(help="concurrent migrations into one host")] = 1,
    region_total: Annotated[int, typer.Option(help="concurrent migrations in the region")] = 4,
    plan: Annotated[
        bool, typer.Option("--plan", help="only predict: where each VM goes, when, how long; nothing moves")
    ] = False,
    measure: Annotated[bool, typer.Option(help="ask the hosts for each VM's dirty rate first (about 1 s)")] = False,
    max_bandwidth: Annotated[int | None, typer.Option(min=1, help="MiB/s one migration may use at most")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the final report as JSON")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="draw the migrations to FILE.png or FILE.svg")] = None,
    url: Url = None,
    state_dir: StateDir = None,
) -> None:
    """Put HOSTS in maintenance and live-migrate every VM off them, within limits; with --plan,
    say how long that would take and what would happen to each VM, before anything moves."""
    import time

    from rich.live import Live

    from livemig.control.evacuation import peak_concurrency
    from livemig.wire.lmo import WaveRequest

    if plot is not None:
        from livemig.plots import format_for

        format_for(plot)  # refused before the host is put in maintenance
    limits = ConcurrencyLimits(per_host_outbound=per_host_outbound, per_host_inbound=per_host_inbound,
                               region_total=region_total)  # fmt: skip
    params = MigrationParams() if max_bandwidth is None else MigrationParams(max_bandwidth_mib_s=max_bandwidth)
    request = WaveRequest(hosts=hosts, limits=limits, params=params, measure=measure)
    label = hosts[0] if len(hosts) == 1 else f"{len(hosts)} hosts"
    with lmo(url, state_dir) as client:
        if plan:
            wave = client.plan_wave(request)
            if as_json:
                _print_json(wave.model_dump(mode="json"))
            else:
                _print_plan(wave, label)
            return
        evacuation = client.start_wave(request)

        def render(report: EvacuationReport) -> Table:
            table = _table(f"evacuation {evacuation.id} of {label}", "vm", "to", "phase", "pause ms", "reason",
                           keep=("vm", "phase"))  # fmt: skip
            by_id = {m.id: m for m in report.migrations}
            for item in evacuation.items:
                m = by_id.get(item.migration) if item.migration else None
                if m is None:
                    table.add_row(item.vm, "-", "[red]cannot move[/]", "-", item.reason)
                else:
                    waiting = next((c.reason for c in m.conditions if not c.status), "")
                    table.add_row(item.vm, m.destination, m.phase.value, str(m.stats.pause_ms or "-"),
                                  m.reason or waiting)  # fmt: skip
            return table

        report = client.evacuation(evacuation.id)
        with Live(render(report), console=err if as_json else out, refresh_per_second=4) as live:
            while not report.done:
                time.sleep(0.5)
                report = client.evacuation(evacuation.id)
                live.update(render(report))
        peaks = {"outbound": peak_concurrency(report.migrations, "source"),
                 "inbound": peak_concurrency(report.migrations, "destination")}  # fmt: skip
        if plot is not None:
            _plot_evacuation(plot, evacuation, report.migrations, err if as_json else out)
        stuck = [i for i in evacuation.items if not i.migration]
        failed = [m for m in report.migrations if m.phase is not Phase.SUCCEEDED]
        if as_json:
            _print_json({**report.model_dump(mode="json"), "peak_concurrency": peaks})
        else:
            out.print(f"peak concurrency: outbound {peaks['outbound']}, inbound {peaks['inbound']}")
            out.print(
                f"{len(report.migrations) - len(failed)} moved, {len(failed)} failed, {len(stuck)} could not move"
            )
            if report.comparison is not None:
                _print_comparison(report)
        if stuck or failed:
            raise typer.Exit(1)


def _print_plan(wave: wire_lmo.WavePlan, label: str) -> None:
    shown = wave.items[:PLAN_ROWS]
    table = _table(f"plan: evacuate {label} ({wave.vms} VMs)", "vm", "from", "to", "MiB", "dirty MiB/s",
                   "share MiB/s", "start s", "takes s", "verdict", keep=("vm", "verdict"))  # fmt: skip
    for i in shown:
        table.add_row(
            i.vm,
            i.source,
            i.destination or "-",
            str(i.memory_mib),
            f"{i.dirty_rate_mib_s:.0f} ({i.dirty_rate_source})",
            str(i.share_mib_s or "-"),
            _secs(i.start_s),
            _secs(i.duration_s),
            i.verdict if i.verdict == "ok" else f"[yellow]{i.verdict}[/]",
        )
    out.print(table)
    if len(wave.items) > len(shown):
        out.print(f"... and {len(wave.items) - len(shown)} more (--json lists every VM)")
    c = wave.calibration
    basis = f"learned from {c.basis} recent migrations" if c.basis else "defaults: no finished migration to learn from"
    out.print(
        f"predicted: the wave takes {wave.total_s:.1f} s; "
        + ", ".join(f"{n} {v}" for v, n in sorted(wave.verdicts.items()))
    )
    out.print(f"model: {c.overhead_s:.2f} s per migration outside pre-copy, {c.efficiency:.0%} of the share reached, "
              f"{c.payload:.0%} of RAM sent, unknown dirty rates taken as {c.default_dirty_rate_mib_s:.0f} MiB/s "
              f"({basis}); planned in {wave.planning_ms:.0f} ms")  # fmt: skip
    if wave.driven_at_once:
        out.print(f"the LMO's replicas drive at most {wave.driven_at_once} migrations at once")
    if wave.lmo_pace is not None:
        pace = wave.lmo_pace
        out.print(f"with {pace.held} or more running they end at most {pace.ended_per_s:.1f} a second "
                  f"(measured by {pace.replica} {pace.age_s:.0f} s ago)")  # fmt: skip
    if wave.hosts_bound_s is not None:
        out.print(f"the LMO's pace, not the hosts, sets this wave's length: {wave.hosts_bound_s:.1f} s if it "
                  "kept up with QEMU (more replicas, or replicas with a core each, bring it closer)")  # fmt: skip


def _print_comparison(report: EvacuationReport) -> None:
    c = report.comparison
    assert c is not None
    table = _table("plan beside what happened", "vm", "predicted s", "took s", "predicted", "outcome", keep=("vm",))
    for row in c.items[:PLAN_ROWS]:
        table.add_row(row.vm, _secs(row.predicted_s), _secs(row.actual_s), row.predicted, row.outcome)
    out.print(table)
    error = f" ({c.error:+.0%} off)" if c.error is not None else ""
    plan = report.evacuation.plan
    bound = f" (at least {plan.hosts_bound_s:.1f} s, the hosts' bound)" if plan and plan.hosts_bound_s else ""
    out.print(f"the wave was predicted to take {c.predicted_s:.1f} s{bound} and took {_secs(c.actual_s)} s{error}")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


#: rows of a plan or comparison printed as a table (--json has them all)
PLAN_ROWS = 40


# ---------------------------------------------------------------------- image and demo


@image_app.command("build")
def image_build(
    cache: Annotated[Path | None, typer.Option(help="cache directory (default $LIVEMIG_CACHE)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
) -> None:
    """Build the guest image (Debian cloud kernel, busybox, the livemig workload)."""
    from livemig.guest.image import build_image, default_cache_dir

    cache = cache or default_cache_dir()
    with err.status("building the guest image") as status:
        image = build_image(cache, force=force, progress=lambda msg: status.update(msg))
    out.print(f"kernel {image.kernel}\ninitrd {image.initrd}")


@image_app.command("build-disk")
def image_build_disk(
    cache: Annotated[Path | None, typer.Option(help="cache directory (default $LIVEMIG_CACHE)")] = None,
) -> None:
    """Build the Debian 12 disk image (UEFI + BIOS, cloud-init) that stands in for a user's VM."""
    import time

    from livemig.guest.distro import build_disk_image

    cache = cache or Path(os.environ.get("LIVEMIG_CACHE") or Path.home() / ".cache" / "livemig")
    started = time.monotonic()
    steps: list[str] = []  # only a build reports steps; a cached image comes back silently
    with err.status("building the Debian disk image") as status:

        def progress(message: str) -> None:
            steps.append(message)
            status.update(message[:100])

        image = build_disk_image(cache, progress=progress)
    took = time.monotonic() - started
    cached = not steps
    out.print(
        f"image {image.path}\n"
        f"size {image.file_size} bytes qcow2, {image.virtual_size} bytes raw ({image.allocated} allocated)\n"
        f"took {took:.1f}s" + (f" (cached; the build took {image.build_seconds:.1f}s)" if cached else "")
    )


@app.command()
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
    state_dir: StateDir = None,
    keep: Annotated[bool, typer.Option(help="leave the region and VM running afterwards")] = False,
    rate: Annotated[int, typer.Option(help="guest dirty rate, MiB/s")] = 20,
    memory: Annotated[int, typer.Option(help="guest memory, MiB")] = 512,
) -> None:
    """Start a region, boot a VM, migrate it A→B→A live, print the report."""
    from livemig.cli.demo import run_demo

    report = run_demo(state_dir or default_state_dir() / "demo", quiet=as_json, keep=keep, rate=rate,
                      memory_mib=memory, console=err if as_json else out)  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("chaos")
def chaos_command(
    state_dir: StateDir = None,
    list_only: Annotated[bool, typer.Option("--list", help="print the scenarios, one a line, and stop")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run the scenarios matching this pattern (repeatable)")
    ] = None,
    ci: Annotated[bool, typer.Option("--ci", help="only the representative subset CI runs")] = False,
    own_region: Annotated[
        bool, typer.Option("--own-region", help="start a region for the run (namespace hosts and a disk as root)")
    ] = False,
    db: Annotated[
        str | None, typer.Option(help="with --own-region: the LMO's store (PostgreSQL, for its scenario)")
    ] = None,
    as_json: AsJson = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines on stderr")] = False,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="also write the table as Markdown here (with command and date)")
    ] = None,
) -> None:
    """Break the region's services at every stage of real migrations and check the invariants."""
    from livemig.cli import chaos

    if list_only:
        names = chaos.list_scenarios(only, ci)
        if as_json:
            _print_json({"scenarios": names})
        else:
            sys.stdout.write("".join(f"{name}\n" for name in names))
        return
    raise typer.Exit(chaos.chaos(state_dir, only, ci, own_region, db, as_json, quiet, markdown))


def main() -> None:
    """Entry point: any LivemigError becomes one red line and exit status 1, never a traceback."""
    try:
        app(standalone_mode=True)
    except LivemigError as exc:
        err.print(f"[bold red]error:[/] {exc.message}")
        sys.exit(1)


if __name__ == "__main__":
    main()
