#!/usr/bin/env python3
"""Forwarding rate of one vswitch (frames/s, 64 B and 1,400 B frames), full path and cached path,
next to plain-Python forwarders measured in the same run.

What is measured: a sender process blasts Ethernet frames of one established TCP flow (web -> db
in one subnet: anti-spoofing, a lookup, web's egress and db's ingress security lists with
conntrack) into a vswitch process; this process counts what comes out on db's port. Two vswitch
processes run side by side, the same code with one difference: ``full`` has its flow cache off
(``flow_cache_size=0``), so every frame is parsed, looked up and filtered; ``cached`` runs the
default, so after the flow's first two frames (the first creates the conntrack entries, the second
is the first *tracked* one, which is cached) every frame takes the fast path (``flowcache.py``).
The flow cache's hit and miss counters are reported to show which path the frames took.

Baselines, measured in the same run, interleaved: ``blocking``, a plain Python UDP forwarder loop
(blocking ``recv``/``sendto``, no parsing, no policy): the ceiling of any Python forwarder on this
machine; ``asyncio``, a bare asyncio ``DatagramProtocol`` forwarder: the cost of the event loop
alone. Each forwarder's CPU time per frame is reported next to the rates: on a shared 2-core
machine the rates move with the neighbours' load, the CPU cost less. The goal reported is the
cached path at half the ``blocking`` baseline or better.

The vswitch processes are this script's own (``--serve-vswitch``): the dataplane of
``python -m livemig.network`` (the same ``Vswitch`` on the same event loop and sockets) without
its idle REST API, so the cache size can differ between the two.

    .venv/bin/python bench/vswitch_pps.py --seconds 2 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from livemig.network.flowcache import DEFAULT_SIZE
from livemig.network.packets import TCP_ACK, TCP_PSH
from livemig.network.vswitch import Vswitch
from livemig.region.freeport import free_port, free_ports
from livemig.testing.fakevm import SAMPLE, sample_mapping, sample_security_lists, tcp_frame
from livemig.wire.vswitch import AttachRequest

SIZES = (64, 1400)
_HEADERS = 14 + 20 + 20  # Ethernet + IPv4 + TCP


def frame_of_size(size: int) -> bytes:
    (web_mac, web_ip), (db_mac, db_ip) = SAMPLE["web"], SAMPLE["db"]
    frame = tcp_frame(web_mac, db_mac, web_ip, db_ip, 40000, 5432, TCP_ACK | TCP_PSH, 1, 1, b"x" * (size - _HEADERS))
    assert len(frame) == size
    return frame


# ------------------------------------------------------------------ traffic


def blast(frame: bytes, local_port: int, target_port: int, seconds: float) -> None:
    """Sender process: send ``frame`` as fast as possible for ``seconds``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", local_port))
    target = ("127.0.0.1", target_port)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(256):
            with contextlib.suppress(OSError):
                sock.sendto(frame, target)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(receiver: socket.socket, frame: bytes, local_port: int, target_port: int, seconds: float,
            forwarder_pid: int) -> tuple[float, float]:  # fmt: skip
    """Frames/s arriving at ``receiver`` while a sender blasts into the forwarder under test, and the
    forwarder's CPU microseconds per forwarded frame (stable even when the machine is busy)."""
    receiver.settimeout(0.2)
    while True:  # drain leftovers of the previous run
        try:
            receiver.recv(65536)
        except TimeoutError:
            break
    cpu_before = cpu_seconds(forwarder_pid)
    sender = mp.Process(target=blast, args=(frame, local_port, target_port, seconds), daemon=True)
    sender.start()
    count, first, last = 0, 0.0, 0.0
    receiver.settimeout(0.5)
    deadline = time.monotonic() + seconds + 2
    while time.monotonic() < deadline:
        try:
            receiver.recv(65536)
        except TimeoutError:
            if count and not sender.is_alive():
                break
            continue
        last = time.monotonic()
        if not count:
            first = last
        count += 1
    sender.join()
    cpu = cpu_seconds(forwarder_pid) - cpu_before
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return rate, (cpu / count * 1e6 if count else 0.0)


# ------------------------------------------------------------------ forwarders under test


async def _asyncio_forwarder(listen: int, to: int) -> None:
    class Forward(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, ("127.0.0.1", to))  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Forward, local_addr=("127.0.0.1", listen))
    await asyncio.Event().wait()


