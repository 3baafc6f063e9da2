"""One batch of free ports never repeats a port (two single calls may: the kernel reuses them)."""

from __future__ import annotations

import socket

from livemig.region.freeport import free_port, free_ports


def test_a_batch_is_distinct_and_bindable() -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        ports = free_ports(50, kind=kind)
        assert len(set(ports)) == 50
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", ports[0]))  # still free right after
    assert 0 < free_port() < 65536
