"""The demo's network: the VM's VNIC on a VCN and, as root, traffic through a gateway to it.

The VNIC needs no privileges (QEMU's NIC is a datagram socket of the unprivileged vswitch), so
the demo VM always has one and every migration moves it: dual ingress, the flow copy, the
hand-off inside the pause. Watching that from outside needs a gateway: a tap VNIC in a network
namespace (``livemig net gateway``, root). From it a TCP echo (one connection for the whole demo)
and a UDP sequence stream run across both migrations; the echo client cuts its run into one
segment per migration (``netprobe --mark-file``), and the guest's own UDP counters are read before
and after each migration, so every number in the report belongs to one migration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError
from livemig.model.vm import NicDevice
from livemig.wire.lmo import LmoClient

SUBNET, SUBNET_GATEWAY = "10.88.1.0/24", "10.88.1.1"
GUEST_VNIC, GUEST_IP, GUEST_MAC = "demo-nic", "10.88.1.10", "52:54:00:88:01:10"
GATEWAY_VNIC, GATEWAY_IP, GATEWAY_MAC = "demo-gw", "10.88.1.2", "52:54:00:88:01:02"
ECHO_PORT, UDP_PORT = 7, 9  # what the guest workload serves in network mode
#: light enough to leave the TCG guest and the vswitches their CPU on a busy 2-core machine, dense
#: enough to see a pause of tens of milliseconds
ECHO_INTERVAL_MS = 10
UDP_PPS = 200
MARK_TIMEOUT_S = 10.0  # an echo round trip, even through a busy TCG guest, is far shorter


def guest_nic() -> NicDevice:
    """The demo VM's NIC on the VCN (its VNIC follows the VM from host to host)."""
    return NicDevice(id="nic0", pci_addr="0x3", mac=GUEST_MAC, backend="vswitch", vnic=GUEST_VNIC)


def put_network(lmo: LmoClient, gateway_host: str) -> None:
    """The VCN, its subnet, the security lists and both VNICs: the guest's (placed with the VM)
    and the gateway's, on ``gateway_host``. The guest admits only its echo and UDP sink."""
    put = lmo.put_network_object
    put("vcns", {"id": "demo-vcn", "cidr": "10.88.0.0/16", "vni": 880})
    put("subnets", {"id": "demo-net", "vcn": "demo-vcn", "cidr": SUBNET, "gateway": SUBNET_GATEWAY})
    put("security-lists", {"id": "demo-guest", "rules": [
        {"direction": "ingress", "protocol": "tcp", "cidr": SUBNET, "dst_ports": {"min": ECHO_PORT, "max": ECHO_PORT}},
        {"direction": "ingress", "protocol": "udp", "cidr": SUBNET, "dst_ports": {"min": UDP_PORT, "max": UDP_PORT}},
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
    ]})  # fmt: skip
    put("security-lists", {"id": "demo-open", "rules": [
        {"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"},
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
    ]})  # fmt: skip
    put("vnics", {"id": GATEWAY_VNIC, "mac": GATEWAY_MAC, "ip": GATEWAY_IP, "subnet": "demo-net",
                  "security_lists": ["demo-open"], "host": gateway_host})  # fmt: skip
    put("vnics", {"id": GUEST_VNIC, "mac": GUEST_MAC, "ip": GUEST_IP, "subnet": "demo-net",
                  "security_lists": ["demo-guest"], "host": ""})  # fmt: skip


def probes_unavailable(euid: int | None = None, tun: Path = Path("/dev/net/tun"),
                       ip_tool: str | None = "") -> str | None:  # fmt: skip
    """Why the probes cannot run here (None: they can). The gateway is a tap device in a network
    namespace: root, the tun device and iproute2's ``ip``."""
    euid = os.geteuid() if euid is None else euid
    ip_tool = shutil.which("ip") if ip_tool == "" else ip_tool
    why = "the gateway into the VCN is a tap device in a network namespace"
    if euid != 0:
        return f"not root ({why}); run the demo as root to see them"
    if not tun.exists():
        return f"no {tun} ({why}; load the tun module)"
    if ip_tool is None:
        return f"no `ip` command ({why}; install iproute2)"
    return None


