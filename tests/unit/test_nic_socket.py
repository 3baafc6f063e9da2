"""hostd's QEMU NIC socket: a receive buffer that rides out a TCG stall, and its kernel drop count."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from livemig.host.vnics import NIC_SOCKET_BUFFER, _grow_receive_buffer, udp_socket_drops


def test_the_receive_buffer_grows_past_the_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        _grow_receive_buffer(sock)
        grown = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert grown > default
    if os.geteuid() == 0:
        assert grown >= NIC_SOCKET_BUFFER  # the kernel reports twice what was set


def test_drops_are_read_for_this_socket_only(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        inode = os.fstat(sock.fileno()).st_ino
        assert udp_socket_drops(inode) == 0
    table = tmp_path / "udp"
    header = "sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops\n"
    row = "1: 0100007F:A000 0100007F:A001 01 00000000:00000000 00:00000000 00000000 0 0 {} 2 0000000000000000 {}\n"
    table.write_text(header + row.format(111, 0) + row.format(222, 7))
    assert udp_socket_drops(222, str(table)) == 7
    assert udp_socket_drops(333, str(table)) is None
    assert udp_socket_drops(1, str(tmp_path / "missing")) is None
