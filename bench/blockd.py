#!/usr/bin/env python3
"""blockd vs qemu-nbd, same client, same kind of file, same run: sequential 1 MiB and random 4 KiB I/O.

Starts a real blockd (``livemig blockd``, fencing on) and ``qemu-nbd`` serving a fresh
sparse raw file of the same size, fills both once (so block allocation is not measured), then
runs each workload ``--rounds`` times, alternating which server goes first, and reports medians.

Clients (each one is used for both servers):

* ``pipelined`` (the headline numbers): a tight Python loop over one NBD connection with
  ``--depth`` requests in flight, simple replies, requests batched into one ``send``. It does
  true random 4 KiB offsets.
* ``qemu-img bench`` (QEMU's own NBD client, the one a guest's I/O goes through): sequential
  1 MiB at depth 16, and 4 KiB *strided* (it has no random mode) at depth 1 - at depth > 1 with
  4 KiB requests qemu-nbd 7.2 stalls ~40 ms per batch on loopback (a delayed-ACK interaction), which
  would flatter blockd, so that combination is not reported.

Prints JSON: ``{"ratio": {...}, "blockd": {...}, "qemu_nbd": {...}, "qemu_img_bench": {...}, ...}``;
ratios are blockd / qemu-nbd (sequential in MiB/s, random in IOPS; higher is better).

    .venv/bin/python bench/blockd.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig.region.freeport import free_port
from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.client import NbdClient
from livemig.testing.blockd import BlockdProcess

MIB = 1 << 20
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


def pipelined(client: NbdClient, command: int, size: int, offsets: list[int], depth: int) -> float:
    """Run one request per offset with ``depth`` in flight; returns seconds. Simple replies only."""
    sock = client.sock
    payload = bytes(range(256)) * (size // 256) if command == p.Command.WRITE else b""
    per_reply = p.SIMPLE_REPLY_SIZE + (size if command == p.Command.READ else 0)
    buffer = bytearray(max(per_reply * depth, 1 << 20))
    view = memoryview(buffer)
    filled = 0
    sent = done = 0
    total = len(offsets)
    start = time.perf_counter()
    while done < total:
        if sent - done < depth and sent < total:
            parts: list[bytes] = []
            while sent - done < depth and sent < total:
                parts.append(_REQUEST.pack(p.REQUEST_MAGIC, 0, command, sent, offsets[sent], size))
                if payload:
                    parts.append(payload)
                sent += 1
            sock.sendall(b"".join(parts))
        n = sock.recv_into(view[filled:])
        if n == 0:
            raise ConnectionError("server closed the connection")
        filled += n
        pos = 0
        while filled - pos >= per_reply:
            magic, error, _handle = _REPLY.unpack_from(buffer, pos)
            if magic != p.SIMPLE_REPLY_MAGIC or error:
                raise RuntimeError(f"bad reply: magic {magic:#x} error {error}")
            pos += per_reply
            done += 1
        if pos:
            buffer[: filled - pos] = buffer[pos:filled]
            filled -= pos
    return time.perf_counter() - start


class Target:
    """One server under test, reached by host/port/export."""

    def __init__(self, name: str, port: int, export: str) -> None:
        self.name, self.port, self.export = name, port, export

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def connect(self) -> NbdClient:
        return NbdClient("127.0.0.1", self.port, self.export, structured=False)


def workloads(size_bytes: int, seq_mib: int, rand_ops: int, seed: int) -> dict[str, tuple[int, int, list[int]]]:
    rng = random.Random(seed)
    seq = [(i * MIB) % size_bytes for i in range(seq_mib)]
    blocks = size_bytes // 4096
    rand = [rng.randrange(blocks) * 4096 for _ in range(rand_ops)]
    return {
        "seq_write": (p.Command.WRITE, MIB, seq),
        "seq_read": (p.Command.READ, MIB, seq),
        "rand_write": (p.Command.WRITE, 4096, rand),
        "rand_read": (p.Command.READ, 4096, rand),
    }


def rate(name: str, size: int, ops: int, seconds: float) -> float:
    """MiB/s for sequential workloads, IOPS for random ones."""
    return ops * size / MIB / seconds if name.startswith("seq") else ops / seconds


QEMU_IMG_CASES: dict[str, list[str]] = {
    "seq_write_1m_qd16": ["-w", "-s", "1M", "-d", "16"],
    "seq_read_1m_qd16": ["-s", "1M", "-d", "16"],
    "strided_write_4k_qd1": ["-w", "-s", "4k", "-S", "12288", "-d", "1"],
    "strided_read_4k_qd1": ["-s", "4k", "-S", "12288", "-d", "1"],
}


def qemu_img_bench(uri: str, case: list[str], count: int) -> float:
    out = subprocess.run(
        ["qemu-img", "bench", "-f", "raw", "-c", str(count), *case, uri], capture_output=True, text=True, timeout=300
    )
    match = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"qemu-img bench failed: {out.stdout}{out.stderr}")
    return float(match.group(1))


def medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {t: {w: round(statistics.median(v), 1) for w, v in ws.items()} for t, ws in samples.items()}


def ratios(result: dict[str, dict[str, float]]) -> dict[str, float]:
    return {w: round(result["blockd"][w] / result["qemu_nbd"][w], 3) for w in result["blockd"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=256, help="export size")
    parser.add_argument("--seq-mib", type=int, default=512, help="MiB per sequential run")
    parser.add_argument("--rand-ops", type=int, default=40000, help="4 KiB requests per random run")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight (pipelined client)")
    parser.add_argument("--seq-depth", type=int, default=8, help="1 MiB requests in flight (pipelined client)")
    parser.add_argument("--no-qemu-img", action="store_true", help="skip the qemu-img bench client")
    args = parser.parse_args()
    for tool in ("qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            print(json.dumps({"error": f"{tool} not found (Debian: qemu-utils)"}))
            return 2

    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="livemig-bench-blockd-") as tmp:
        base = Path(tmp)
        blockd = BlockdProcess(base / "blockd", base / "blockd.log")
        blockd.start()
        qemu_file = base / "qemu-nbd.raw"
        with open(qemu_file, "wb") as f:
            f.truncate(size)
        qemu_port = free_port()
        qemu = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "bench", "-b", "127.0.0.1", "-p", str(qemu_port), "-t", "-e", "8",
             "--cache=writeback", "--aio=threads", "--discard=unmap", str(qemu_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            blockd.create_volume("bench", size)
            attachment = blockd.attach("bench", vm="bench", host="local")
            targets = [
                Target("blockd", blockd.nbd_port, attachment["export_name"]),
                Target("qemu_nbd", qemu_port, "bench"),
            ]
            _wait_listening(qemu_port)
            result = run_all(targets, args, size)
        finally:
            qemu.terminate()
            qemu.wait(10)
            blockd.stop()
    print(json.dumps(result, indent=2))
    return 0


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("qemu-nbd did not start")


def run_all(targets: list[Target], args: argparse.Namespace, size: int) -> dict[str, Any]:
    loads = workloads(size, args.seq_mib, args.rand_ops, seed=1)
    fill = [i * MIB for i in range(size // MIB)]
    for target in targets:  # allocate every block once: allocation is not what we measure
        with target.connect() as client:
            pipelined(client, p.Command.WRITE, MIB, fill, args.seq_depth)
            client.flush()

    samples: dict[str, dict[str, list[float]]] = {t.name: {w: [] for w in loads} for t in targets}
    for round_no in range(args.rounds):
        for name, (command, block, offsets) in loads.items():
            order = targets if round_no % 2 == 0 else list(reversed(targets))
            for target in order:
                with target.connect() as client:
                    depth = args.seq_depth if block == MIB else args.depth
                    seconds = pipelined(client, command, block, offsets, depth)
                samples[target.name][name].append(rate(name, block, len(offsets), seconds))
    result = medians(samples)
    report: dict[str, Any] = {
        "ratio": ratios(result),
        "blockd": result["blockd"],
        "qemu_nbd": result["qemu_nbd"],
        "units": {"seq_read": "MiB/s", "seq_write": "MiB/s", "rand_read": "IOPS", "rand_write": "IOPS"},
        "client": f"pipelined Python NBD client, one connection, simple replies, depth {args.depth} "
        f"(4 KiB) / {args.seq_depth} (1 MiB)",
        "rounds": args.rounds,
        "samples": {t: {w: [round(x, 1) for x in v] for w, v in ws.items()} for t, ws in samples.items()},
    }
    if not args.no_qemu_img:
        report["qemu_img_bench"] = run_qemu_img(targets, args.rounds)
    report["limits"] = LIMITS
    return report


def run_qemu_img(targets: list[Target], rounds: int) -> dict[str, Any]:
    counts = {"seq_write_1m_qd16": 1024, "seq_read_1m_qd16": 1024, "strided_write_4k_qd1": 10000,
              "strided_read_4k_qd1": 10000}  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {t.name: {c: [] for c in QEMU_IMG_CASES} for t in targets}
    for round_no in range(rounds):
        for case, argv in QEMU_IMG_CASES.items():
            order = targets if round_no % 2 == 0 else list(reversed(targets))
            for target in order:
                seconds = qemu_img_bench(target.uri, argv, counts[case])
                block = MIB if case.startswith("seq") else 4096
                samples[target.name][case].append(rate(case, block, counts[case], seconds))
    result = medians(samples)
    return {
        "ratio": ratios(result),
        "blockd": result["blockd"],
        "qemu_nbd": result["qemu_nbd"],
        "units": "MiB/s for seq_*, IOPS for strided_*",
    }


LIMITS = (
    "blockd serves each connection from one Python event loop: parsing, the fencing gate, counters, "
    "a pread/pwrite syscall and the reply cost roughly 15-25 us of CPU per request, so one connection "
    "tops out around 40-60k IOPS, and at queue depth 1 that per-request cost shows directly as latency "
    "(qemu-nbd is C with a thread pool). Sequential 1 MiB I/O is bound by memory copies and loopback TCP "
    "for both servers. On this 2-core machine the client and the server share the CPUs, so the Python "
    "client itself caps the pipelined random numbers for both servers; the qemu-img bench section uses "
    "QEMU's C client instead."
)


if __name__ == "__main__":
    sys.exit(main())
