"""A local region: the LMO and N host agents as background processes on loopback.

Used by ``livemig up``/``down``, the demo, the tests and the benchmarks, so all of them start
the system the same way a user does. Every host gets its own API port and its own migration
address (127.0.100.N), so migration traffic never uses an API address even on one machine.

Secure by default, as a region across machines is (``deploy/``): ``up`` makes the region CA and a
certificate per service and per host in ``STATE_DIR/pki`` (each naming every address it is reached
on), writes every service a config file (``STATE_DIR/etc/*.toml``) and starts it from that file, and
leaves the local user an admin token with the CA in ``STATE_DIR/client.toml``. A process that loads
the region (the CLI, tests, benchmarks) remembers, per service address, which credentials to use
(``wire.base.remember``): the user's token for the LMO, the LMO's certificate for the others (that
process is the region's operator, on the machine that holds the CA). ``--insecure`` starts it all
on plain HTTP without any of this.

With namespace hosts (``--netns``), each host's hostd and vswitch run inside its namespace too and
reach the LMO, blockd and each other only across the service bridge, each with its own
certificate: the picture of three machines, in small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from livemig.errors import BootstrapError, LivemigError
from livemig.region import disk, hostns
from livemig.region.freeport import free_port, free_ports
from livemig.region.hostns import NamespaceLayout
from livemig.region.proc import pid_alive, wait_gone
from livemig.security import pki
from livemig.security.pki import Role
from livemig.wire import blockd as wire_blockd
from livemig.wire import lmo as wire_lmo
from livemig.wire.base import Credentials, remember
from livemig.wire.blockd import BlockingBlockdClient
from livemig.wire.lmo import LmoClient
from livemig.wire.vswitch import VswitchClient

DEFAULT_HOSTS = ("A", "B")
REGION_NAME = "local"
ADMIN_TOKEN_NAME = "local-admin"
#: a namespace host's vswitch overlay port (each namespace has its own stack: the standard port is free)
NETNS_OVERLAY_PORT = 4789


def default_state_dir() -> Path:
    env = os.environ.get("LIVEMIG_STATE")
    return Path(env) if env else Path.home() / ".local" / "state" / "livemig"


def overlay_endpoint(index: int) -> str:
    """Host ``index``'s VXLAN endpoint: its own loopback address and a free UDP port (several
    regions may run on one machine, so the standard port 4789 is not assumed free)."""
    address = f"127.0.101.{index + 1}"
    return f"{address}:{free_port(address, socket.SOCK_DGRAM)}"


@dataclass
class HostConfig:
    name: str
    port: int
    migration_address: str
    pid: int | None = None
    memory_mib: int | None = None
    migration_bandwidth_mib_s: int = 1024
    vswitch_port: int = 0
    overlay: str = ""
    vswitch_pid: int | None = None
    netns: str | None = None  # a namespace host (hostns.py): its services, QEMUs and migration address live there
    address: str = "127.0.0.1"  # where its hostd and vswitch APIs listen (a namespace host: its service address)
    scheme: str = "https"
    ovmf_dir: str | None = None  # this host's OVMF files, if not Debian's (/usr/share/OVMF)

    @property
    def vswitch_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.vswitch_port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.port}"


@dataclass
class RegionConfig:
    lmo_port: int
    hosts: list[HostConfig]
    accel: str = "auto"
    lmo_pid: int | None = None
    db_url: str | None = None  # default: SQLite in the state dir
    blockd_port: int = 0
    nbd_port: int = 0
    blockd_pid: int | None = None
    replica_pids: list[int] = field(default_factory=list)
    netns_region: int | None = None  # hostns.NamespaceLayout number when the hosts are namespace hosts
    blockd_disk_mib: int | None = None  # blockd's data on a tmpfs of this size (root): a disk that can fill
    insecure: bool = False  # a lab's --insecure: plain HTTP, no TLS anywhere, no authentication
    migration_tls: bool = True  # the LMO asks for TLS on migration streams (a benchmark turns it off)
    lmo_address: str = "127.0.0.1"  # namespace hosts reach the LMO on the service bridge

    @property
    def scheme(self) -> str:
        return "http" if self.insecure else "https"

    @property
    def lmo_url(self) -> str:
        return f"{self.scheme}://{self.lmo_address}:{self.lmo_port}"

    @property
    def blockd_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.blockd_port}"


class Region:
    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.config_path = self.state_dir / "region.json"
        self.pki_dir = self.state_dir / "pki"
        self.etc_dir = self.state_dir / "etc"
        self.client_file = self.state_dir / "client.toml"

    # ------------------------------------------------------------------ config
    def load(self) -> RegionConfig | None:
        if not self.config_path.exists():
            return None
        raw = json.loads(self.config_path.read_text())
        raw["hosts"] = [HostConfig(**h) for h in raw["hosts"]]
        config = RegionConfig(**raw)
        self._remember(config)
        return config

    # ------------------------------------------------------------------ credentials
    def _leaf(self, role: Role, name: str) -> pki.LeafFiles:
        return pki.leaf_files(self.pki_dir, name, role)

    def service_credentials(self) -> Credentials:
        """The LMO's certificate: what this process (the region's operator) shows the other services."""
        leaf = self._leaf(Role.LMO, "lmo")
        return Credentials(ca=leaf.ca, cert=leaf.cert, key=leaf.key)

    def user_credentials(self) -> Credentials:
        """The local user's: the admin token and the CA, as in ``client.toml``."""
        from livemig.cli.config import read_toml

        data = read_toml(self.client_file)
        ca = data.get("ca")
        return Credentials(ca=Path(str(ca)) if ca else None, token=data.get("token"))

    def _remember(self, config: RegionConfig) -> None:
        if config.insecure or not self.client_file.exists():
            return
        remember(config.lmo_url, self.user_credentials())
        services = self.service_credentials()
        for url in (config.blockd_url, *(h.url for h in config.hosts), *(h.vswitch_url for h in config.hosts)):
            remember(url, services)

    def client(self, timeout: float = 120.0) -> LmoClient:
        """The LMO as the local user (admin token) sees it."""
        config = self._require()
        return LmoClient(config.lmo_url, timeout)

    def _issue_pki(self, config: RegionConfig, layout: NamespaceLayout | None) -> None:
        """The region CA (kept across runs) and a fresh certificate per service and host, naming
        every address each is reached on."""
        pki.init_ca(self.pki_dir, REGION_NAME, exist_ok=True)
        gateway = [layout.service_gateway] if layout else []
        pki.issue(self.pki_dir, "lmo", Role.LMO, ["lmo", "localhost", "127.0.0.1", *gateway])
        pki.issue(self.pki_dir, "blockd", Role.BLOCKD, ["blockd", "localhost", "127.0.0.1", *gateway])
        for host in config.hosts:
            name = pki.host_leaf_name(host.name)
            api = [name, "localhost", host.address]
            pki.issue(self.pki_dir, name, Role.HOSTD, api)
            pki.issue(self.pki_dir, name, Role.VSWITCH, api)
            # QEMU is reached on the migration address; the source checks the destination's name
            pki.issue(self.pki_dir, name, Role.QEMU, [name, host.migration_address])

    def _issue_admin_token(self, config: RegionConfig) -> str:
        from livemig.control import tokens
        from livemig.control.store import Store
        from livemig.security.access import UserRole

        store = Store(self._db_url(config))
        try:
            for record in store.tokens():  # the previous run's admin token goes: only the new one works
                if record.name == ADMIN_TOKEN_NAME and record.revoked_at is None:
                    store.revoke_token(record.id)
            _record, token = tokens.issue(store, ADMIN_TOKEN_NAME, UserRole.ADMIN)
        finally:
            store.engine.dispose()
        return token

    def _tls_settings(self, role: Role, name: str) -> dict[str, object]:
        leaf = self._leaf(role, name)
        return {"tls_cert": str(leaf.cert), "tls_key": str(leaf.key), "tls_ca": str(leaf.ca)}

    def _security(self, config: RegionConfig, role: Role, name: str) -> dict[str, object]:
        return {"insecure": True} if config.insecure else self._tls_settings(role, name)

    def _config_file(self, name: str, settings: dict[str, object]) -> Path:
        from livemig.cli.config import write_toml

        self.etc_dir.mkdir(parents=True, exist_ok=True)
        comment = f"livemig {name}: written by `livemig up` (flags on the command line win)"
        return write_toml(self.etc_dir / f"{name}.toml", settings, mode=0o600, comment=comment)

    def _save(self, config: RegionConfig) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(asdict(config), indent=2))

    def running(self) -> RegionConfig | None:
        config = self.load()
        if config is None or config.lmo_pid is None or not pid_alive(config.lmo_pid):
            return None
        return config

    # ------------------------------------------------------------------ processes
    @property
    def blockd_dir(self) -> Path:
        return self.state_dir / "blockd"

    def fault_log(self, name: str) -> Path:
        """Where service ``name`` (``lmo``, ``hostd-A``, ...) records its fault firings across restarts."""
        return self.state_dir / "faults" / f"{name}.jsonl"

    def _spawn(
        self,
        name: str,
        args: list[str],
        faults: str | None = None,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> int:
        """Start ``livemig ARGS`` in the background (inside network namespace ``netns`` if given)."""
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        inherited = {k: v for k, v in os.environ.items() if k not in ("LIVEMIG_FAULTS", "LIVEMIG_CONFIG")}
        env = {**inherited, **(env or {}), "LIVEMIG_FAULT_LOG": str(self.fault_log(name))}
        if faults:
            env["LIVEMIG_FAULTS"] = faults
        enter = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
        proc = subprocess.Popen(
            [*enter, sys.executable, "-m", "livemig.cli.main", *args], env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        return proc.pid

    def start_lmo(self, config: RegionConfig, faults: str | None = None) -> None:
        config.lmo_pid = self._spawn("lmo", self._lmo_args(config, config.lmo_port), faults)
        self._save(config)

    def _db_url(self, config: RegionConfig) -> str:
        return config.db_url or f"sqlite:///{self.state_dir / 'lmo.db'}"

    def _lmo_args(self, config: RegionConfig, port: int) -> list[str]:
        path = self._config_file("lmo", {
            "listen": f"{config.lmo_address}:{config.lmo_port}", "db": self._db_url(config),
            "blockd": config.blockd_url, "migration_tls": config.migration_tls,
            **self._security(config, Role.LMO, "lmo"),
        })  # fmt: skip
        return ["lmo", "--config", str(path), "--listen", f"{config.lmo_address}:{port}"]  # a replica's own port

    def set_migration_tls(self, on: bool) -> None:
        """Whether the LMO asks for TLS on migration streams, from its next (re)start (benchmarks)."""
        config = self._require()
        config.migration_tls = on
        self._save(config)

    def start_blockd(self, config: RegionConfig, env: dict[str, str] | None = None) -> None:
        # namespace hosts' QEMUs reach NBD through the service bridge, not the root's loopback
        layout = None if config.netns_region is None else NamespaceLayout(config.netns_region)
        nbd_address = layout.service_gateway if layout else "127.0.0.1"
        if config.blockd_disk_mib:
            disk.mount_tmpfs(self.blockd_dir, config.blockd_disk_mib)
        path = self._config_file("blockd", {
            "data_dir": str(self.blockd_dir), "listen": f"127.0.0.1:{config.blockd_port}",
            "nbd_listen": f"{nbd_address}:{config.nbd_port}", **self._security(config, Role.BLOCKD, "blockd"),
        })  # fmt: skip
        config.blockd_pid = self._spawn("blockd", ["blockd", "--config", str(path)], env=env)
        self._save(config)

    def start_vswitch(self, config: RegionConfig, host: HostConfig) -> None:
        name = pki.host_leaf_name(host.name)
        path = self._config_file(f"vswitch-{host.name}", {
            "name": host.name, "listen": f"{host.address}:{host.vswitch_port}", "overlay": host.overlay,
            "state_dir": str(self.state_dir / "vswitches" / host.name), **self._security(config, Role.VSWITCH, name),
        })  # fmt: skip
        host.vswitch_pid = self._spawn(f"vswitch-{host.name}", ["vswitch", "--config", str(path)], netns=host.netns)
        self._save(config)

    def kill_blockd(self, sig: int = signal.SIGKILL) -> None:
        config = self._require()
        if config.blockd_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(config.blockd_pid, sig)
            wait_gone(config.blockd_pid, 5.0)

    def restart_blockd(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        """Start blockd again on the same data and ports (``env``: e.g. a test-only switch)."""
        config = self._require()
        if config.blockd_pid is not None and pid_alive(config.blockd_pid):
            self.kill_blockd()
        self.start_blockd(config, env)
        self.wait_ready(config, timeout)

    def kill_vswitch(self, name: str, sig: int = signal.SIGKILL) -> None:
        host = self._host(name)
        if host.vswitch_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(host.vswitch_pid, sig)
            wait_gone(host.vswitch_pid, 5.0)

    def restart_vswitch(self, name: str, timeout: float = 30.0) -> None:
        config = self._require()
        host = next(h for h in config.hosts if h.name == name)
        if host.vswitch_pid is not None and pid_alive(host.vswitch_pid):
            self.kill_vswitch(name)
        self.start_vswitch(config, host)
        self.wait_ready(config, timeout)

    def service_pids(self) -> dict[str, int | None]:
        """Every service's pid by name: ``lmo``, ``blockd``, ``hostd-<host>``, ``vswitch-<host>``."""
        config = self._require()
        pids: dict[str, int | None] = {"lmo": config.lmo_pid, "blockd": config.blockd_pid}
        for host in config.hosts:
            pids[f"hostd-{host.name}"] = host.pid
            pids[f"vswitch-{host.name}"] = host.vswitch_pid
        return pids

    def _host(self, name: str) -> HostConfig:
        return next(h for h in self._require().hosts if h.name == name)

    def add_lmo_replica(self, faults: str | None = None, timeout: float = 30.0) -> str:
        """Start one more LMO on the same store (PostgreSQL for HA); returns its URL."""
        config = self._require()
        port = free_port()
        config.replica_pids.append(self._spawn(f"lmo-{port}", self._lmo_args(config, port), faults))
        self._save(config)
        url = f"{config.scheme}://{config.lmo_address}:{port}"
        if not config.insecure:
            remember(url, self.user_credentials())
        deadline = time.monotonic() + timeout
        with LmoClient(url, timeout=2) as lmo:
            while time.monotonic() < deadline:
                with contextlib.suppress(LivemigError):
                    lmo.run(wire_lmo.health())
                    return url
                time.sleep(0.1)
        raise BootstrapError(f"LMO replica on {url} did not come up; see {self.state_dir / 'logs'}")

    def start_host(self, config: RegionConfig, host: HostConfig, faults: str | None = None) -> None:
        name = pki.host_leaf_name(host.name)
        security = self._security(config, Role.HOSTD, name)
        if not config.insecure:
            qemu = self._leaf(Role.QEMU, name)
            security |= {"qemu_cert": str(qemu.cert), "qemu_key": str(qemu.key)}
        path = self._config_file(f"hostd-{host.name}", {
            "name": host.name, "listen": f"{host.address}:{host.port}", "url": host.url,
            "state_dir": str(self.state_dir / "hosts" / host.name), "migration_address": host.migration_address,
            "lmo": config.lmo_url, "accel": config.accel, "migration_bandwidth": host.migration_bandwidth_mib_s,
            "vswitch": host.vswitch_url, "overlay": host.overlay, "memory_mib": host.memory_mib, "netns": host.netns,
            "ovmf_dir": host.ovmf_dir, **security,
        })  # fmt: skip
        host.pid = self._spawn(f"hostd-{host.name}", ["hostd", "--config", str(path)], faults, netns=host.netns)
        self._save(config)

    def up(
        self, hosts: tuple[str, ...] = DEFAULT_HOSTS, accel: str = "auto", timeout: float = 30.0,
        db_url: str | None = None, netns: bool = False, migration_bandwidth_mib_s: int = 1024,
        blockd_disk_mib: int | None = None,
        insecure: bool = False,
    ) -> RegionConfig:  # fmt: skip
        """Start the LMO, blockd and per host a vswitch and a hostd; reuse the region if it already runs.

        ``netns``: namespace hosts (root; ``hostns.py``), whose migration traffic crosses a real
        interface that tc holds to each migration's reserved share. ``blockd_disk_mib``: blockd's
        data on a tmpfs of that size (root), a disk that can be filled. ``insecure``: no PKI, no
        tokens, plain HTTP and plain streams (a lab)."""
        existing = self.running()
        if existing is not None:
            return existing
        layout = NamespaceLayout.for_state_dir(self.state_dir) if netns else None
        scheme = "http" if insecure else "https"
        ports = iter(free_ports(3 + 2 * len(hosts)))  # one batch: every service gets its own port
        config = RegionConfig(
            lmo_port=next(ports),
            hosts=[
                HostConfig(
                    name,
                    next(ports),
                    layout.migration_address(i) if layout else f"127.0.100.{i + 1}",
                    migration_bandwidth_mib_s=migration_bandwidth_mib_s,
                    vswitch_port=next(ports),
                    overlay=f"{layout.service_address(i)}:{NETNS_OVERLAY_PORT}" if layout else overlay_endpoint(i),
                    netns=layout.netns(i) if layout else None,
                    address=layout.service_address(i) if layout else "127.0.0.1",
                    scheme=scheme,
                )
                for i, name in enumerate(hosts)
            ],
            accel=accel,
            db_url=db_url,
            blockd_port=next(ports),
            nbd_port=next(ports),
            netns_region=layout.region if layout else None,
            blockd_disk_mib=blockd_disk_mib,
            insecure=insecure,
            lmo_address=layout.service_gateway if layout else "127.0.0.1",
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if layout is not None:
            hostns.plumb(layout, len(config.hosts))
        if insecure:
            self.client_file.unlink(missing_ok=True)
        else:
            self._issue_pki(config, layout)
            from livemig.cli.config import write_client_config

            token = self._issue_admin_token(config)
            write_client_config(self.client_file, config.lmo_url, self.pki_dir / pki.CA_CERT, token)
        self._remember(config)
        self.start_blockd(config)
        self.start_lmo(config)
        for host in config.hosts:
            self.start_vswitch(config, host)
            self.start_host(config, host)
        try:
            self.wait_ready(config, timeout)
        except BootstrapError:
            self.down()  # never leave half a region running
            raise
        return config

    def wait_ready(self, config: RegionConfig, timeout: float = 30.0) -> None:
        """Wait until the LMO answers and knows every host, and every hostd is healthy."""
        deadline = time.monotonic() + timeout
        wanted = {h.name for h in config.hosts}
        with contextlib.ExitStack() as clients:
            lmo = clients.enter_context(LmoClient(config.lmo_url, timeout=5))
            blockd = clients.enter_context(BlockingBlockdClient(config.blockd_url, timeout=5))
            switches = [clients.enter_context(VswitchClient(h.vswitch_url, timeout=5)) for h in config.hosts]
            while time.monotonic() < deadline:
                with contextlib.suppress(LivemigError):
                    ready = {h.registration.name for h in lmo.hosts() if h.info is not None}
                    blockd.run(wire_blockd.health())
                    for switch in switches:
                        switch.health()
                    if wanted <= ready:
                        return
                time.sleep(0.2)
        raise BootstrapError(f"region did not come up within {timeout:.0f}s; see {self.state_dir / 'logs'}")

    def down(self, stop_vms: bool = True) -> None:
        """Stop the LMO, every hostd and (by default) every VM the hosts run."""
        config = self.load()
        if config is None:
            return
        for pid in [config.lmo_pid, *config.replica_pids, *(h.pid for h in config.hosts),
                    *(h.vswitch_pid for h in config.hosts), config.blockd_pid]:  # fmt: skip
            if pid is not None:
                _terminate(pid)
        if stop_vms:
            for pidfile in (self.state_dir / "hosts").glob("*/vms/*/qemu.pid"):
                with contextlib.suppress(OSError, ValueError):
                    _terminate(int(pidfile.read_text().strip()))
            if config.netns_region is not None:  # the VMs are gone, so their namespaces can go
                hostns.unplumb(NamespaceLayout(config.netns_region), len(config.hosts))
        if config.blockd_disk_mib:
            disk.unmount(self.blockd_dir)
        self.config_path.unlink(missing_ok=True)

    def kill_host(self, name: str, sig: int = signal.SIGKILL) -> None:
        config = self._require()
        host = next(h for h in config.hosts if h.name == name)
        if host.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(host.pid, sig)
            wait_gone(host.pid, 5.0)

    def restart_host(self, name: str, timeout: float = 30.0, faults: str | None = None) -> None:
        config = self._require()
        host = next(h for h in config.hosts if h.name == name)
        self.start_host(config, host, faults)
        self.wait_ready(config, timeout)

    def kill_lmo(self, sig: int = signal.SIGKILL) -> None:
        config = self._require()
        if config.lmo_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(config.lmo_pid, sig)
            wait_gone(config.lmo_pid, 5.0)

    def restart_lmo(self, faults: str | None = None, timeout: float = 30.0) -> None:
        """(Re)start the LMO, optionally with a fault plan (see ``livemig.faults.points``)."""
        config = self._require()
        if config.lmo_pid is not None and pid_alive(config.lmo_pid):
            self.kill_lmo()
        self.start_lmo(config, faults)
        self.wait_ready(config, timeout)

    def lmo_alive(self) -> bool:
        config = self._require()
        if config.lmo_pid is None:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(config.lmo_pid, os.WNOHANG)
        return pid_alive(config.lmo_pid)

    def _require(self) -> RegionConfig:
        config = self.load()
        if config is None:
            raise BootstrapError(f"no region in {self.state_dir}: run `livemig up`")
        return config


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a stopped process (a chaos run's SIGSTOP) must see it too
    if not wait_gone(pid, 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 2.0)
