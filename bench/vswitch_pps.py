#!/usr/bin/env python3
"""Forwarding rate of one vswitch (frames/s, 64 B and 1,400 B frames) next to a plain-Python baseline.

What is measured: a sender process blasts Ethernet frames (TCP, web -> db in one subnet, so every
frame is parsed, anti-spoof checked, looked up, filtered by security lists with conntrack, and
re-sent) into a vswitch process; this process counts what comes out on db's port. The baseline is
the same harness with the vswitch replaced by a plain Python UDP forwarder loop (blocking
``recv``/``sendto``, no parsing, no policy): the ceiling of any Python forwarder on this machine,
measured in the same run, interleaved. A bare asyncio ``DatagramProtocol`` forwarder is reported
too: the cost of the event loop alone. Each forwarder's CPU time per frame is reported next to
the rates: on a shared 2-core machine the rates move with the neighbours' load, the CPU cost less.

    .venv/bin/python bench/vswitch_pps.py --seconds 2 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.network.packets import TCP_ACK, TCP_PSH
from livemig.region.freeport import free_port, free_ports
from livemig.testing.fakevm import SAMPLE, sample_mapping, sample_security_lists, tcp_frame
from livemig.wire.vswitch import VswitchClient

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


def start_vswitch(directory: Path) -> tuple[subprocess.Popen[bytes], VswitchClient]:
    api = free_port()
    log = (directory / "vswitch.log").open("wb")
    # --insecure: this measures the dataplane (frames), which the API's TLS does not touch
    command = [sys.executable, "-m", "livemig.cli.main", "vswitch", "--name", "A", "--listen", f"127.0.0.1:{api}",
               "--overlay", "127.0.0.1:0", "--log-level", "warning", "--insecure"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=log)
    client = VswitchClient(f"http://127.0.0.1:{api}")
    for _ in range(200):
        try:
            overlay = client.health().overlay
            break
        except Exception:
            time.sleep(0.1)
    else:
        raise SystemExit("vswitch did not start")
    client.put_mapping(sample_mapping({"A": overlay}))
    for sl in sample_security_lists():
        client.put_security_list(sl)
    return proc, client


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="blast duration per measurement")
    parser.add_argument("--runs", type=int, default=3, help="measurements per size and forwarder (median kept)")
    parser.add_argument("--forwarder", choices=["asyncio", "blocking"], help=argparse.SUPPRESS)
    parser.add_argument("--listen", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--to", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forwarder == "asyncio":
        asyncio.run(_asyncio_forwarder(args.listen, args.to))
        return 0
    if args.forwarder == "blocking":
        _blocking_forwarder(args.listen, args.to)
        return 0

    kinds = ("vswitch", "asyncio", "blocking")
    results: dict[str, dict[str, list[float]]] = {k: {str(s): [] for s in SIZES} for k in kinds}
    cpu_us: dict[str, dict[str, list[float]]] = {k: {str(s): [] for s in SIZES} for k in kinds}
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        proc, client = start_vswitch(Path(tmp))
        try:
            web = client.attach("web")
            db = client.attach("db")
            assert web.qemu_port and web.switch_port and db.qemu_port
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            receiver.bind(("127.0.0.1", db.qemu_port))
            base_in, base_out = free_ports(2, kind=socket.SOCK_DGRAM)
            base_receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            base_receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            base_receiver.bind(("127.0.0.1", base_out))
            for _ in range(args.runs):
                for size in SIZES:
                    frame = frame_of_size(size)
                    rate, cpu = measure(receiver, frame, web.qemu_port, web.switch_port, args.seconds, proc.pid)
                    results["vswitch"][str(size)].append(rate)
                    cpu_us["vswitch"][str(size)].append(cpu)
                    for kind in ("asyncio", "blocking"):
                        forwarder = start_forwarder(kind, base_in, base_out)
                        time.sleep(0.5)
                        try:
                            rate, cpu = measure(
                                base_receiver,
                                frame,
                                free_port(kind=socket.SOCK_DGRAM),
                                base_in,
                                args.seconds,
                                forwarder.pid,
                            )
                            results[kind][str(size)].append(rate)
                            cpu_us[kind][str(size)].append(cpu)
                        finally:
                            forwarder.kill()
                            forwarder.wait()
            counters = client.counters()
        finally:
            client.close()
            proc.terminate()
            proc.wait(timeout=10)

    def median(kind: str, table: dict[str, dict[str, list[float]]] = results, digits: int = 0) -> dict[str, float]:
        return {size: round(statistics.median(values), digits or None) for size, values in table[kind].items()}

    pps, baseline, asyncio_pps = median("vswitch"), median("blocking"), median("asyncio")
    report = {
        "pps": pps,
        "baseline_pps": baseline,
        "baseline": "plain Python UDP forwarder loop (blocking recv/sendto, no parsing, no policy), same run",
        "asyncio_forwarder_pps": asyncio_pps,
        "ratio_vs_baseline": {s: round(pps[s] / baseline[s], 3) if baseline[s] else None for s in pps},
        "mbit_s": {s: round(pps[s] * int(s) * 8 / 1e6, 1) for s in pps},
        "cpu_us_per_frame": {k: median(k, cpu_us, 1) for k in kinds},
        "path": "web -> db, same subnet, stateful ingress rule + conntrack, anti-spoofing, one vswitch process",
        "runs": args.runs,
        "seconds": args.seconds,
        "raw_pps": results,
        "vswitch_drops": {k: v for k, v in counters["switch"].items() if k.startswith("dropped")},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
