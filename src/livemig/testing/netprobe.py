"""Traffic probes run from a gateway network namespace (``ip netns exec NS python -m
livemig.testing.netprobe ...``): a TCP echo client that measures the longest gap between echoes,
and a UDP sequence sender for the guest workload's loss/duplicate counter. Each stops when a stop
file appears (or after ``--max-s``) and prints one JSON object.

The echo client can also cut its run into labelled segments (``--mark-file``): whenever that file
appears it closes the current segment, opens one named by the file's text and deletes the file (the
acknowledgement). A caller marks the start and end of each migration and so learns the longest gap
*of that migration* on one connection that lives across several. A segment is only cut after an
echo came back, so a stall belongs to the segment in which it began.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import time
from typing import Any

LONG_GAP_MS = 20.0  # echo gaps at least this long are listed with their end time


class Segments:
    """The echo run's labelled segments (see the module's docstring)."""

    def __init__(self, mark_file: str | None, label: str = "start") -> None:
        self.mark_file = mark_file
        self.closed: list[dict[str, Any]] = []
        self._open(label)

    def _open(self, label: str) -> None:
        self.label, self.sent, self.received, self.max_gap, self.max_gap_end = label, 0, 0, 0.0, 0.0
        self.started = time.time()

    def echoed(self, gap_ms: float) -> None:
        self.sent += 1
        self.received += 1
        if gap_ms >= self.max_gap:
            self.max_gap, self.max_gap_end = gap_ms, time.time()  # wall clock: the migration's timeline's

    def cut_if_marked(self) -> None:
        if self.mark_file is None:
            return
        try:
            with open(self.mark_file) as f:
                label = f.read().strip() or f"segment-{len(self.closed) + 1}"
        except FileNotFoundError:
            return
        self.close()
        self._open(label)
        os.unlink(self.mark_file)

    def close(self, unanswered: int = 0) -> None:
        self.closed.append({"label": self.label, "sent": self.sent + unanswered, "received": self.received,
                            "max_gap_ms": round(self.max_gap, 1) if self.received else None,
                            "max_gap_end_unix": round(self.max_gap_end, 3) if self.received else None,
                            "started_unix": round(self.started, 3), "ended_unix": round(time.time(), 3)})  # fmt: skip


def tcp_echo(host: str, port: int, interval_ms: float, stop_file: str, max_s: float,
             mark_file: str | None = None) -> dict[str, Any]:  # fmt: skip
    sent = received = 0
    segments = Segments(mark_file)
    gaps: list[float] = []
    long_gaps: list[tuple[float, float]] = []  # (wall-clock end, ms): where the stalls were
    error = None
    worst_end = 0.0
    deadline = time.monotonic() + max_s
    try:
        sock = socket.create_connection((host, port), timeout=10)
        sock.settimeout(15)
        reader = sock.makefile("rb")
        last = time.monotonic()
        while time.monotonic() < deadline and not os.path.exists(stop_file):
            line = f"probe {sent}\n".encode()
            sock.sendall(line)
            sent += 1
            echoed = reader.readline()
            if echoed != line:
                error = f"bad echo {echoed!r} for {line!r}"
                break
            received += 1
            now = time.monotonic()
            gaps.append((now - last) * 1000)
            if gaps[-1] >= max(gaps):
                worst_end = time.time()  # wall clock: lines up with the migration's timeline
            if gaps[-1] >= LONG_GAP_MS and len(long_gaps) < 1000:
                long_gaps.append((time.time(), round(gaps[-1], 1)))
            segments.echoed(gaps[-1])
            segments.cut_if_marked()
            last = now
            time.sleep(interval_ms / 1000)
        sock.close()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    segments.close(unanswered=sent - received)
    result: dict[str, Any] = {"sent": sent, "received": received, "error": error,
                              "max_gap_ms": round(max(gaps), 1) if gaps else None,
                              "max_gap_end_unix": worst_end or None,
                              "p50_gap_ms": round(sorted(gaps)[len(gaps) // 2], 1) if gaps else None,
                              "long_gaps": long_gaps}  # fmt: skip
    if mark_file is not None:
        result["segments"] = segments.closed
    return result


def tcp_serve(host: str, port: int, interval_ms: float, stop_file: str, max_s: float) -> dict[str, Any]:
    """Accept one connection (the guest's outbound one), then talk first: a line per interval,
    each to be echoed back. Replies to the guest pass only by the guest VNIC's conntrack entry."""
    sent = received = 0
    gaps: list[float] = []
    error = None
    server = socket.create_server((host, port))
    server.settimeout(max_s)
    deadline = time.monotonic() + max_s
    try:
        conn, _ = server.accept()
        conn.settimeout(0.05)
        pending = b""
        last = time.monotonic()
        while time.monotonic() < deadline and not os.path.exists(stop_file):
            sent += 1
            conn.sendall(f"data {sent}\n".encode())
            end = time.monotonic() + interval_ms / 1000
            while time.monotonic() < end:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise ConnectionError("the guest closed the connection")
                pending += chunk
                while b"\n" in pending:
                    _line, pending = pending.split(b"\n", 1)
                    received += 1
                    now = time.monotonic()
                    gaps.append((now - last) * 1000)
                    last = now
        gaps.append((time.monotonic() - last) * 1000)  # a stall at the end counts too
        conn.close()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        server.close()
    return {"sent": sent, "received": received, "error": error,
            "max_gap_ms": round(max(gaps), 1) if gaps else None}  # fmt: skip


def udp_send(host: str, port: int, pps: int, stop_file: str, max_s: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seq = 0
    start = time.monotonic()
    deadline = start + max_s
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        seq += 1
        sock.sendto(struct.pack(">Q", seq) + b"x" * 56, (host, port))
        next_at = start + seq / pps
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return {"sent": seq, "seconds": round(time.monotonic() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["tcp-echo", "tcp-serve", "udp-send"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--pps", type=int, default=1000)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--max-s", type=float, default=120.0)
    parser.add_argument("--mark-file", help="tcp-echo: cut a labelled segment whenever this file appears")
    args = parser.parse_args()
    if args.mode == "tcp-echo":
        result = tcp_echo(args.host, args.port, args.interval_ms, args.stop_file, args.max_s, args.mark_file)
    elif args.mode == "tcp-serve":
        result = tcp_serve(args.host, args.port, args.interval_ms, args.stop_file, args.max_s)
    else:
        result = udp_send(args.host, args.port, args.pps, args.stop_file, args.max_s)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
