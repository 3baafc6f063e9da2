"""Kernel network plumbing with iproute2 (root): namespaces, bridges, veth pairs.

Why one module: the tap gateway (``network/gateway.py``), the namespace hosts of a region
(``hostns.py``) and their tc classes (``host/shaping.py``) all drive iproute2; each failure
becomes one ``Conflict`` carrying the tool's own message instead of a stack trace.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

from livemig.errors import Conflict


def iproute2(tool: str, *args: str, check: bool = True) -> str:
    """Run an iproute2 ``tool`` (``ip``, ``tc``); its stdout, or (``check``) a ``Conflict`` with
    the tool's own message."""
    result = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise Conflict(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def ip(*args: str) -> str:
    return iproute2("ip", *args)


def create_netns(name: str) -> None:
    """A fresh network namespace with loopback up and IPv6 off (no router solicitations)."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    subprocess.run(
        ["ip", "netns", "exec", name, "sh", "-c",
         "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
        check=False, capture_output=True,
    )  # fmt: skip


def delete_netns(name: str) -> None:
    """Remove a namespace (and the veth ends inside it); quiet if it is gone."""
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def netns_exists(name: str) -> bool:
    return subprocess.run(["ip", "netns", "pids", name], capture_output=True, check=False).returncode == 0


def delete_link(name: str) -> None:
    """Remove a link (a bridge, or a veth pair by either end); quiet if it is gone."""
    subprocess.run(["ip", "link", "delete", name], check=False, capture_output=True)


def create_bridge(name: str, address: str | None = None) -> None:
    """A Linux bridge in this namespace, up, optionally with ``ip/prefix`` on it."""
    delete_link(name)
    ip("link", "add", name, "type", "bridge")
    if address:
        ip("addr", "add", address, "dev", name)
    ip("link", "set", name, "up")


def veth_into_netns(outside: str, bridge: str, netns: str, inside: str, address: str,
                    gateway: str | None = None) -> None:  # fmt: skip
    """A veth pair: ``outside`` enslaved to ``bridge`` here, ``inside`` in ``netns`` with
    ``address`` (``ip/prefix``) and, if given, a default route via ``gateway``."""
    delete_link(outside)
    ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
    ip("link", "set", outside, "master", bridge)
    ip("link", "set", outside, "up")
    ip("-n", netns, "addr", "add", address, "dev", inside)
    ip("-n", netns, "link", "set", inside, "up")
    if gateway:
        ip("-n", netns, "route", "add", "default", "via", gateway, "dev", inside)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A throwaway network namespace."""
    delete_netns(name)
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)
