"""Reaching a VM on the VCN from this machine: a gateway namespace per subnet, and ``vm ssh``.

Why a namespace: a guest on the VCN has an address of its subnet, reachable only through the
vswitches. ``livemig net gateway VNIC`` (root) plugs a tap VNIC of that subnet into its host's
vswitch and moves it into the network namespace ``lmgw-<subnet>`` with the VNIC's address and a
route to the subnet's gateway (``network/gateway.py``), so processes in that namespace reach the
subnet through the same dataplane as the VMs: ARP from the mapping, security lists, conntrack, and
flows that move with a migrating VM. ``livemig vm ssh NAME`` then runs ``ssh`` in that namespace
to the address of the VM's first VNIC.

Host keys: a VM keeps its SSH host keys on its boot volume, so they stay the same wherever it
runs; ``ssh`` records them under the alias ``livemig-<vm>`` in the region's own ``known_hosts``.
"""

from __future__ import annotations

import ipaddress
import zlib
from pathlib import Path
from typing import Any

from livemig.errors import Conflict, InvalidRequest
from livemig.model.vm import NicDevice
from livemig.wire import lmo as wire_lmo
from livemig.wire.lmo import LmoClient, NetKind

DEFAULT_USER = "debian"  # Debian cloud images' (and livemig's distribution image's) default user


def gateway_netns(subnet: str) -> str:
    """The namespace ``net gateway`` makes for a subnet (``vm ssh`` looks there)."""
    return f"lmgw-{subnet}"


def _object(client: LmoClient, kind: NetKind, object_id: str) -> dict[str, Any]:
    for obj in client.run(wire_lmo.network_objects(kind)):
        if obj.get("id") == object_id:
            return obj
    raise InvalidRequest(f"no {kind.value.rstrip('s')} {object_id!r} in the region (livemig net list {kind.value})")


def open_gateway(
    client: LmoClient, vnic_id: str, netns: str | None = None, state_dir: Path | None = None
) -> tuple[str, str]:
    """Plug VNIC ``vnic_id`` into its host's vswitch as a tap inside a namespace (root).

    Returns (namespace, address/prefix). Idempotent: a namespace that already has the address
    is left as it is. The vswitch is asked as the region's operator: on the machine that holds the
    local region (``state_dir``), with its service certificate; a namespace host's vswitch makes
    the tap in that host's namespace, whence it is moved."""
    from livemig.network.gateway import plumb_tap
    from livemig.region.local import Region
    from livemig.region.netplumb import create_netns, ip, netns_exists
    from livemig.wire.vswitch import VswitchClient

    region = Region(state_dir).load()  # remembers the region's credentials for its services

    vnic = _object(client, NetKind.VNICS, vnic_id)
    subnet = _object(client, NetKind.SUBNETS, str(vnic["subnet"]))
    prefix = ipaddress.IPv4Network(str(subnet["cidr"])).prefixlen
    address = f"{vnic['ip']}/{prefix}"
    namespace = netns or gateway_netns(str(subnet["id"]))
    if not vnic.get("host"):
        raise InvalidRequest(f'VNIC {vnic_id} is placed on no host: give it a "host" in the network file')
    host = next((h.registration for h in client.hosts() if h.registration.name == vnic["host"]), None)
    if host is None or not host.vswitch_url:
        raise InvalidRequest(f"VNIC {vnic_id}'s host {vnic['host']!r} has no vswitch in this region")
    if netns_exists(namespace):
        if f"inet {address}" in ip("-n", namespace, "-o", "addr", "show"):
            return namespace, address
    else:
        create_netns(namespace)
    tap = f"lmgw{zlib.crc32(vnic_id.encode()):08x}"[:15]
    with VswitchClient(host.vswitch_url) as switch:
        switch.attach(vnic_id, tap=tap)
    where = next((h.netns for h in region.hosts if h.name == vnic["host"]), None) if region else None
    plumb_tap(tap, namespace, str(vnic["mac"]), address, str(subnet["gateway"]), from_netns=where)
    return namespace, address


def ssh_argv(
    client: LmoClient, vm: str, *, user: str = DEFAULT_USER, identity: Path | None = None, netns: str | None = None,
    known_hosts: Path, options: list[str] | None = None, command: list[str] | None = None,
) -> list[str]:  # fmt: skip
    """The ``ssh`` command line, run inside the subnet's gateway namespace, that reaches ``vm``."""
    from livemig.region.netplumb import netns_exists

    spec = client.vm(vm).spec
    nic = next((d for d in spec.devices if isinstance(d, NicDevice) and d.backend == "vswitch" and d.vnic), None)
    if nic is None or nic.vnic is None:
        raise InvalidRequest(f"VM {vm} has no NIC on the VCN (a nic device with backend vswitch)")
    vnic = _object(client, NetKind.VNICS, nic.vnic)
    namespace = netns or gateway_netns(str(vnic["subnet"]))
    if not netns_exists(namespace):
        raise Conflict(f"no gateway into subnet {vnic['subnet']} (namespace {namespace}): as root, run "
                       f"`livemig net gateway VNIC` with a VNIC of that subnet placed on a host")  # fmt: skip
    argv = ["ip", "netns", "exec", namespace, "ssh", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", f"HostKeyAlias=livemig-{vm}"]  # fmt: skip
    if identity is not None:
        argv += ["-i", str(identity)]
    for option in options or []:
        argv += ["-o", option]
    return [*argv, f"{user}@{vnic['ip']}", *(command or [])]
