"""Namespace hosts: a region whose hosts each get their own network namespace (root).

Why: on one machine every host's migration address is a loopback address, and loopback traffic
cannot be shaped per host. A namespace host has its own kernel network stack, so its migration
traffic leaves through a real interface (``mig0``) that ``tc`` can hold to the reserved share
(``host/shaping.py``) — the same setup as a real host with a dedicated migration NIC.

The layout, for region number R (from the state directory) and host index i::

    root namespace                              host namespace lmR-i (QEMUs of host i run here)
    bridge lmsR  10.213.R.254/24  <- veth ->    svc0  10.213.R.(i+1)/24, default route via .254
      (blockd's NBD listens on .254)              (storage: QEMU's NBD client reaches blockd)
    bridge lmmR  (no address)     <- veth ->    mig0  10.214.R.(i+1)/24 = the migration address
      (only host namespaces on it)                (HTB root qdisc: one class per outgoing migration)

hostd itself stays in the root namespace (its API, the LMO and the vswitch stay on loopback);
it starts each QEMU inside the host's namespace with ``nsenter --net`` and hands QEMU its NIC
socket as a file descriptor, so the VCN dataplane works unchanged. The migration bridge has no
address in the root namespace: migration traffic can only flow between host namespaces, never
through an API address.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from livemig.errors import BootstrapError
from livemig.region.netplumb import create_bridge, create_netns, delete_link, delete_netns, veth_into_netns

MIGRATION_DEVICE = "mig0"
SERVICE_DEVICE = "svc0"


@dataclass(frozen=True)
class NamespaceLayout:
    """Names and addresses of one region's namespace hosts (deterministic from its number)."""

    region: int  # 0..199, so every name fits IFNAMSIZ and every address is a valid octet

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> NamespaceLayout:
        return cls(zlib.crc32(str(state_dir.resolve()).encode()) % 200)

    @property
    def service_bridge(self) -> str:
        return f"lms{self.region}"

    @property
    def migration_bridge(self) -> str:
        return f"lmm{self.region}"

    @property
    def service_gateway(self) -> str:
        """The root namespace's address on the service bridge (blockd's NBD listens here)."""
        return f"10.213.{self.region}.254"

    def netns(self, index: int) -> str:
        return f"lm{self.region}-{index}"

    def service_address(self, index: int) -> str:
        return f"10.213.{self.region}.{index + 1}"

    def migration_address(self, index: int) -> str:
        return f"10.214.{self.region}.{index + 1}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise BootstrapError("namespace hosts need root (network namespaces, veth pairs and tc); "
                             "run without --netns for loopback hosts")  # fmt: skip


def plumb(layout: NamespaceLayout, hosts: int) -> None:
    """Create the bridges and one namespace per host; replaces leftovers of an earlier run."""
    require_root()
    unplumb(layout, hosts)
    create_bridge(layout.service_bridge, f"{layout.service_gateway}/24")
    create_bridge(layout.migration_bridge)
    for i in range(hosts):
        ns = layout.netns(i)
        create_netns(ns)
        veth_into_netns(f"{ns}s", layout.service_bridge, ns, SERVICE_DEVICE,
                        f"{layout.service_address(i)}/24", layout.service_gateway)  # fmt: skip
        veth_into_netns(f"{ns}m", layout.migration_bridge, ns, MIGRATION_DEVICE, f"{layout.migration_address(i)}/24")


def unplumb(layout: NamespaceLayout, hosts: int) -> None:
    """Remove the namespaces (their veths go with them) and the bridges; quiet if gone."""
    for i in range(hosts):
        delete_netns(layout.netns(i))
        delete_link(f"{layout.netns(i)}s")
        delete_link(f"{layout.netns(i)}m")
    delete_link(layout.service_bridge)
    delete_link(layout.migration_bridge)
