#!/usr/bin/env python3
"""Network blackout during live migration, next to QEMU's pause for the same migration.

Root only (a tap gateway in a network namespace). Starts a region, a guest on the VCN dataplane,
then for each of N migrations runs, from the gateway namespace, a TCP echo probe every 1 ms
(blackout = the longest gap between echoes) and a 1,000 packets/s UDP stream to the guest's
sequence sink (lost, duplicated). Also runs bench/vswitch_pps.py for the forwarding rate.

    sudo .venv/bin/python bench/blackout.py --migrations 4

JSON: {"migrations": [{"pause_ms", "blackout_ms", "lost", "duplicated"}], "pps": {"64": …, "1400": …}}
Goal: blackout <= pause + 10 ms, 0 lost, 0 duplicated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from livemig.region.local import Region
from livemig.wire.lmo import LmoClient


def main() -> int:
    import test_network as net  # the same topology and probes as the e2e tests

    from livemig.model import NicDevice, VmSpec, WorkloadSpec
    from livemig.network.gateway import plumb_tap
    from livemig.region.netplumb import netns
    from livemig.wire.vswitch import VswitchClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=4)
    parser.add_argument("--skip-pps", action="store_true")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="livemig-blackout-") as tmp:
        region = Region(Path(tmp) / "region")
        config = region.up()
        try:
            with LmoClient(config.lmo_url) as lmo, netns(net.NS):
                net.lmo_objects(lmo)
                VswitchClient(config.hosts[0].vswitch_url).attach("gw", tap=net.TAP)
                plumb_tap(net.TAP, net.NS, net.GATEWAY_MAC, f"{net.GATEWAY_IP}/24", "10.0.1.1")
                workload = WorkloadSpec(wss_mib=64, rate_mib_s=5, disk_rate=0)
                spec = VmSpec(name="netvm", memory_mib=256, workload=workload,
                              devices=[NicDevice(id="nic0", pci_addr="0x3", mac=net.GUEST_MAC, backend="vswitch",
                                                 vnic="guest")])  # fmt: skip
                lmo.create_vm(spec, host="A")
                lmo.wait_for_console("netvm", "net=", timeout=90)
                for i in range(args.migrations):
                    destination = "B" if i % 2 == 0 else "A"
                    stop = Path(tmp) / f"stop{i}"
                    lmo.console_input("netvm", "udpreset")
                    time.sleep(0.3)
                    echo = net.in_gateway("tcp-echo", net.GUEST_IP, "7", "--interval-ms", "1", "--stop-file", str(stop))
                    udp = net.in_gateway("udp-send", net.GUEST_IP, "9", "--pps", "1000", "--stop-file", str(stop))
                    time.sleep(1)
                    m = lmo.wait(lmo.migrate("netvm", destination).id, timeout=240)
                    time.sleep(1)
                    probe, sent = net.finish(echo, stop), net.finish(udp, stop)["sent"]
                    stats = net.guest_stats(lmo, "udpstats", "UDPSTATS")
                    at = {entry.phase.value: entry.at.timestamp() for entry in m.timeline}
                    gap_end = probe.get("max_gap_end_unix")
                    # where the worst gap ended, relative to the phases (ms): explains a long blackout
                    gap_end_after = {p: round((gap_end - at[p]) * 1000, 1) for p in ("Switchover", "CuttingOver")
                                     if gap_end and p in at}  # fmt: skip
                    observed = lmo.vm("netvm").observed
                    resumed = observed.resumed_at if observed else None
                    # the stall around the switchover (the gap spanning the source's STOP), and the
                    # worst one during pre-copy (TCG holds the vCPU while QEMU syncs the dirty bitmap)
                    stop_at = m.stats.stopped_at or at.get("Switchover")
                    spans = [(end - ms / 1000, end, ms) for end, ms in probe.get("long_gaps", [])]
                    resume_at = resumed or stop_at  # the gap overlapping [source STOP, destination RESUME]
                    switchover_gap = max((ms for start, end, ms in spans if stop_at and resume_at
                                          and start <= resume_at and end >= stop_at), default=None)  # fmt: skip
                    precopy_gap = max((ms for start, end, ms in spans if stop_at and end < stop_at), default=None)
                    # the pause the guest saw: source paused (Switchover) -> destination resumed
                    guest_pause = (
                        round((resumed - at["Switchover"]) * 1000, 1) if resumed and "Switchover" in at else None
                    )
                    rows.append({"phase": m.phase.value, "pause_ms": m.stats.pause_ms, "guest_pause_ms": guest_pause,
                                 "gap_end_ms_after": gap_end_after,
                                 "switchover_hook_ms": m.stats.switchover_hook_ms,
                                 "blackout_ms": probe["max_gap_ms"], "switchover_gap_ms": switchover_gap,
                                 "precopy_worst_gap_ms": precopy_gap, "probe_p50_gap_ms": probe["p50_gap_ms"],
                                 "probe_error": probe["error"], "udp_sent": sent, "lost": stats.get("lost"),
                                 "duplicated": stats.get("duplicated")})  # fmt: skip
                    print(json.dumps(rows[-1]), file=sys.stderr)
                lmo.delete_vm("netvm")
        finally:
            region.down()
    pps: dict[str, Any] = {}
    if not args.skip_pps:
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "vswitch_pps.py")],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        pps = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    report = {"migrations": rows, "pps": pps.get("pps", pps), "vswitch_bench": pps,
              "goal_met": all(r["blackout_ms"] is not None and r["pause_ms"] is not None
                              and r["blackout_ms"] <= r["pause_ms"] + 10 and r["lost"] == 0 and r["duplicated"] == 0
                              for r in rows)}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
