#!/usr/bin/env python3
"""Network blackout during live migration: livemig (a VNIC on the VCN, with the hand-off) against a
reference migration of the same guest and workload whose NIC sits on a plain shared L2 segment
(livemig.testing.segment: both QEMUs hear every frame, nothing is handed off), alternated in one run.

Root only (taps in a network namespace). From the gateway namespace, per migration: a TCP echo
probe every 1 ms (blackout = the echo gap spanning the source's STOP) and a 1,000 packets/s UDP
stream to the guest's sequence sink (lost, duplicated), and the namespace kernel's TCP
retransmission counter (the peer's retransmits). Excess = a livemig migration's blackout minus
the reference migration's next to it: what the hand-off adds over the floor (the pause and the
resumed guest's warm-up, which under TCG is most of it; docs/architecture.md, Known gaps).
Also runs bench/vswitch_pps.py for the forwarding rate.

    sudo .venv/bin/python bench/blackout.py --pairs 4

JSON: {"migrations": [{"arm", "pause_ms", "guest_pause_ms", "blackout_ms", "lost", "duplicated",
"peer_retransmits", ...}], "excess_ms_p50", "excess_ms_p99", "pps": {...}}
Goal: excess p50 <= 10 ms, p99 <= 30 ms; livemig: 0 lost, 0 duplicated, 0 peer retransmissions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from livemig.model import BootSpec, Migration, NicDevice, VmSpec, WorkloadSpec
from livemig.region.local import Region
from livemig.wire.lmo import LmoClient

REF_TAP = f"lmrf{os.getpid() % 100000}"
REF_GUEST_IP, REF_GATEWAY_IP = "10.0.2.10", "10.0.2.2"
REF_GUEST_MAC, REF_GATEWAY_MAC = "52:54:00:00:02:10", "52:54:00:00:02:02"
WORKLOAD = WorkloadSpec(wss_mib=64, rate_mib_s=5, disk_rate=0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def retransmits(ns: str) -> int:
    """The namespace kernel's TCP RetransSegs (the peer of every probe lives there)."""
    snmp = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True,
                          check=True).stdout.splitlines()  # fmt: skip
    names, values = [line.split() for line in snmp if line.startswith("Tcp:")][:2]
    return int(values[names.index("RetransSegs")])


def guest_udp(lmo: LmoClient, vm: str) -> dict[str, int]:
    token = str(int(time.time() * 1000) % 10**9)
    lmo.console_input(vm, f"udpstats {token}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in lmo.console(vm, tail=30).splitlines():
            if line.startswith(f"LIVEMIG UDPSTATS {token} "):
                return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[3:]) if v.lstrip("-").isdigit()}
        time.sleep(0.2)
    raise RuntimeError(f"{vm}: no UDPSTATS answer")


def measure(lmo: LmoClient, net: Any, vm: str, ip: str, destination: str, arm: str, stop: Path) -> dict[str, Any]:
    lmo.console_input(vm, "udpreset")
    time.sleep(0.3)
    before = retransmits(net.NS)
    echo = net.in_gateway("tcp-echo", ip, "7", "--interval-ms", "1", "--stop-file", str(stop))
    udp = net.in_gateway("udp-send", ip, "9", "--pps", "1000", "--stop-file", str(stop))
    time.sleep(1)
    m: Migration = lmo.wait(lmo.migrate(vm, destination).id, timeout=240)
    time.sleep(1)
    probe, sent = net.finish(echo, stop), net.finish(udp, stop)["sent"]
    peer_retransmits = retransmits(net.NS) - before
    stats = guest_udp(lmo, vm)
    stop_at = m.stats.stopped_at
    resume_at = stop_at + m.stats.guest_pause_ms / 1000 if stop_at and m.stats.guest_pause_ms else stop_at
    spans = [(end - ms / 1000, end, ms) for end, ms in probe.get("long_gaps", [])]
    # the gap spanning [source STOP, destination RESUME]; shorter than LONG_GAP_MS: none listed
    blackout = max((ms for start, end, ms in spans if stop_at and resume_at and start <= resume_at
                    and end >= stop_at), default=None)  # fmt: skip
    # the resumed guest's part: from the destination's RESUME to the first echo after it
    after_resume = round(blackout - m.stats.guest_pause_ms, 1) if blackout and m.stats.guest_pause_ms else None
    return {"arm": arm, "phase": m.phase.value, "pause_ms": m.stats.pause_ms,
            "guest_pause_ms": m.stats.guest_pause_ms, "blackout_ms": blackout, "after_resume_ms": after_resume,
            "max_gap_ms": probe["max_gap_ms"], "probe_error": probe["error"], "udp_sent": sent,
            "lost": stats.get("lost"), "duplicated": stats.get("duplicated"),
            "peer_retransmits": peer_retransmits, "switchover_hook_ms": m.stats.switchover_hook_ms}  # fmt: skip


