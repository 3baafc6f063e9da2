"""Holding each outgoing migration to its reserved bandwidth with ``tc`` (namespace hosts, root).

Why tc as well as QEMU's ``max-bandwidth``: QEMU's limit is a promise by the sender; a ``tc``
class on the migration interface is the network keeping it, whatever QEMU does (a QEMU without
the parameter, a parameter reset by hand, a burst after a stall). The share the LMO admitted is
what both get.

Layout on the host's migration interface (``hostns.MIGRATION_DEVICE`` inside its namespace)::

    qdisc htb 1: (default 0: unclassified traffic is not shaped)
      class 1:1       rate = the host's migration budget       (all migrations together)
        class 1:N     rate = ceil = one migration's share      (one per outgoing migration)
          filter prio N: u32 ip dst = destination address, tcp dport = its port -> 1:N
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from livemig.errors import Conflict
from livemig.region.netplumb import iproute2

log = logging.getLogger(__name__)

ROOT_CLASS_MINOR = 1
FIRST_MINOR, LAST_MINOR = 0x10, 0xFFF0  # per-migration classes; the minor is also the filter's prio
MIB = 1024 * 1024


def _htb_rate(mib_s: int) -> list[str]:
    """rate = ceil (a share is a limit, not a floor to borrow above); an explicit quantum, as
    HTB's default (rate / 10) is out of range at migration speeds."""
    rate = f"{mib_s * MIB * 8}bit"
    return ["rate", rate, "ceil", rate, "quantum", "65536"]


@dataclass
class ShapedMigration:
    """One outgoing migration's tc class; ``release`` removes it (idempotent)."""

    shaper: MigrationShaper
    minor: int
    destination: str
    port: int
    mib_s: int
    released: bool = False

    def describe(self) -> str:
        s = self.shaper
        return (f"tc htb class 1:{self.minor:x} on {s.device} (netns {s.netns}): {self.mib_s} MiB/s "
                f"to {self.destination}:{self.port}")  # fmt: skip

    def bytes_sent(self) -> int:
        """Bytes the class has passed so far (the migration stream went through the shaper)."""
        return self.shaper.class_bytes(self.minor)

    def release(self) -> None:
        if not self.released:
            self.shaper.remove(self.minor)
            self.released = True


class MigrationShaper:
    """The HTB tree on one namespace host's migration interface."""

    def __init__(self, netns: str, device: str, budget_mib_s: int) -> None:
        self.netns = netns
        self.device = device
        self.budget_mib_s = budget_mib_s

    def _tc(self, *args: str, check: bool = True) -> str:
        return iproute2("tc", "-n", self.netns, *args, check=check)

    def install(self) -> None:
        """The root qdisc and the host's budget class; idempotent (hostd runs it at start).

        The qdisc is added only when missing: HTB refuses a ``replace`` of itself."""
        if "qdisc htb 1: root" not in self._tc("qdisc", "show", "dev", self.device):
            self._tc("qdisc", "replace", "dev", self.device, "root", "handle", "1:", "htb", "default", "0")
        self._tc("class", "replace", "dev", self.device, "parent", "1:", "classid", f"1:{ROOT_CLASS_MINOR}",
                 "htb", *_htb_rate(self.budget_mib_s))  # fmt: skip

    def classes(self) -> dict[str, int]:
        """Every HTB class on the device: handle (``1:1a``) -> bytes it has sent.

        Parsed from ``tc -s class show`` text: iproute2 6.1 has no JSON for HTB classes."""
        classes: dict[str, int] = {}
        handle: str | None = None
        for line in self._tc("-s", "class", "show", "dev", self.device).splitlines():
            words = line.split()
            if words[:2] == ["class", "htb"] and len(words) > 2:
                handle = words[2]
                classes[handle] = 0
            elif words[:1] == ["Sent"] and handle is not None and len(words) > 1 and words[1].isdigit():
                classes[handle] = int(words[1])
        return classes

    def class_bytes(self, minor: int) -> int:
        return self.classes().get(f"1:{minor:x}", 0)

    def reserve(self, uri: str, mib_s: int) -> ShapedMigration:
        """A class of ``mib_s`` for the migration stream to ``uri`` (``tcp:ADDRESS:PORT``)."""
        destination, port = _parse_tcp_uri(uri)
        self.install()
        used = {_minor(handle) for handle in self.classes()}
        minor = next((n for n in range(FIRST_MINOR, LAST_MINOR) if n not in used), None)
        if minor is None:
            raise Conflict(f"no free tc class on {self.device} (netns {self.netns})")
        self._tc("class", "add", "dev", self.device, "parent", f"1:{ROOT_CLASS_MINOR}", "classid", f"1:{minor:x}",
                 "htb", *_htb_rate(mib_s))  # fmt: skip
        try:
            self._tc("filter", "add", "dev", self.device, "parent", "1:", "protocol", "ip", "prio", str(minor),
                     "u32", "match", "ip", "dst", f"{destination}/32", "match", "ip", "dport", str(port), "0xffff",
                     "flowid", f"1:{minor:x}")  # fmt: skip
        except Conflict:
            self._tc("class", "del", "dev", self.device, "classid", f"1:{minor:x}", check=False)
            raise
        shaped = ShapedMigration(self, minor, destination, port, mib_s)
        log.info("bandwidth: %s", shaped.describe())
        return shaped

    def reset(self) -> None:
        """The root qdisc and budget class, and no per-migration class (hostd start)."""
        self.install()
        for minor in map(_minor, self.classes()):
            if minor != ROOT_CLASS_MINOR:
                self.remove(minor)

    def remove(self, minor: int) -> None:
        self._tc("filter", "del", "dev", self.device, "parent", "1:", "prio", str(minor), check=False)
        self._tc("class", "del", "dev", self.device, "classid", f"1:{minor:x}", check=False)


def _minor(handle: str) -> int:
    """``1:1a`` -> 0x1a."""
    return int(handle.split(":")[1], 16)


def _parse_tcp_uri(uri: str) -> tuple[str, int]:
    kind, _, rest = uri.partition(":")
    address, _, port = rest.rpartition(":")
    if kind != "tcp" or not address or not port.isdigit():
        raise Conflict(f"cannot shape migration URI {uri!r}: expected tcp:ADDRESS:PORT")
    return address, int(port)