def _blocking_forwarder(listen: int, to: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", listen))
    target = ("127.0.0.1", to)
    while True:
        sock.sendto(sock.recv(65536), target)


def start_forwarder(kind: str, listen: int, to: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--forwarder", kind, "--listen", str(listen), "--to", str(to)])


async def _serve_vswitch(flow_cache_size: int) -> None:
    """A vswitch process for the bench: print the VNICs' ports as one JSON line, forward until
    SIGTERM, then print the counters as one JSON line."""
    vswitch = Vswitch("A", "127.0.0.1:0", flow_cache_size=flow_cache_size)
    await vswitch.start()
    vswitch.set_mapping(sample_mapping({"A": vswitch.overlay_endpoint}))
    for sl in sample_security_lists():
        vswitch.set_security_list(sl)
    ports = {}
    for vnic in ("web", "db"):
        attachment = await vswitch.attach(AttachRequest(vnic_id=vnic))
        ports[vnic] = {"qemu_port": attachment.qemu_port, "switch_port": attachment.switch_port}
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(json.dumps(vswitch.snapshot_counters().switch), flush=True)
    await vswitch.stop()


def start_vswitch(flow_cache_size: int) -> tuple[subprocess.Popen[str], dict[str, dict[str, int]]]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-vswitch", str(flow_cache_size)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"vswitch (flow cache {flow_cache_size}) did not start")
    return proc, json.loads(line)


def stop_vswitch(proc: subprocess.Popen[str]) -> dict[str, int]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def udp_receiver(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("127.0.0.1", port))
    return sock


# ------------------------------------------------------------------ main

VSWITCHES = {"full": 0, "cached": None}  # flow cache size (None: the default)
KINDS = ("full", "cached", "asyncio", "blocking")
GOAL = 0.5  # the cached path's rate as a fraction of the blocking baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="blast duration per measurement")
    parser.add_argument("--runs", type=int, default=3, help="measurements per size and forwarder (median kept)")
    parser.add_argument("--forwarder", choices=["asyncio", "blocking"], help=argparse.SUPPRESS)
    parser.add_argument("--serve-vswitch", type=int, metavar="FLOW_CACHE_SIZE", help=argparse.SUPPRESS)
    parser.add_argument("--listen", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--to", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forwarder == "asyncio":
        asyncio.run(_asyncio_forwarder(args.listen, args.to))
        return 0
    if args.forwarder == "blocking":
        _blocking_forwarder(args.listen, args.to)
        return 0
    if args.serve_vswitch is not None:
        asyncio.run(_serve_vswitch(args.serve_vswitch))
        return 0

    results: dict[str, dict[str, list[float]]] = {k: {str(s): [] for s in SIZES} for k in KINDS}
    cpu_us: dict[str, dict[str, list[float]]] = {k: {str(s): [] for s in SIZES} for k in KINDS}
    switches: dict[str, tuple[subprocess.Popen[str], dict[str, dict[str, int]]]] = {}
    counters: dict[str, dict[str, int]] = {}
    receivers: dict[str, socket.socket] = {}
    try:
        for kind, size in VSWITCHES.items():
            switches[kind] = start_vswitch(DEFAULT_SIZE if size is None else size)
            receivers[kind] = udp_receiver(switches[kind][1]["db"]["qemu_port"])
        base_in, base_out = free_ports(2, kind=socket.SOCK_DGRAM)
        receivers["baseline"] = udp_receiver(base_out)
        for _ in range(args.runs):
            for size in SIZES:
                frame = frame_of_size(size)
                for kind in VSWITCHES:
                    proc, ports = switches[kind]
                    web = ports["web"]
                    rate, cpu = measure(receivers[kind], frame, web["qemu_port"], web["switch_port"], args.seconds,
                                        proc.pid)  # fmt: skip
                    results[kind][str(size)].append(rate)
                    cpu_us[kind][str(size)].append(cpu)
                for kind in ("asyncio", "blocking"):
                    forwarder = start_forwarder(kind, base_in, base_out)
                    time.sleep(0.5)
                    try:
                        rate, cpu = measure(receivers["baseline"], frame, free_port(kind=socket.SOCK_DGRAM), base_in,
                                            args.seconds, forwarder.pid)  # fmt: skip
                        results[kind][str(size)].append(rate)
                        cpu_us[kind][str(size)].append(cpu)
                    finally:
                        forwarder.kill()
                        forwarder.wait()
    finally:
        for kind, (proc, _ports) in switches.items():
            counters[kind] = stop_vswitch(proc)
        for sock in receivers.values():
            sock.close()

    def median(kind: str, table: dict[str, dict[str, list[float]]] = results, digits: int = 0) -> dict[str, float]:
        return {size: round(statistics.median(values), digits or None) for size, values in table[kind].items()}

    full, cached, baseline = median("full"), median("cached"), median("blocking")

    def ratio(pps: dict[str, float]) -> dict[str, float | None]:
        return {s: round(pps[s] / baseline[s], 3) if baseline[s] else None for s in pps}

    report = {
        "pps": cached,
        "full_path_pps": full,
        "cached_path_pps": cached,
        "baseline_pps": baseline,
        "baseline": "plain Python UDP forwarder loop (blocking recv/sendto, no parsing, no policy), same run",
        "asyncio_forwarder_pps": median("asyncio"),
        "ratio_vs_baseline": {"full": ratio(full), "cached": ratio(cached)},
        "goal": f"cached path >= {GOAL} x baseline at every size",
        "goal_met": all(r is not None and r >= GOAL for r in ratio(cached).values()),
        "mbit_s": {
            kind: {s: round(pps[s] * int(s) * 8 / 1e6, 1) for s in pps}
            for kind, pps in (("full", full), ("cached", cached))
        },
        "cpu_us_per_frame": {k: median(k, cpu_us, 1) for k in KINDS},
        "flow_cache": {
            kind: {k: v for k, v in c.items() if k.startswith("flowcache_vm_")} for kind, c in counters.items()
        },
        "path": "web -> db, same subnet, one established TCP flow: anti-spoofing, egress + ingress security lists "
        "with conntrack, one vswitch process",
        "runs": args.runs,
        "seconds": args.seconds,
        "raw_pps": results,
        "vswitch_drops": {
            kind: {k: v for k, v in c.items() if k.startswith("dropped")} for kind, c in counters.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
