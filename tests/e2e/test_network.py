"""Real guests on the VCN dataplane, reached from a gateway namespace (a tap VNIC, root only):
connections and flow state survive live migration, ingress is neither lost nor duplicated, and
security lists hold throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.model import MigrationParams, NicDevice, Phase, VmSpec, WorkloadSpec
from livemig.model.migration import ConvergencePolicy
from livemig.region.local import Region
from livemig.wire.lmo import LmoClient
from livemig.wire.vswitch import VswitchClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="the tap gateway needs root"),
]
TAG = os.getpid() % 100000
NS, TAP = f"lmgw{TAG}", f"lmgt{TAG}"
RED_NS, RED_TAP = f"lmrd{TAG}", f"lmrt{TAG}"  # a tenant in another VCN, same subnet CIDR
GUEST_IP, GATEWAY_IP, RED_IP = "10.0.1.10", "10.0.1.2", "10.0.1.3"
GUEST_MAC, GATEWAY_MAC, RED_MAC = "52:54:00:00:01:10", "52:54:00:00:01:02", "52:54:00:00:02:03"


def lmo_objects(lmo: LmoClient) -> None:
    put = lambda kind, body: lmo.put_network_object(kind, body)  # noqa: E731
    put("vcns", {"id": "blue", "cidr": "10.0.0.0/16", "vni": 100})
    put("vcns", {"id": "red", "cidr": "10.0.0.0/16", "vni": 200})
    put("subnets", {"id": "blue-a", "vcn": "blue", "cidr": "10.0.1.0/24", "gateway": "10.0.1.1"})
    put("subnets", {"id": "red-a", "vcn": "red", "cidr": "10.0.1.0/24", "gateway": "10.0.1.1"})
    # the guest: new inbound only to its echo (tcp/7) and sink (udp/9); anything outbound, stateful
    put("security-lists", {"id": "guest", "rules": [
        {"direction": "ingress", "protocol": "tcp", "cidr": "10.0.1.0/24", "dst_ports": {"min": 7, "max": 7}},
        {"direction": "ingress", "protocol": "udp", "cidr": "10.0.1.0/24", "dst_ports": {"min": 9, "max": 9}},
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
    ]})  # fmt: skip
    put("security-lists", {"id": "open", "rules": [
        {"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"},
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
    ]})  # fmt: skip
    put("vnics", {"id": "gw", "mac": GATEWAY_MAC, "ip": GATEWAY_IP, "subnet": "blue-a", "security_lists": ["open"],
                  "host": "A"})  # fmt: skip
    put("vnics", {"id": "guest", "mac": GUEST_MAC, "ip": GUEST_IP, "subnet": "blue-a", "security_lists": ["guest"],
                  "host": ""})  # fmt: skip
    put("vnics", {"id": "red-gw", "mac": RED_MAC, "ip": RED_IP, "subnet": "red-a", "security_lists": ["open"],
                  "host": "A"})  # fmt: skip


@pytest.fixture(scope="module")
def topology(region: Region) -> Iterator[LmoClient]:
    """The VCN objects and the gateway namespace, once per module."""
    from livemig.network.gateway import plumb_tap
    from livemig.region.netplumb import netns

    config = region.load()
    assert config is not None
    with LmoClient(config.lmo_url) as lmo, netns(NS), netns(RED_NS):
        lmo_objects(lmo)
        VswitchClient(config.hosts[0].vswitch_url).attach("gw", tap=TAP)
        plumb_tap(TAP, NS, GATEWAY_MAC, f"{GATEWAY_IP}/24", "10.0.1.1")
        VswitchClient(config.hosts[0].vswitch_url).attach("red-gw", tap=RED_TAP)
        plumb_tap(RED_TAP, RED_NS, RED_MAC, f"{RED_IP}/24", "10.0.1.1")
        yield lmo


@pytest.fixture
def net(topology: LmoClient) -> Iterator[LmoClient]:
    """A fresh guest on the VCN for each test, so one test's guest cannot spoil the next."""
    spec = VmSpec(name="netvm", memory_mib=256,
                  devices=[NicDevice(id="nic0", pci_addr="0x3", mac=GUEST_MAC, backend="vswitch", vnic="guest")],
                  workload=WorkloadSpec(wss_mib=64, rate_mib_s=5, disk_rate=0))  # fmt: skip
    topology.create_vm(spec, host="A")
    try:
        topology.wait_for_console("netvm", "net=", timeout=90)
        yield topology
    finally:
        topology.delete_vm("netvm")


