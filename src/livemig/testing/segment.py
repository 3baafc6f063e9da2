"""A plain shared L2 segment on this machine: a hub that sends every frame to every other port.

Why it exists: bench/blackout.py needs a reference migration whose network needs no hand-off at
all, to tell what livemig's hand-off adds over the floor (the pause, and the resumed guest's own
warm-up). On a hub both QEMUs of a migration hear every frame from the moment they start
(``host/segment.py`` says hello for each), just as two NICs on one wire would: nothing moves,
nothing is held or released. What that costs is what any shared wire costs: the destination's
socket also collects frames the source's guest already answered, and delivers them when it resumes.

Ports are QEMU NIC sockets (UDP, one Ethernet frame per datagram, QEMU's ``-netdev dgram``),
known from the first datagram each sends, and optionally one tap device, so processes in a
network namespace reach the segment. Root only for the tap.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from collections import Counter

from livemig.network.gateway import open_tap

_MAX_FRAME = 65536


class SegmentHub:
    """The hub: a UDP socket on loopback for QEMU ports and, if named, a tap; a thread floods."""

    def __init__(self, tap: str | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.tap_fd = open_tap(tap) if tap else None
        self.ports: list[tuple[str, int]] = []
        self.counters: Counter[str] = Counter()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="segment-hub", daemon=True)

    def __enter__(self) -> SegmentHub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w, *([self.tap_fd] if self.tap_fd is not None else [])):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock.close()

    def _run(self) -> None:
        watched = [self.sock.fileno(), self._stop_r, *([self.tap_fd] if self.tap_fd is not None else [])]
        while True:
            readable, _, _ = select.select(watched, [], [])
            if self._stop_r in readable:
                return
            if self.sock.fileno() in readable:
                self._from_ports()
            if self.tap_fd is not None and self.tap_fd in readable:
                self._from_tap()

    def _from_ports(self) -> None:
        while True:
            try:
                frame, sender = self.sock.recvfrom(_MAX_FRAME)
            except (BlockingIOError, ConnectionRefusedError):
                return  # nothing more; or an ICMP error for a port that went away
            if sender not in self.ports:
                self.ports.append(sender)
            if not frame:
                self.counters["hellos"] += 1
                continue
            self.counters["frames_from_ports"] += 1
            self._flood(frame, sender)
            if self.tap_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(self.tap_fd, frame)

    def _from_tap(self) -> None:
        assert self.tap_fd is not None
        while True:
            try:
                frame = os.read(self.tap_fd, _MAX_FRAME)
            except (BlockingIOError, OSError):
                return
            self.counters["frames_from_tap"] += 1
            self._flood(frame, None)

    def _flood(self, frame: bytes, sender: tuple[str, int] | None) -> None:
        for port in self.ports:
            if port != sender:
                try:
                    self.sock.sendto(frame, port)
                except OSError:  # a QEMU that exited: its port refuses, the others still get the frame
                    self.counters["send_errors"] += 1