def main() -> int:
    import test_network as net  # the same topology and probes as the e2e tests

    from livemig.network.gateway import plumb_tap
    from livemig.region.netplumb import netns
    from livemig.testing.segment import SegmentHub
    from livemig.wire.vswitch import VswitchClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="livemig + reference migrations, alternated")
    parser.add_argument("--skip-pps", action="store_true")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="livemig-blackout-") as tmp:
        region = Region(Path(tmp) / "region")
        config = region.up()
        try:
            with LmoClient(config.lmo_url) as lmo, netns(net.NS), SegmentHub(tap=REF_TAP) as hub:
                net.lmo_objects(lmo)
                VswitchClient(config.hosts[0].vswitch_url).attach("gw", tap=net.TAP)
                plumb_tap(net.TAP, net.NS, net.GATEWAY_MAC, f"{net.GATEWAY_IP}/24", "10.0.1.1")
                plumb_tap(REF_TAP, net.NS, REF_GATEWAY_MAC, f"{REF_GATEWAY_IP}/24")
                vcn = VmSpec(name="netvm", memory_mib=256, workload=WORKLOAD,
                             devices=[NicDevice(id="nic0", pci_addr="0x3", mac=net.GUEST_MAC, backend="vswitch",
                                                vnic="guest")])  # fmt: skip
                ref = VmSpec(name="refvm", memory_mib=256, workload=WORKLOAD,
                             boot=BootSpec(append=f"livemig.ip={REF_GUEST_IP}/24 livemig.gw={REF_GATEWAY_IP}"),
                             devices=[NicDevice(id="nic0", pci_addr="0x3", mac=REF_GUEST_MAC, backend="segment",
                                                segment=hub.address)])  # fmt: skip
                for spec in (vcn, ref):
                    lmo.create_vm(spec, host="A")
                for spec in (vcn, ref):
                    lmo.wait_for_console(spec.name, "net=", timeout=120)
                for i in range(args.pairs):
                    destination = "B" if i % 2 == 0 else "A"
                    for arm, vm, ip in (("livemig", "netvm", net.GUEST_IP), ("reference", "refvm", REF_GUEST_IP)):
                        rows.append(measure(lmo, net, vm, ip, destination, arm, Path(tmp) / f"stop-{arm}-{i}"))
                        print(json.dumps(rows[-1]), file=sys.stderr)
                for vm in ("netvm", "refvm"):
                    lmo.delete_vm(vm)
                segment_counters = dict(hub.counters)
        finally:
            region.down()
    pps: dict[str, Any] = {}
    if not args.skip_pps:
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "vswitch_pps.py")],
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        pps = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    ours = [r for r in rows if r["arm"] == "livemig"]
    refs = [r for r in rows if r["arm"] == "reference"]
    excess = [o["blackout_ms"] - r["blackout_ms"] for o, r in zip(ours, refs, strict=True)
              if o["blackout_ms"] is not None and r["blackout_ms"] is not None]  # fmt: skip
    for o, r in zip(ours, refs, strict=True):
        o["excess_ms"] = (
            round(o["blackout_ms"] - r["blackout_ms"], 1) if o["blackout_ms"] and r["blackout_ms"] else None
        )
    p50, p99 = percentile(excess, 50), percentile(excess, 99)
    report = {
        "migrations": rows,
        "excess_ms_p50": round(p50, 1) if p50 is not None else None,
        "excess_ms_p99": round(p99, 1) if p99 is not None else None,
        "blackout_ms_p50": {
            arm: percentile([r["blackout_ms"] for r in rows if r["arm"] == arm and r["blackout_ms"] is not None], 50)
            for arm in ("livemig", "reference")
        },
        "segment_hub": segment_counters,
        "pps": pps.get("pps", pps),
        "vswitch_bench": pps,
        "goal": {"excess_p50_ms": 10, "excess_p99_ms": 30, "lost": 0, "duplicated": 0, "peer_retransmits": 0},
        "goal_met": bool(excess) and p50 is not None and p99 is not None and p50 <= 10 and p99 <= 30
        and all(r["lost"] == 0 and r["duplicated"] == 0 and r["peer_retransmits"] == 0 for r in ours),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