def open_gateway(lmo: LmoClient, state_dir: Path) -> str:
    """The demo's gateway namespace, as ``livemig net gateway demo-gw`` makes it; returns its name.

    A previous run's namespace is removed first: its tap died with that run's vswitch. The tap
    goes when its vswitch stops (``livemig down``), the namespace with :func:`close_gateway`."""
    from livemig.cli.guestnet import gateway_netns
    from livemig.cli.guestnet import open_gateway as open_vnic_gateway

    netns = gateway_netns("demo-net")
    close_gateway(netns)
    open_vnic_gateway(lmo, GATEWAY_VNIC, netns, state_dir)
    return netns


def close_gateway(netns: str) -> None:
    from livemig.region.netplumb import delete_netns

    delete_netns(netns)


class Probes:
    """A TCP echo and a UDP stream from the gateway namespace to the guest, for the whole demo."""

    def __init__(self, lmo: LmoClient, vm: str, netns: str, workdir: Path) -> None:
        self.lmo = lmo
        self.vm = vm
        self.workdir = workdir
        self.mark_file = workdir / "mark"
        self.stop_file = workdir / "stop"
        self.stop_file.unlink(missing_ok=True)
        self.mark_file.unlink(missing_ok=True)
        common = ["--stop-file", str(self.stop_file), "--max-s", "900"]
        self.echo = self._start(netns, "tcp-echo", str(ECHO_PORT), "--interval-ms", str(ECHO_INTERVAL_MS),
                                "--mark-file", str(self.mark_file), *common)  # fmt: skip
        self.udp = self._start(netns, "udp-send", str(UDP_PORT), "--pps", str(UDP_PPS), *common)
        self.results: tuple[dict[str, Any], dict[str, Any]] | None = None

    @staticmethod
    def _start(netns: str, mode: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "livemig.testing.netprobe",
                                 mode, GUEST_IP, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def warm_up(self, timeout: float = 30.0) -> bool:
        """Until an echo came back and the guest counted UDP datagrams: both paths carry traffic."""
        if not self.mark("warm-up"):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.udp.poll() is None:
            counters = self.udp_counters()
            if counters and counters.get("received", 0) > 0:
                return True
            time.sleep(0.2)
        return False

    def mark(self, label: str) -> bool:
        """Start the echo's segment ``label``; True once the probe took it (an echo came back)."""
        staged = self.workdir / "mark.new"
        staged.write_text(label)
        staged.rename(self.mark_file)  # whole, never half-written
        deadline = time.monotonic() + MARK_TIMEOUT_S
        while time.monotonic() < deadline and self.echo.poll() is None:
            if not self.mark_file.exists():
                return True
            time.sleep(0.01)
        self.mark_file.unlink(missing_ok=True)
        return False

    def udp_counters(self, timeout: float = 20.0) -> dict[str, int] | None:
        """The guest's UDP sink counters (received, lost, duplicated, reordered, max_seq)."""
        token = f"demo{time.monotonic_ns() % 10**9}"
        try:
            self.lmo.console_input(self.vm, f"udpstats {token}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for line in self.lmo.console(self.vm, tail=40).splitlines():
                    if line.startswith(f"LIVEMIG UDPSTATS {token} "):
                        return parse_counters(line.split()[3:])
                time.sleep(0.2)
        except LivemigError:
            pass
        return None

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stop both probes; their reports (echo, udp). Idempotent."""
        if self.results is None:
            self.stop_file.touch()
            self.results = (_report(self.echo), _report(self.udp))
        return self.results


def parse_counters(fields: list[str]) -> dict[str, int]:
    """``received=5 lost=0 ...`` into numbers (fields that are not ``name=integer`` are left out)."""
    pairs = (field.split("=", 1) for field in fields if "=" in field)
    return {name: int(value) for name, value in pairs if value.lstrip("-").isdigit()}


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    try:
        return dict(json.loads(out))
    except ValueError:
        return {"error": f"the probe failed: {err.strip()[-300:] or f'exit status {proc.returncode}'}"}
