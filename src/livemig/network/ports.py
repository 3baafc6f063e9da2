"""The vswitch's sockets: one UDP pair per VNIC facing QEMU, and the overlay socket facing peers.

Why UDP on loopback: QEMU's ``-netdev dgram`` sends each guest frame as one datagram from
``local.port`` to ``remote.port`` and delivers each datagram it receives on ``local.port`` as one
frame. So a VNIC is a socket the vswitch binds on 127.0.0.1 (QEMU's ``remote``) plus the port QEMU
binds (its ``local``) — no root, no tap, no bridge, and the vswitch sees every frame. Datagrams
from any other address than QEMU's are dropped (a local process cannot inject frames as a VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from livemig.errors import Conflict
from livemig.faults.registry import REGISTRY

log = logging.getLogger(__name__)

FrameSink = Callable[[str, bytes], None]
LOOPBACK = "127.0.0.1"
_SOCKET_BUFFER = 4 * 1024 * 1024
_BURST = 64  # datagrams read per wake-up, so one busy socket cannot starve the others


class Port(Protocol):
    """Where one VNIC's frames enter (``on_frame``) and leave (``send``) the vswitch."""

    kind: str
    counters: Counter[str]

    def send(self, frame: bytes) -> None: ...

    def close(self) -> None: ...


def free_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port nobody holds right now (for QEMU's side of a VNIC)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _bound_udp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class _BurstReader:
    """Reads a non-blocking UDP socket from the event loop, up to ``_BURST`` datagrams per wake-up.

    Why not ``DatagramProtocol``: asyncio's datagram transport returns to the selector after every
    datagram; draining a burst per wake-up roughly doubles what one Python process forwards.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.counters: Counter[str] = Counter()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        for _ in range(_BURST):
            try:
                data, addr = recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error reported on the socket: nothing to read this time
                self.counters["socket_errors"] += 1
                return
            try:
                self.received(data, addr)
            except Exception:  # a bug must cost one frame, never the switch
                self.counters["handler_errors"] += 1
                if self.counters["handler_errors"] <= 10:
                    log.exception("frame handler failed (frame dropped)")

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        raise NotImplementedError

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:  # queue full or peer gone: a lost datagram, counted like a NIC would
            self.counters["tx_errors"] += 1

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)


class UdpPort(_BurstReader):
    """A VNIC as QEMU's ``-netdev dgram`` sees it.

    The socket is *connected* to QEMU's address: the kernel then delivers only QEMU's datagrams
    (another local process cannot inject frames as the VM) and sends without a route lookup or an
    address per call, which is most of what forwarding a frame costs here."""

    kind = "udp"

    def __init__(self, sock: socket.socket, vnic_id: str, on_frame: FrameSink, qemu_port: int) -> None:
        self.qemu_addr = (LOOPBACK, qemu_port)
        sock.connect(self.qemu_addr)
        super().__init__(sock)
        self.vnic_id = vnic_id
        self.on_frame = on_frame
        self._send = sock.send

    @property
    def switch_port(self) -> int:
        return self.local_address[1]

    def _readable(self) -> None:
        recv, on_frame, vnic_id = self.sock.recv, self.on_frame, self.vnic_id
        for _ in range(_BURST):
            try:
                data = recv(65536)
            except BlockingIOError:
                return
            except OSError:  # ECONNREFUSED: QEMU was not listening when we last sent; nothing to read
                self.counters["socket_errors"] += 1
                return
            try:
                on_frame(vnic_id, data)
            except Exception:  # a bug must cost one frame, never the switch
                self.counters["handler_errors"] += 1
                if self.counters["handler_errors"] <= 10:
                    log.exception("frame handler failed (frame dropped)")

    def send(self, frame: bytes) -> None:
        try:
            self._send(frame)
        except OSError:  # queue full, or QEMU not (yet) listening: a lost frame, counted like a NIC's
            self.counters["tx_errors"] += 1


def reopen_udp_port(vnic_id: str, on_frame: FrameSink, switch_port: int, qemu_port: int) -> UdpPort:
    """Bind a VNIC's *known* switch port again (a restarted vswitch: QEMU's socket is connected to it)."""
    return UdpPort(_bound_udp(LOOPBACK, switch_port), vnic_id, on_frame, qemu_port)


async def open_udp_port(vnic_id: str, on_frame: FrameSink, qemu_port: int | None = None) -> UdpPort:
    """Bind the vswitch's side of a VNIC on loopback; QEMU binds ``qemu_port`` (chosen if None)."""
    return UdpPort(_bound_udp(LOOPBACK, 0), vnic_id, on_frame, qemu_port or free_udp_port())


#: the overlay's data-path fault point (``faults/points.py``)
OVERLAY_SEND = "vswitch.overlay.send"


class OverlaySocket(_BurstReader):
    """The host's VXLAN endpoint: every datagram is a VXLAN header plus one inner frame."""

    def __init__(self, sock: socket.socket, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        super().__init__(sock)
        self.on_datagram = on_datagram
        self._late: set[asyncio.Task[None]] = set()  # datagrams held by a fault, sent when released

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if REGISTRY.armed and REGISTRY.matches(OVERLAY_SEND, REGISTRY.scope()):
            self._faulted_send(data, addr)
            return
        super().sendto(data, addr)

    def _faulted_send(self, data: bytes, addr: tuple[str, int]) -> None:
        """``vswitch.overlay.send`` fired: drop (loss), or send later (delay, hold) without
        blocking the switch; ``error`` counts as a send error, ``crash`` kills the vswitch."""
        fired = REGISTRY.take(OVERLAY_SEND, REGISTRY.scope())
        if fired is None:
            super().sendto(data, addr)
            return
        action = fired.action.value
        if action == "crash":
            REGISTRY.crash()
        if action in ("drop", "error", "crash"):
            self.counters["fault_dropped"] += 1
            return
        self.counters["fault_delayed"] += 1
        if action == "delay":
            self._loop.call_later(fired.seconds or 0.0, super().sendto, data, addr)
            return

        async def send_when_released() -> None:
            await REGISTRY.wait(fired)
            _BurstReader.sendto(self, data, addr)

        task = self._loop.create_task(send_when_released())
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    @property
    def endpoint(self) -> str:
        host, port = self.local_address
        return f"{host}:{port}"


async def open_overlay(listen: str, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> OverlaySocket:
    """Bind the overlay endpoint ``ip:port`` (port 0: any free port)."""
    host, _, port = listen.rpartition(":")
    return OverlaySocket(_bound_udp(host or "0.0.0.0", int(port)), on_datagram)
