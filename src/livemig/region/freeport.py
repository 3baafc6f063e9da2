"""Free loopback ports for the processes a region, a test or a benchmark starts.

Why a batch: a port is "free" only until someone binds it, and the kernel readily hands a
just-closed port out again, so asking twice in a row can return the same port twice (seen: a
blockd given one port for its API and its NBD server). ``free_ports`` keeps every socket bound
until all are chosen, so the ports of one batch are distinct.
"""

from __future__ import annotations

import contextlib
import socket

from livemig.errors import LivemigError


def free_ports(count: int, address: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """``count`` distinct ports on ``address`` that nobody held a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, kind)
            sockets.append(sock)
            sock.bind((address, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(address: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    return free_ports(1, address, kind)[0]


def consecutive_free_ports(count: int, address: str = "127.0.0.1", attempts: int = 100) -> int:
    """A free port with the ``count - 1`` after it free too, for processes that find each other by
    counting from one port (the fleet simulator's shards)."""
    for _ in range(attempts):
        base = free_port(address)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind((address, port))
            except OSError:
                continue
            return base
    raise LivemigError(f"no {count} consecutive free ports on {address} in {attempts} attempts")
