"""NICs on a plain shared L2 segment (``NicDevice.backend == "segment"``): the no-hand-off
reference that bench/blackout.py migrates beside VCN guests.

Why hostd makes the socket: a segment's hub (``livemig.testing.segment``) sends every frame to
every port it knows, and it knows a port from the first datagram the port sends. A migration's
destination QEMU sends nothing until its guest runs, so hostd says hello from the socket (an
empty datagram) before passing it to QEMU: both QEMUs hear the segment from the moment they
exist, as on one wire. hostd keeps no copy once QEMU has started.
"""

from __future__ import annotations

import socket

from livemig.errors import LivemigError
from livemig.model.vm import NicDevice, VmSpec


def segment_nics(spec: VmSpec) -> list[NicDevice]:
    return [d for d in spec.devices if isinstance(d, NicDevice) and d.backend == "segment"]


def open_segment_sockets(spec: VmSpec) -> dict[str, socket.socket]:
    """Per segment NIC id, a UDP socket connected to its hub that has said hello."""
    opened: dict[str, socket.socket] = {}
    try:
        for nic in segment_nics(spec):
            assert nic.segment is not None  # the spec's validator: a segment NIC names its hub
            host, port = nic.segment.rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            opened[nic.id] = sock
            sock.bind((host, 0))
            sock.connect((host, int(port)))
            sock.send(b"")
    except (OSError, OverflowError) as exc:  # OverflowError: a port above 65535
        close_all(opened)
        raise LivemigError(f"VM {spec.name}: cannot join its L2 segment: {exc}") from exc
    return opened


def netdev(nic_id: str, sock: socket.socket) -> str:
    return f"dgram,id=net_{nic_id},local.type=fd,local.str={sock.fileno()}"


def close_all(sockets: dict[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()
