"""The tc class holds a real TCP stream to the reserved share; other traffic is not held (root only).

Two namespace hosts from ``hostns`` (so the layout itself is exercised), a receiver in host 1's
namespace on two ports, a sender in host 0's namespace pushing as fast as it can: the port with
a class goes at about its rate, the other one many times faster. The class is gone after release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from livemig.host.shaping import MigrationShaper
from livemig.region.hostns import MIGRATION_DEVICE, NamespaceLayout, plumb, unplumb

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("nsenter") is None,
    reason="namespace hosts need root, tc and nsenter",
)

SHARE_MIB_S = 8
SECONDS = 1.5

RECEIVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(1 << 20), b"")], daemon=True).start()
for port in map(int, sys.argv[1:]):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

SENDER = """
import json, socket, sys, time
address, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((address, port)); chunk = b"x" * 65536; sent = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    sent += s.send(chunk)
print(json.dumps({"mib_s": sent / (time.monotonic() - start) / 1048576}))
"""


def _in_netns(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


@pytest.fixture
def two_hosts() -> Iterator[NamespaceLayout]:
    layout = NamespaceLayout(199)
    plumb(layout, 2)
    try:
        yield layout
    finally:
        unplumb(layout, 2)


def _send(layout: NamespaceLayout, port: int) -> float:
    out = subprocess.run(_in_netns(layout.netns(0), sys.executable, "-c", SENDER, layout.migration_address(1),
                                   str(port), str(SECONDS)),
                         capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    return float(json.loads(out)["mib_s"])


def test_class_holds_the_stream_to_its_share_and_nothing_else(two_hosts: NamespaceLayout) -> None:
    layout = two_hosts
    receiver = subprocess.Popen(_in_netns(layout.netns(1), sys.executable, "-c", RECEIVER, "7001", "7002"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        shaper = MigrationShaper(layout.netns(0), MIGRATION_DEVICE, budget_mib_s=1024)
        shaped = shaper.reserve(f"tcp:{layout.migration_address(1)}:7001", SHARE_MIB_S)
        held = _send(layout, 7001)
        free = _send(layout, 7002)
        sent_bytes = shaped.bytes_sent()
        shaped.release()
        remaining = list(shaper.classes())
    finally:
        receiver.kill()
        receiver.wait()
    print(f"shaped {held:.1f} MiB/s (share {SHARE_MIB_S}), unshaped {free:.1f} MiB/s, class passed {sent_bytes} B")
    assert 0.5 * SHARE_MIB_S <= held <= 1.3 * SHARE_MIB_S
    assert free > 4 * SHARE_MIB_S, "the unshaped port must not be held: the filter matches only the migration"
    assert sent_bytes >= 0.5 * SHARE_MIB_S * SECONDS * 1048576, "the stream went through the class"
    assert f"1:{shaped.minor:x}" not in remaining and "1:1" in remaining


def test_reserve_rejects_a_uri_it_cannot_match(two_hosts: NamespaceLayout) -> None:
    from livemig.errors import Conflict

    shaper = MigrationShaper(two_hosts.netns(0), MIGRATION_DEVICE, budget_mib_s=64)
    shaper.reset()  # hostd start, then every reserve installs again: idempotent
    shaper.install()
    with pytest.raises(Conflict, match="expected tcp:ADDRESS:PORT"):
        shaper.reserve("unix:/tmp/x", 8)
    assert list(shaper.classes()) == ["1:1"]
    shaper.reserve(f"tcp:{two_hosts.migration_address(1)}:7003", 8).release()
    assert list(shaper.classes()) == ["1:1"]