def in_gateway(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "livemig.testing.netprobe", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen[str], stop: Path) -> dict:
    stop.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def guest_stats(lmo: LmoClient, verb: str, reply: str) -> dict[str, int]:
    token = str(int(time.time() * 1000) % 10**9)
    lmo.console_input("netvm", f"{verb} {token}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in lmo.console("netvm", tail=30).splitlines():
            if line.startswith(f"LIVEMIG {reply} {token} "):
                return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[3:]) if v.lstrip("-").isdigit()}
        time.sleep(0.2)
    raise AssertionError(f"no {reply} answer")


def migrate(lmo: LmoClient, destination: str, params: MigrationParams | None = None) -> None:
    m = lmo.wait(lmo.migrate("netvm", destination, params).id, timeout=240)
    assert m.phase is Phase.SUCCEEDED, m.reason


def test_tcp_echo_survives_round_trip(net: LmoClient, tmp_path):
    stop = tmp_path / "stop"
    probe = in_gateway("tcp-echo", GUEST_IP, "7", "--interval-ms", "5", "--stop-file", str(stop))
    time.sleep(1.5)
    migrate(net, "B")
    migrate(net, "A")
    time.sleep(1)
    result = finish(probe, stop)
    print(f"TCP echo across A->B->A: {result}")
    assert result["error"] is None, result
    assert result["received"] == result["sent"] > 100
    assert result["max_gap_ms"] < 3000


@pytest.mark.parametrize("kind", ["short", "long"])
def test_udp_stream_loses_and_duplicates_nothing(net: LmoClient, tmp_path, kind):
    """A 1,000 packets/s stream across a migration, short (idle guest) and long (seconds of pre-copy).

    The long case used to lose most of the stream and later crash the guest kernel (``virtio_net
    ... id N is not a head!``): QEMU 7.2 under TCG lost guest writes made during pre-copy, so
    the guest's counters and rings came back stale. hostd's RAM trim fixes it (host/qemu.py:
    TCG_RAM_TRIM_KIB); this case is the proof that it stays fixed."""
    params = None
    if kind == "long":  # several seconds of pre-copy: more dirty memory than the bandwidth moves quickly
        net.console_input("netvm", "rate 60")
        params = MigrationParams(max_bandwidth_mib_s=24, policy=ConvergencePolicy(min_rounds=50, max_rounds=50))
    net.console_input("netvm", "udpreset")
    time.sleep(0.5)
    stop = tmp_path / "stop"
    sender = in_gateway("udp-send", GUEST_IP, "9", "--pps", "1000", "--stop-file", str(stop))
    time.sleep(1)
    here = net.vm("netvm").host
    migration = net.migrate("netvm", "B" if here == "A" else "A", params)
    if kind == "long":
        time.sleep(4)  # pre-copy cannot finish while the guest dirties 60 MiB/s against 24 MiB/s...
        net.console_input("netvm", "rate 2")  # ...then it converges
    m = net.wait(migration.id, timeout=240)
    assert m.phase is Phase.SUCCEEDED, m.reason
    if kind == "long":
        total = (m.timeline[-1].at - m.timeline[0].at).total_seconds()
        assert total > 4, f"a long migration: {total:.1f}s"
    time.sleep(1)
    sent = finish(sender, stop)["sent"]
    time.sleep(0.5)
    net.console_input("netvm", "rate 5")
    stats = guest_stats(net, "udpstats", "UDPSTATS")
    print(f"UDP {kind} migration: sent {sent}, guest {stats}")
    assert stats["received"] + stats["lost"] >= sent - 5
    assert stats["duplicated"] == 0, "nothing delivered twice"
    # frames the source vswitch wrote to QEMU's socket after the guest paused, before the pause
    # marker, are drained by hostd and delivered by the destination (network/handoff.py). Goal 0;
    # about 1 run in 10 still loses one frame (docs/architecture.md, Known gaps). Before the drain,
    # 1-3 were lost in most runs.
    assert stats["lost"] <= 1, stats


