"""Real kernel TCP through the vswitch: two network namespaces, each behind a tap VNIC (root only).

ns lmweb<pid> (10.0.1.10, blue-a, tap on vswitch A)  ──VXLAN──  ns lmapp<pid> (10.0.2.20, blue-b, tap on vswitch B)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from livemig.network.gateway import plumb_tap
from livemig.network.model import PortRange, SecurityList, SecurityRule
from livemig.region.netplumb import netns
from livemig.testing.fakevm import SAMPLE


def _net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (root usually; not root without it, e.g. in some containers)."""
    with open("/proc/self/status") as status:
        caps = next((line.split()[1] for line in status if line.startswith("CapEff:")), "0")
    return bool(int(caps, 16) >> 12 & 1)


pytestmark = pytest.mark.skipif(
    not _net_admin() or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="tap gateway needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2",
)

SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
s.settimeout(15)
print("ready", flush=True)
conn, peer = s.accept()
conn.sendall(conn.recv(100).upper() + b" from " + peer[0].encode())
conn.close()
"""

CLIENT = """
import socket, sys
try:
    s = socket.create_connection(("10.0.2.20", int(sys.argv[1])), timeout=float(sys.argv[2]))
    s.sendall(b"hello")
    print(s.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


TAG = os.getpid() % 100000  # unique names: two test runs on one machine must not share a namespace or tap


def _in(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]


def test_kernel_tcp_between_namespaces_through_the_vcn(net):
    net.push(placement={"app": "B"})
    net.client("B").put_security_list(SecurityList(id="app", rules=[
        SecurityRule(direction="ingress", protocol="tcp", dst_ports=PortRange(min=8080, max=8080)),
    ]))  # fmt: skip
    with netns(f"lmweb{TAG}"), netns(f"lmapp{TAG}"):
        net.client("A").attach("web", tap=f"lmtw{TAG}")
        net.attached.append(("A", "web"))
        net.client("B").attach("app", tap=f"lmta{TAG}")
        net.attached.append(("B", "app"))
        plumb_tap(f"lmtw{TAG}", f"lmweb{TAG}", SAMPLE["web"][0], "10.0.1.10/24", "10.0.1.1")
        plumb_tap(f"lmta{TAG}", f"lmapp{TAG}", SAMPLE["app"][0], "10.0.2.20/24", "10.0.2.1")
        server = subprocess.Popen(_in(f"lmapp{TAG}", SERVER), stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            denied = subprocess.run(_in(f"lmweb{TAG}", CLIENT, "22", "1"), capture_output=True, text=True, timeout=20)
            assert denied.stdout.strip() in ("TimeoutError", "timeout")  # SYN to :22 dropped by app's list
            ok = subprocess.run(_in(f"lmweb{TAG}", CLIENT, "8080", "5"), capture_output=True, text=True, timeout=20)
            assert ok.stdout.strip() == "HELLO from 10.0.1.10", ok.stderr
            assert server.wait(timeout=10) == 0
        finally:
            server.kill()
            server.wait()
        assert net.counters("A")["arp_replies"] >= 1 and net.counters("B")["routed"] >= 1
        assert net.counters("B")["denied_ingress"] >= 1


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox's udhcpc")
def test_a_real_dhcp_client_gets_the_vnic_address(net):
    net.push()
    with netns(f"lmdhcp{TAG}"):
        net.client("A").attach("db", tap=f"lmtd{TAG}")
        net.attached.append(("A", "db"))
        plumb_tap(f"lmtd{TAG}", f"lmdhcp{TAG}", SAMPLE["db"][0])
        result = subprocess.run(
            ["ip", "netns", "exec", f"lmdhcp{TAG}", "busybox", "udhcpc", "-i", f"lmtd{TAG}", "-f", "-q", "-n",
             "-t", "5", "-T", "1", "-s", "/bin/true"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert f"lease of {SAMPLE['db'][1]} obtained" in result.stdout + result.stderr, result.stderr
        assert net.counters("A")["dhcp_replies"] >= 2  # OFFER and ACK
