#!/usr/bin/env python3
"""What TLS costs: the same guest and workload migrated alternately with and without TLS on the
migration stream, in one run, and a vswitch API call with and without TLS.

Migrations: one region as ``livemig up`` starts it (mutual TLS between services, NBD over TLS), one
guest (512 MiB dirtying --rate MiB/s, a data volume, a NIC on the VCN so the switchover hook makes
its two vswitch calls inside the pause), migrated A<->B --runs times per arm. Between arms only the
stream changes: the LMO is restarted with or without migration TLS (``livemig lmo
--no-migration-tls``), arms interleaved TLS, plain, plain, TLS, ... so machine noise hits both alike.
Per arm: QEMU's downtime (pause), the guest's own pause (source STOP to destination RESUME), the
switchover hook, total time, pre-copy rounds, throughput; then the ratios and the goals (total
<= 1.3x plain, pause <= plain + 5 ms).

API: two real vswitch processes, one serving mutual TLS with a region certificate and one plain
(``--insecure``), ``GET /counters`` timed on a kept-alive connection (what the pause's hand-off
uses) and on a new connection per call (what a handshake inside the pause would cost), batches
interleaved.

``--multifd N`` (and ``--compression zstd``) give both arms the same multifd policy: QEMU's TLS
channel makes a record and a ``send`` of every write element, so its single stream pays two per
page, where multifd writes whole pages and encrypts on a thread per channel (docs/security.md).

    flock /tmp/livemig-heavy.lock .venv/bin/python bench/tls.py --runs 3
    flock /tmp/livemig-heavy.lock .venv/bin/python bench/tls.py --runs 3 --multifd 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.guest.workload import workload_vm_spec
from livemig.model import MigrationParams, NicDevice, Phase
from livemig.model.migration import Compression, ConditionType, MigrationPolicies
from livemig.region.freeport import free_ports
from livemig.region.local import Region
from livemig.security import pki
from livemig.security.pki import Role
from livemig.wire.base import Credentials, sync_http
from livemig.wire.lmo import LmoClient
from livemig.wire.vswitch import VswitchClient

VM, VOLUME, MAC = "tlsbench", "tlsbench-data", "52:54:00:00:07:10"
GOAL_TOTAL_RATIO, GOAL_PAUSE_DELTA_MS = 1.3, 5.0


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def network(lmo: LmoClient) -> None:
    lmo.put_network_object("vcns", {"id": "tb-vcn", "cidr": "10.77.0.0/16", "vni": 770})
    lmo.put_network_object("subnets", {"id": "tb-net", "vcn": "tb-vcn", "cidr": "10.77.1.0/24", "gateway": "10.77.1.1"})
    lmo.put_network_object("security-lists", {"id": "tb-open", "rules": [
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"}]})  # fmt: skip
    lmo.put_network_object("vnics", {"id": "tb-vnic", "mac": MAC, "ip": "10.77.1.10", "subnet": "tb-net",
                                     "security_lists": ["tb-open"], "host": ""})  # fmt: skip


def one_migration(region: Region, tls: bool, destination: str, params: MigrationParams) -> dict[str, Any]:
    region.set_migration_tls(tls)
    region.restart_lmo()
    with region.client() as lmo:
        m = lmo.wait(lmo.migrate(VM, destination, params).id, timeout=600)
    encrypted = m.condition(ConditionType.STREAM_ENCRYPTED)
    return {
        "tls": tls, "to": destination, "phase": m.phase.value, "reason": m.reason,
        "stream_encrypted": encrypted is not None and encrypted.status,
        "pause_ms": m.stats.pause_ms, "guest_pause_ms": m.stats.guest_pause_ms,
        "switchover_hook_ms": m.stats.switchover_hook_ms, "total_ms": m.stats.total_ms,
        "rounds": m.stats.rounds, "mbps": m.stats.mbps, "transferred_bytes": m.stats.transferred_bytes,
        "guest_memory_check": m.guest_check, "disk_check": m.disk_check,
    }  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["phase"] == Phase.SUCCEEDED.value]

    def values(key: str) -> list[float]:
        return [float(r[key]) for r in ok if r[key] is not None]

    return {
        "runs": len(runs), "succeeded": len(ok),
        "checks_ok": sum(r["guest_memory_check"] == "ok" and r["disk_check"] == "ok" for r in ok),
        "encrypted": sum(r["stream_encrypted"] for r in runs),
        **{f"{key}_median": median(values(key)) for key in
           ("pause_ms", "guest_pause_ms", "switchover_hook_ms", "total_ms", "rounds", "mbps")},
        "pause_ms_all": values("pause_ms"), "total_ms_all": values("total_ms"),
    }  # fmt: skip


def migrations(region: Region, runs: int, params: MigrationParams) -> dict[str, Any]:
    order = [True, False, False, True] * ((runs + 1) // 2)  # TLS, plain, plain, TLS: each arm goes first as often
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    here = "A"
    for tls in order:
        if len(results[tls]) >= runs:
            continue
        there = "B" if here == "A" else "A"
        run = one_migration(region, tls, there, params)
        print(json.dumps({k: run[k] for k in ("tls", "to", "phase", "pause_ms", "total_ms", "rounds")}),
              file=sys.stderr)  # fmt: skip
        results[tls].append(run)
        if run["phase"] == Phase.SUCCEEDED.value:
            here = there
    tls, plain = summarize(results[True]), summarize(results[False])

    def ratio(key: str) -> float | None:
        a, b = tls[f"{key}_median"], plain[f"{key}_median"]
        return round(a / b, 3) if a is not None and b else None

    delta = None
    if tls["pause_ms_median"] is not None and plain["pause_ms_median"] is not None:
        delta = round(tls["pause_ms_median"] - plain["pause_ms_median"], 2)
    return {
        "tls": tls, "plain": plain,
        "ratio_total_ms": ratio("total_ms"), "ratio_pause_ms": ratio("pause_ms"),
        "ratio_guest_pause_ms": ratio("guest_pause_ms"), "pause_delta_ms": delta,
        "goal": {"total_ratio_max": GOAL_TOTAL_RATIO, "pause_delta_max_ms": GOAL_PAUSE_DELTA_MS,
                 "total_met": (ratio("total_ms") or 99) <= GOAL_TOTAL_RATIO,
                 "pause_met": delta is not None and delta <= GOAL_PAUSE_DELTA_MS},
        "raw": results[True] + results[False],
    }  # fmt: skip


def start_vswitch(name: str, port: int, log: Path, tls: pki.LeafFiles | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "livemig.cli.main", "vswitch", "--name", name, "--listen", f"127.0.0.1:{port}",
            "--overlay", "127.0.0.1:0", "--log-level", "warning"]  # fmt: skip
    if tls is None:
        argv.append("--insecure")
    else:
        argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def api_latency(region: Region, calls: int, work: Path) -> dict[str, Any]:
    """``GET /counters`` on a vswitch: TLS vs plain, kept-alive vs a new connection per call."""
    leaf = pki.issue(region.pki_dir, "tlsbench", Role.VSWITCH, ["tlsbench", "127.0.0.1"])
    creds = region.service_credentials()  # the LMO's certificate (allowed on every vswitch route)
    secure_port, plain_port = free_ports(2)
    procs = [start_vswitch("tlsbench", secure_port, work / "vswitch-tls.log", leaf),
             start_vswitch("tlsbench", plain_port, work / "vswitch-plain.log", None)]  # fmt: skip
    arms = {"tls": (f"https://127.0.0.1:{secure_port}", creds), "plain": (f"http://127.0.0.1:{plain_port}", None)}
    samples: dict[str, dict[str, list[float]]] = {arm: {"reused": [], "new_connection": []} for arm in arms}
    try:
        for url, arm_creds in arms.values():
            deadline = time.monotonic() + 20
            while True:
                try:
                    VswitchClient(url, timeout=2, credentials=arm_creds or Credentials()).health()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        batch = 20
        for _ in range(max(1, calls // batch)):
            for arm, (url, arm_creds) in arms.items():
                with sync_http(10, credentials=arm_creds or Credentials()) as http:
                    http.get(f"{url}/counters").raise_for_status()  # the connection, opened before timing
                    for _ in range(batch):
                        started = time.perf_counter()
                        http.get(f"{url}/counters").raise_for_status()
                        samples[arm]["reused"].append((time.perf_counter() - started) * 1000)
                for _ in range(batch // 4):
                    with sync_http(10, credentials=arm_creds or Credentials()) as http:
                        started = time.perf_counter()
                        http.get(f"{url}/counters").raise_for_status()
                        samples[arm]["new_connection"].append((time.perf_counter() - started) * 1000)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    out: dict[str, Any] = {arm: {kind: {"median_ms": median(v), "p90_ms": round(sorted(v)[int(len(v) * 0.9)], 2),
                                        "calls": len(v)} for kind, v in kinds.items()}
                           for arm, kinds in samples.items()}  # fmt: skip
    for kind in ("reused", "new_connection"):
        a, b = out["tls"][kind]["median_ms"], out["plain"][kind]["median_ms"]
        out[f"ratio_{kind}"] = round(a / b, 2) if a and b else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="migrations per arm (at least 3)")
    parser.add_argument("--rate", type=int, default=20, help="guest dirty rate, MiB/s")
    parser.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    parser.add_argument("--downtime-ms", type=int, default=None, help="QEMU downtime-limit (default: livemig's)")
    parser.add_argument("--api-calls", type=int, default=400, help="vswitch API calls per arm and kind")
    parser.add_argument(
        "--multifd", type=int, default=None, help="multifd channels in both arms (default: each arm's own default)"
    )
    parser.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default="none",
        help="compression in both arms (zstd needs --multifd)",
    )
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args()
    params = MigrationParams() if args.downtime_ms is None else MigrationParams(downtime_limit_ms=args.downtime_ms)
    if args.multifd is not None or args.compression != "none":
        compression = Compression(args.compression)
        params.policies = MigrationPolicies(multifd_channels=args.multifd or 0, compression=compression)
    work = args.state_dir or Path(tempfile.mkdtemp(prefix="livemig-tls-bench-"))
    region = Region(work)
    region.down()
    region.up()
    try:
        with region.client() as lmo:
            network(lmo)
            lmo.create_volume(VOLUME, 64)
            spec = workload_vm_spec(args.memory, args.rate, name=VM, volume=VOLUME)
            spec.devices.append(NicDevice(id="nic0", pci_addr="0x3", mac=MAC, backend="vswitch", vnic="tb-vnic"))
            lmo.create_vm(spec, host="A")
            lmo.wait_for_console(VM, "LIVEMIG HB", timeout=120)
        report = {
            "guest": {"memory_mib": args.memory, "dirty_rate_mib_s": args.rate, "volume": True, "nic": True},
            "params": params.model_dump(mode="json", include={"downtime_limit_ms", "max_bandwidth_mib_s", "policies"}),
            "migrations": migrations(region, max(3, args.runs), params),
        }
        # hostd logs each hand-off; it names any TLS connection it had to open inside the pause
        hostd_logs = " ".join(p.read_text(errors="replace") for p in (work / "logs").glob("hostd-*.log"))
        report["hand_offs_logged"] = hostd_logs.count("never reached the paused guest")
        report["handshakes_inside_pause"] = hostd_logs.count("new TLS connection(s) inside the pause")
        report["api"] = api_latency(region, args.api_calls, work)
    finally:
        region.down()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