def connect(ns: str, port: int) -> subprocess.CompletedProcess[str]:
    """A TCP connect from namespace ``ns`` to the guest's address (3 s timeout)."""
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                           f"import socket; socket.create_connection(('{GUEST_IP}', {port}), timeout=3).close()"],
                          capture_output=True, text=True)  # fmt: skip


def test_security_lists_and_vcn_isolation_hold_across_migration(net: LmoClient):
    """Allowed traffic passes, denied traffic is dropped, and a tenant of another VCN, whose
    address is inside the guest's allowed CIDR (same subnet range, VCN "red"), cannot reach the
    guest: before the migration and after it."""
    here = net.vm("netvm").host
    for moment in ("before", "after"):
        if moment == "after":
            migrate(net, "B" if here == "A" else "A")
        allowed = connect(NS, 7)
        assert allowed.returncode == 0, f"{moment}: {allowed.stderr}"
        denied = connect(NS, 22)
        assert denied.returncode != 0 and "timed out" in denied.stderr, f"{moment}: tcp/22 is not allowed in"
        other_vcn = connect(RED_NS, 7)
        assert other_vcn.returncode != 0, f"{moment}: VCN red reached the guest in VCN blue"


@pytest.mark.parametrize("flow_sync", [True, False], ids=["synced", "not-synced"])
def test_flow_state_moves_with_the_vm(region: Region, net: LmoClient, tmp_path, flow_sync):
    """The guest opens a connection out to a server behind the gateway; the guest's ingress rules
    allow no new connection from that server, so its lines reach the guest only through the
    conntrack entry. The server talks first and the guest only answers: without the entry on the
    new host the server's lines are dropped there (counted as denied ingress) and the connection
    stalls, until the guest itself sends again (its own packet is egress, which re-creates the
    entry)."""
    config = region.load()
    assert config is not None
    switches = {h.name: VswitchClient(h.vswitch_url) for h in config.hosts}

    def denied(host: str) -> int:
        return int(switches[host].counters().switch.get("denied_ingress", 0))

    faulty = {"lmo": "lmo.flow_sync=hold", "host": "hostd.flow_sync=hold"} if not flow_sync else {}
    if faulty:
        region.restart_lmo(faults=faulty["lmo"])
        for host in switches:
            region.kill_host(host)
            region.restart_host(host, faults=faulty["host"])
    try:
        stop = tmp_path / "stop"
        server = in_gateway("tcp-serve", GATEWAY_IP, "8000", "--interval-ms", "10", "--stop-file", str(stop))
        time.sleep(0.5)
        net.console_input("netvm", f"tcpclient {GATEWAY_IP} 8000 0")
        time.sleep(1.5)
        # Without the flow state, a server line that reaches the new host before the guest's own
        # next packet (which re-creates the entry) is denied there. Whether one does in a given
        # migration depends on timing, so the unsynced case may move the VM up to three times;
        # the synced one moves it three times and must never see a denial.
        dropped_per_move: list[int] = []
        for _move in range(3):
            there = "B" if net.vm("netvm").host == "A" else "A"
            before = denied(there)
            migrate(net, there)
            time.sleep(3)
            dropped_per_move.append(denied(there) - before)
            if not flow_sync and dropped_per_move[-1] > 0:
                break
        result = finish(server, stop)
        stats = guest_stats(net, "tcpstats", "TCPSTATS")
        print(f"flow sync {'on' if flow_sync else 'off'}: server {result}, guest {stats}, "
              f"denied on the new host per move: {dropped_per_move}")  # fmt: skip
        if flow_sync:
            assert result["error"] is None and result["received"] >= result["sent"] - 5 > 100, result
            assert result["max_gap_ms"] < 2000
            assert dropped_per_move == [0, 0, 0], "with the flow state moved, nothing is denied on a new host"
        else:
            assert max(dropped_per_move) > 0, "without the flow state the server's lines are dropped on the new host"
    finally:
        net.console_input("netvm", "tcpclient stop")
        if faulty:
            region.restart_lmo()
            for host in switches:
                region.kill_host(host)
                region.restart_host(host)
