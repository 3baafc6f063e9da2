"""What a chaos run stands on: a local region, its services' clients, the chaos VM (a real guest
with the livemig workload, a volume on blockd and a NIC on the VCN), TCP gateways into the VCN, a
supervisor that restarts whatever a fault killed, and the reset that undoes every fault.

Why a supervisor: in a real region systemd restarts a crashed hostd, blockd, vswitch or LMO; the
invariants are about what the system does *with* such restarts, so the run plays that part
(within a second). QEMU is never restarted: a killed QEMU is a lost guest, and that is what a
scenario that kills one must show.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livemig.chaos import external, qemus
from livemig.errors import LivemigError
from livemig.model.migration import MigrationParams, Phase
from livemig.model.vm import NbdExport, NicDevice, VmSpec
from livemig.region import disk
from livemig.region.hostns import NamespaceLayout
from livemig.region.local import RegionConfig
from livemig.region.proc import pid_alive
from livemig.wire import blockd as wire_blockd
from livemig.wire import faults as wire_faults
from livemig.wire import hostd as wire_hostd
from livemig.wire import vswitch as wire_vswitch
from livemig.wire.base import SyncService
from livemig.wire.lmo import LmoClient

if TYPE_CHECKING:
    from livemig.region.local import Region

VM, VOLUME, VNIC = "chaosvm", "chaosvol", "chaos-nic"
VOLUME_MIB = 64
GUEST_IP, SUBNET, GATEWAY = "10.77.1.10", "10.77.1.0/24", "10.77.1.1"
GUEST_MAC = "52:54:00:77:01:10"
#: the migration every scenario runs: slow enough that pre-copy lasts seconds (a fault can land in it)
PARAMS = MigrationParams(max_bandwidth_mib_s=32)
Say = Callable[[str], None]


class ChaosEnv:
    def __init__(self, region: Region, say: Say | None = None, memory_mib: int = 256) -> None:
        self.region = region
        self.say: Say = say or (lambda _line: None)
        self.memory_mib = memory_mib
        self._clients: dict[str, SyncService] = {}
        self.lmo = LmoClient(self.config.lmo_url, timeout=60)
        self.vm_ok = False
        tag = self.config.netns_region if self.config.netns_region is not None else os.getpid() % 1000
        self.gateways = {h.name: (f"lmcg{tag}{h.name.lower()}", f"lmct{tag}{h.name.lower()}",
                                  f"chaos-gw-{h.name.lower()}", f"10.77.1.{2 + i}", f"52:54:00:77:01:{2 + i:02x}")
                         for i, h in enumerate(self.config.hosts[:2])}  # fmt: skip
        self.partition: external.Partition | None = None
        self.postgres = external.PostgresCluster.for_url(self.config.db_url)
        self.filler = external.DiskFill(self.region.blockd_dir)
        self.supervisor = Supervisor(self)

    # ------------------------------------------------------------------ the region

    @property
    def config(self) -> RegionConfig:
        config = self.region.load()
        if config is None:
            raise LivemigError(f"no region in {self.region.state_dir}")
        return config

    @property
    def hosts(self) -> list[str]:
        return [h.name for h in self.config.hosts[:2]]

    def other(self, host: str) -> str:
        return next(h for h in self.hosts if h != host)

    def missing(self, need: str) -> str | None:
        """Why this region cannot run scenarios that need ``need`` (None: it can)."""
        config = self.config
        if need == "netns" and config.netns_region is None:
            return "needs namespace hosts (root: livemig up --netns)"
        if need == "postgres" and self.postgres is None:
            return "needs the LMO on a local PostgreSQL (livemig up --db postgresql+psycopg://...)"
        if need == "disk" and not (config.blockd_disk_mib and disk.is_mounted(self.region.blockd_dir)):
            return "needs blockd on a size-limited disk (root: livemig up --blockd-disk-mib N)"
        if need == "nic" and (os.geteuid() != 0 or not Path("/dev/net/tun").exists()):
            return "needs root for a TCP gateway into the VCN (a tap device)"
        return None

    def client(self, role: str) -> SyncService:
        """A client for ``lmo``, ``blockd``, ``hostd-<host>`` or ``vswitch-<host>``."""
        config = self.config
        urls = {"lmo": config.lmo_url, "blockd": config.blockd_url}
        for host in config.hosts:
            urls[f"hostd-{host.name}"] = host.url
            urls[f"vswitch-{host.name}"] = host.vswitch_url
        url = urls[role]
        cached = self._clients.get(role)
        if cached is None or cached.base_url != url.rstrip("/"):
            cached = self._clients[role] = SyncService(role, url, timeout=10.0)
        return cached

    def roles(self) -> list[str]:
        return ["lmo", "blockd", *(f"{kind}-{h}" for h in self.hosts for kind in ("hostd", "vswitch"))]

    # ------------------------------------------------------------------ the chaos VM

    def owner(self) -> str:
        return self.lmo.vm(VM).host

    def spec(self) -> VmSpec:
        from livemig.guest.workload import workload_vm_spec

        spec = workload_vm_spec(memory_mib=self.memory_mib, rate=8, wss_mib=32, name=VM, volume=VOLUME, disk_rate=5)
        if self.missing("nic") is None:
            spec.devices.append(NicDevice(id="nic0", pci_addr="0x3", mac=GUEST_MAC, backend="vswitch", vnic=VNIC))
        return spec

    def setup(self) -> None:
        """The VCN objects, the gateways and the chaos VM (created if missing, else checked)."""
        if self.missing("nic") is None:
            self._network()
            for host in self.hosts:
                self.ensure_gateway(host)
        self.ensure_vm()

    def _network(self) -> None:
        put = self.lmo.put_network_object
        put("vcns", {"id": "chaos-vcn", "cidr": "10.77.0.0/16", "vni": 777})
        put("subnets", {"id": "chaos-net", "vcn": "chaos-vcn", "cidr": SUBNET, "gateway": GATEWAY})
        put("security-lists", {"id": "chaos-guest", "rules": [
            {"direction": "ingress", "protocol": "tcp", "cidr": SUBNET, "dst_ports": {"min": 7, "max": 7}},
            {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
        ]})  # fmt: skip
        put("security-lists", {"id": "chaos-open", "rules": [
            {"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"},
            {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
        ]})  # fmt: skip
        for host, (_ns, _tap, vnic, ip, mac) in self.gateways.items():
            put("vnics", {"id": vnic, "mac": mac, "ip": ip, "subnet": "chaos-net", "security_lists": ["chaos-open"],
                          "host": host})  # fmt: skip
        current = {v["id"]: v for v in self.lmo.run(_network_objects("vnics"))}
        if VNIC not in current:
            put("vnics", {"id": VNIC, "mac": GUEST_MAC, "ip": GUEST_IP, "subnet": "chaos-net",
                          "security_lists": ["chaos-guest"], "host": ""})  # fmt: skip

    def ensure_gateway(self, host: str) -> None:
        """A namespace with a tap VNIC on ``host``'s vswitch (again, if a vswitch restart took it)."""
        from livemig.network.gateway import plumb_tap
        from livemig.region.netplumb import create_netns, netns_exists

        netns, tap, vnic, ip, mac = self.gateways[host]
        if netns_exists(netns) and _link_exists(netns, tap):
            return
        if not netns_exists(netns):
            create_netns(netns)
        switch = self.client(f"vswitch-{host}")
        with contextlib.suppress(LivemigError):
            switch.run(wire_vswitch.detach(vnic))
        switch.run(wire_vswitch.attach(vnic, tap=tap))
        where = next((h.netns for h in self.config.hosts if h.name == host), None)
        plumb_tap(tap, netns, mac, f"{ip}/24", GATEWAY, from_netns=where)

    def remove_gateways(self) -> None:
        from livemig.region.netplumb import delete_netns

        for host, (netns, _tap, vnic, _ip, _mac) in self.gateways.items():
            with contextlib.suppress(LivemigError, KeyError):
                self.client(f"vswitch-{host}").run(wire_vswitch.detach(vnic))
            delete_netns(netns)

    def ensure_vm(self) -> None:
        """The chaos VM running and answering on some host; recreated (with a fresh volume) if not."""
        if self.vm_ok and self._vm_running():
            return
        if self._vm_running() and self.memory_check()[0]:
            self.vm_ok = True
            return
        self.say("  (re)creating the chaos VM")
        self.recreate_vm()

    def _vm_running(self) -> bool:
        try:
            view = self.lmo.vm(VM)
        except LivemigError:
            return False
        return view.observed is not None and view.observed.state.value == "running"

    def recreate_vm(self) -> None:
        self.remove_vm()
        with contextlib.suppress(LivemigError):
            self.lmo.delete_volume(VOLUME)
        self.lmo.create_volume(VOLUME, VOLUME_MIB, preallocate=True)
        self.lmo.create_vm(self.spec(), host=self.hosts[0])
        needles = ["LIVEMIG HB", "disk_acked="] + (["net=" + GUEST_IP] if self.missing("nic") is None else [])
        for needle in needles:
            self.lmo.wait_for_console(VM, needle, timeout=120)
        self.vm_ok = True

    def remove_vm(self) -> None:
        """The chaos VM gone from the LMO, every host, blockd and the machine (stray QEMUs)."""
        deadline = time.monotonic() + 120
        while self.lmo.migrations(vm=VM, active=True) and time.monotonic() < deadline:
            time.sleep(0.5)
        with contextlib.suppress(LivemigError):
            self.lmo.delete_vm(VM)
        for host in self.hosts:
            with contextlib.suppress(LivemigError):
                self.client(f"hostd-{host}").run(wire_hostd.destroy_vm(VM))
        for process in qemus.qemu_daemons(VM):
            external.kill(process.pid)
        with contextlib.suppress(LivemigError):
            for attachment in self.client("blockd").run(wire_blockd.attachments(VOLUME)):
                with contextlib.suppress(LivemigError):
                    self.client("blockd").run(wire_blockd.detach(attachment.id))
        self.vm_ok = False

    def memory_check(self) -> tuple[bool, str]:
        try:
            reply = self.lmo.guest_check(VM)
        except LivemigError as exc:
            return False, exc.message
        return reply.ok, reply.detail

    def disk_check(self, host: str) -> tuple[bool, str]:
        try:
            reply = self.client(f"hostd-{host}").run(wire_hostd.disk_check(VM))
        except LivemigError as exc:
            return False, exc.message
        return reply.ok, reply.detail

    def source_export(self, host: str) -> NbdExport | None:
        """The NBD export of the VM's volume on ``host``, as its hostd recorded it (a local region)."""
        record = self.region.state_dir / "hosts" / host / "vms" / VM / "vm.json"
        try:
            exports = json.loads(record.read_text()).get("exports", {})
        except (OSError, ValueError):
            return None
        return NbdExport.model_validate(next(iter(exports.values()))) if exports else None

    def volume_bytes(self, offset: int, length: int) -> bytes:
        with open(self.region.blockd_dir / "volumes" / f"{VOLUME}.vol", "rb") as f:
            f.seek(offset)
            return f.read(length)

    def volume_state(self) -> tuple[list[dict[str, Any]], str | None]:
        """The volume's active attachments (as blockd reports them) and its writer."""
        block = self.client("blockd")
        attachments = [a.model_dump() for a in block.run(wire_blockd.attachments(VOLUME))]
        return attachments, block.run(wire_blockd.volume(VOLUME)).writer

    # ------------------------------------------------------------------ processes

    def pid_of(self, target: str, source: str, destination: str) -> int | None:
        """The pid behind a scenario's target name (``hostd-src``, ``qemu-dst``, ``lmo``, ...)."""
        side = {"src": source, "dst": destination}
        kind, _, which = target.partition("-")
        if kind == "qemu":
            found = [p.pid for p in qemus.qemu_daemons(VM) if p.host == side[which]]
            return found[0] if found else None
        role = target if not which else f"{kind}-{side[which]}"
        return self.region.service_pids().get(role)

    def migration_ends(self, source: str, destination: str) -> list[tuple[str, str]]:
        layout = NamespaceLayout(self.config.netns_region or 0)
        index = {h.name: i for i, h in enumerate(self.config.hosts)}
        return [(layout.netns(index[source]), layout.migration_address(index[destination])),
                (layout.netns(index[destination]), layout.migration_address(index[source]))]  # fmt: skip

    # ------------------------------------------------------------------ undoing every fault

    def reset(self) -> list[str]:
        """Disarm every fault, continue every stopped process, heal, free, restart what died."""
        problems = external.undo_all(
            *([self.partition.heal] if self.partition else []),
            self.filler.free,
            *([self.postgres.restore] if self.postgres else []),
        )
        for pid in [*(p for p in self.region.service_pids().values() if p), *(q.pid for q in qemus.qemu_daemons(VM))]:
            external.cont(pid)
        self.supervisor.restart_dead()
        self.region.wait_ready(self.config, 60)
        for role in self.roles():
            with contextlib.suppress(LivemigError):
                self.client(role).run(wire_faults.disarm_all())
        return problems

    def restart_blockd(self, env: dict[str, str] | None = None) -> None:
        """Restart blockd on purpose (``env``: e.g. the test-only unsafe switch), the supervisor
        held meanwhile: between the kill and the start it would see blockd dead and start one
        of its own, with the default settings, on the ports the intended one then cannot bind."""
        with self.supervisor.held():
            self.region.restart_blockd(env=env)

    def teardown(self) -> None:
        self.supervisor.stop()
        self.reset()
        with contextlib.suppress(LivemigError):
            self.remove_vm()
        with contextlib.suppress(LivemigError):
            self.lmo.delete_volume(VOLUME)
        self.remove_gateways()
        self.lmo.close()
        for client in self._clients.values():
            client.close()


