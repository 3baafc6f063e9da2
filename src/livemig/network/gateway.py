"""Reaching a VCN subnet from processes on this machine: a tap VNIC, optionally inside a netns.

Why a tap: QEMU VMs reach the vswitch through UDP (``ports.py``), but a test or a demo wants an
ordinary Linux process — ``curl``, a Python socket — to talk to those VMs through the *same*
dataplane (ARP from the mapping, routing, security lists, conntrack, the overlay). The simplest
honest way is a kernel network interface whose frames the vswitch reads and writes: a tap device
(``/dev/net/tun``, ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI``: each read/write is one Ethernet frame).

How (root only; the rest of the vswitch needs no privileges)::

    POST /vnics {"vnic_id": "gw-1", "tap": "lmtap0"}    # the vswitch creates lmtap0 and owns its fd
    plumb_tap("lmtap0", netns="blue", mac=..., address="10.0.1.9/24", gateway="10.0.1.1")

The tap carries one VNIC of the mapping (its MAC and IP must match the VNIC record, or the
vswitch's anti-spoofing drops its frames). ``plumb_tap`` moves the device into a network namespace
(the fd keeps working across the move) so the namespace's routing table sends only subnet traffic
to the VCN and the host's own networking is untouched. Deleting the VNIC closes the fd, which
removes the (non-persistent) tap, in whichever namespace it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
from collections import Counter

from livemig.errors import BootstrapError, Conflict
from livemig.network.ports import FrameSink
from livemig.region.netplumb import ip

log = logging.getLogger(__name__)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_BURST = 64  # frames read per wake-up, so one busy tap cannot starve the event loop


def open_tap(name: str) -> int:
    """Create (or attach to) tap ``name``; returns a non-blocking fd reading/writing whole frames."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    except OSError as exc:
        raise BootstrapError(f"cannot open /dev/net/tun ({exc.strerror}); taps need root and the tun module") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise Conflict(f"cannot create tap {name!r}: {exc.strerror}") from None
    return fd


class TapPort:
    """A VNIC whose 'VM' is the kernel behind a tap device."""

    kind = "tap"

    def __init__(self, vnic_id: str, name: str, on_frame: FrameSink) -> None:
        self.vnic_id = vnic_id
        self.name = name
        self.on_frame = on_frame
        self.counters: Counter[str] = Counter()
        self.fd = open_tap(name)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        for _ in range(_BURST):
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.counters["socket_errors"] += 1
                return
            try:
                self.on_frame(self.vnic_id, frame)
            except Exception:  # a bug must cost one frame, never the switch
                self.counters["handler_errors"] += 1
                if self.counters["handler_errors"] <= 10:
                    log.exception("frame handler failed (frame dropped)")

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:  # link down (EIO) or queue full (EAGAIN): a lost frame, like a real NIC
            self.counters["socket_errors"] += 1

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# putting the tap where its processes live (root; for tests and demos)


def plumb_tap(tap: str, netns: str | None, mac: str, address: str | None = None, gateway: str | None = None,
              from_netns: str | None = None) -> None:  # fmt: skip
    """Give tap ``tap`` the VNIC's identity, inside ``netns`` if given, and bring it up.

    ``address`` is ``ip/prefix``; leave it out to let a DHCP client in the namespace ask the
    vswitch (which answers from the mapping). ``from_netns``: where the vswitch made the tap (a
    namespace host's vswitch runs in the host's namespace).
    """
    ns: list[str] = []
    if netns:
        ip(*(["-n", from_netns] if from_netns else []), "link", "set", tap, "netns", netns)
        ns = ["-n", netns]
    ip(*ns, "link", "set", tap, "address", mac)
    if address:
        ip(*ns, "addr", "add", address, "dev", tap)
    ip(*ns, "link", "set", tap, "up")
    if gateway:
        ip(*ns, "route", "add", "default", "via", gateway, "dev", tap)
