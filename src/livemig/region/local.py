"""A local region: the LMO and N host agents as background processes on loopback.

Used by ``livemig up``/``down``, the demo, the tests and the benchmarks, so all of them start
the system the same way a user does. Every host gets its own API port and its own migration
address (127.0.100.N), so migration traffic never uses an API address even on one machine.
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
from livemig.region import hostns
from livemig.region.freeport import free_port, free_ports
from livemig.region.hostns import NamespaceLayout
from livemig.region.proc import pid_alive, wait_gone
from livemig.wire import blockd as wire_blockd
from livemig.wire import lmo as wire_lmo
from livemig.wire.blockd import BlockingBlockdClient
from livemig.wire.lmo import LmoClient
from livemig.wire.vswitch import VswitchClient

DEFAULT_HOSTS = ("A", "B")


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
    netns: str | None = None  # a namespace host (hostns.py): its QEMUs and migration address live there
    ovmf_dir: str | None = None  # this host's OVMF files, if not Debian's (/usr/share/OVMF)

    @property
    def vswitch_url(self) -> str:
        return f"http://127.0.0.1:{self.vswitch_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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

    @property
    def lmo_url(self) -> str:
        return f"http://127.0.0.1:{self.lmo_port}"

    @property
    def blockd_url(self) -> str:
        return f"http://127.0.0.1:{self.blockd_port}"


class Region:
    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.config_path = self.state_dir / "region.json"

    # ------------------------------------------------------------------ config
    def load(self) -> RegionConfig | None:
        if not self.config_path.exists():
            return None
        raw = json.loads(self.config_path.read_text())
        raw["hosts"] = [HostConfig(**h) for h in raw["hosts"]]
        return RegionConfig(**raw)

    def _save(self, config: RegionConfig) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(asdict(config), indent=2))

    def running(self) -> RegionConfig | None:
        config = self.load()
        if config is None or config.lmo_pid is None or not pid_alive(config.lmo_pid):
            return None
        return config

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str], faults: str | None = None) -> int:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        env = {k: v for k, v in os.environ.items() if k != "LIVEMIG_FAULTS"}
        if faults:
            env["LIVEMIG_FAULTS"] = faults
        proc = subprocess.Popen(
            [sys.executable, "-m", "livemig.cli.main", *args], env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        out.close()
        return proc.pid

    def start_lmo(self, config: RegionConfig, faults: str | None = None) -> None:
        config.lmo_pid = self._spawn("lmo", self._lmo_args(config, config.lmo_port), faults)
        self._save(config)

    def _lmo_args(self, config: RegionConfig, port: int) -> list[str]:
        db = config.db_url or f"sqlite:///{self.state_dir / 'lmo.db'}"
        return ["lmo", "--listen", f"127.0.0.1:{port}", "--db", db, "--blockd", config.blockd_url]

    def start_blockd(self, config: RegionConfig) -> None:
        # namespace hosts' QEMUs reach NBD through the service bridge, not the root's loopback
        layout = None if config.netns_region is None else NamespaceLayout(config.netns_region)
        nbd_address = layout.service_gateway if layout else "127.0.0.1"
        config.blockd_pid = self._spawn("blockd", [
            "blockd", "--data-dir", str(self.state_dir / "blockd"), "--listen", f"127.0.0.1:{config.blockd_port}",
            "--nbd-listen", f"{nbd_address}:{config.nbd_port}",
        ])  # fmt: skip
        self._save(config)

    def start_vswitch(self, config: RegionConfig, host: HostConfig) -> None:
        host.vswitch_pid = self._spawn(f"vswitch-{host.name}", [
            "vswitch", "--name", host.name, "--listen", f"127.0.0.1:{host.vswitch_port}", "--overlay", host.overlay,
        ])  # fmt: skip
        self._save(config)

    def kill_blockd(self, sig: int = signal.SIGKILL) -> None:
        config = self._require()
        if config.blockd_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(config.blockd_pid, sig)
            wait_gone(config.blockd_pid, 5.0)

    def restart_blockd(self, timeout: float = 30.0) -> None:
        config = self._require()
        self.start_blockd(config)
        self.wait_ready(config, timeout)

    def add_lmo_replica(self, faults: str | None = None, timeout: float = 30.0) -> str:
        """Start one more LMO on the same store (PostgreSQL for HA); returns its URL."""
        config = self._require()
        port = free_port()
        config.replica_pids.append(self._spawn(f"lmo-{port}", self._lmo_args(config, port), faults))
        self._save(config)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        with LmoClient(url, timeout=2) as lmo:
            while time.monotonic() < deadline:
                with contextlib.suppress(LivemigError):
                    lmo.run(wire_lmo.health())
                    return url
                time.sleep(0.1)
        raise BootstrapError(f"LMO replica on {url} did not come up; see {self.state_dir / 'logs'}")

    def start_host(self, config: RegionConfig, host: HostConfig, faults: str | None = None) -> None:
        host.pid = self._spawn(f"hostd-{host.name}", [
            "hostd", "--name", host.name, "--listen", f"127.0.0.1:{host.port}",
            "--state-dir", str(self.state_dir / "hosts" / host.name),
            "--migration-address", host.migration_address, "--lmo", config.lmo_url,
            "--accel", config.accel, "--migration-bandwidth", str(host.migration_bandwidth_mib_s),
            "--vswitch", host.vswitch_url, "--overlay", host.overlay,
            *(["--memory-mib", str(host.memory_mib)] if host.memory_mib else []),
            *(["--netns", host.netns] if host.netns else []),
            *(["--ovmf-dir", host.ovmf_dir] if host.ovmf_dir else []),
        ], faults)  # fmt: skip
        self._save(config)

    def up(
        self, hosts: tuple[str, ...] = DEFAULT_HOSTS, accel: str = "auto", timeout: float = 30.0,
        db_url: str | None = None, netns: bool = False, migration_bandwidth_mib_s: int = 1024,
    ) -> RegionConfig:  # fmt: skip
        """Start the LMO and one hostd per name; reuse the region if it already runs.

        ``netns``: namespace hosts (root; ``hostns.py``), whose migration traffic crosses a real
        interface that tc holds to each migration's reserved share."""
        existing = self.running()
        if existing is not None:
            return existing
        layout = NamespaceLayout.for_state_dir(self.state_dir) if netns else None
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
                    overlay=overlay_endpoint(i),
                    netns=layout.netns(i) if layout else None,
                )
                for i, name in enumerate(hosts)
            ],
            accel=accel,
            db_url=db_url,
            blockd_port=next(ports),
            nbd_port=next(ports),
            netns_region=layout.region if layout else None,
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if layout is not None:
            hostns.plumb(layout, len(config.hosts))
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
    if not wait_gone(pid, 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 2.0)