def _network_objects(kind: str) -> Any:
    from livemig.wire import lmo as wire_lmo

    return wire_lmo.network_objects(wire_lmo.NetKind(kind))


def _link_exists(netns: str, link: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", link], capture_output=True, check=False).returncode == 0


class Supervisor:
    """Restarts, within a second, any region service a fault killed (as systemd would)."""

    def __init__(self, env: ChaosEnv) -> None:
        self.env = env
        self.restarts: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="chaos-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Nothing is restarted by the supervisor meanwhile (a service restarted on purpose)."""
        with self._lock:
            yield

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            with contextlib.suppress(LivemigError, OSError):
                self.restart_dead()

    def restart_dead(self) -> list[str]:
        """Start again every service whose process is gone; returns their names."""
        with self._lock:
            region = self.env.region
            config = region.load()
            if config is None:
                return []
            restarted = []
            for role, pid in region.service_pids().items():
                if pid is not None:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)  # reap our own children
                    if pid_alive(pid):
                        continue
                if role == "lmo":
                    region.start_lmo(config)
                elif role == "blockd":
                    region.start_blockd(config)
                else:
                    kind, _, name = role.partition("-")
                    host = next(h for h in config.hosts if h.name == name)
                    (region.start_host if kind == "hostd" else region.start_vswitch)(config, host)
                restarted.append(role)
            self.restarts.extend(restarted)
            return restarted


class EchoProbe:
    """A TCP connection from a gateway namespace to the guest's echo port, kept up for a scenario."""

    def __init__(self, netns: str, stop_file: Path) -> None:
        self.stop_file = stop_file
        stop_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "livemig.testing.netprobe", "tcp-echo", GUEST_IP, "7",
             "--interval-ms", "50", "--stop-file", str(stop_file), "--max-s", "900"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def finish(self) -> dict[str, Any]:
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        try:
            return dict(json.loads(out))
        except ValueError:
            return {"sent": 0, "received": 0, "error": f"probe failed: {err.strip()[-300:]}"}


def wait_phase(lmo: LmoClient, migration_id: str, phase: Phase, timeout: float) -> bool:
    """Until the migration is in ``phase`` (PreCopy: with bytes moved) or has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = lmo.migration(migration_id)
        if m.terminal:
            return False
        if m.phase is phase and (phase is not Phase.PRECOPY or (m.last_sample and m.last_sample.transferred_bytes)):
            return True
        time.sleep(0.05)
    return False
