"""hostd logic that needs no QEMU: parsing QEMU's replies, re-adoption bookkeeping, the console."""

import asyncio
import json
import re

from livemig.host import console
from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent
from livemig.host.source import sample_from, stats_from
from livemig.model import VmSpec

QUERY_MIGRATE_ACTIVE = {
    "status": "active", "expected-downtime": 12, "total-time": 830, "setup-time": 2,
    "ram": {"total": 537_985_024, "transferred": 300_000_000, "remaining": 40_000_000, "mbps": 3000.5,
            "dirty-pages-rate": 5120, "page-size": 4096, "dirty-sync-count": 3, "duplicate": 9, "normal": 7},
}  # fmt: skip


def test_samples_and_stats_carry_qemus_numbers():
    sample = sample_from(QUERY_MIGRATE_ACTIVE)
    assert sample.remaining_bytes == 40_000_000 and sample.dirty_sync_count == 3
    assert sample.dirty_rate_mib_s == 20.0 and sample.expected_downtime_ms == 12
    done = {**QUERY_MIGRATE_ACTIVE, "status": "completed", "downtime": 9}
    stats = stats_from(done, hook_ms=0.4)
    assert (stats.pause_ms, stats.total_ms, stats.rounds, stats.switchover_hook_ms) == (9, 830, 3, 0.4)


def test_a_missing_ram_section_gives_zeros_not_a_crash():
    assert sample_from({"status": "setup"}).total_bytes == 0
    assert stats_from({"status": "failed", "error-desc": "boom"}, None).error == "boom"


def test_adopt_forgets_vms_whose_qemu_is_gone(tmp_path):
    root = tmp_path / "vms" / "ghost"
    root.mkdir(parents=True)
    spec = VmSpec(name="ghost", memory_mib=256)
    (root / "vm.json").write_text(json.dumps({"spec": spec.model_dump(), "role": "running"}))
    (root / "qemu.pid").write_text("999999999\n")
    (tmp_path / "vms" / "garbage").mkdir()
    agent = HostAgent("A", tmp_path, "127.0.0.1", AccelChoice("tcg", "test"), 1024)
    assert asyncio.run(agent.adopt()) == []
    assert not root.exists() and agent.vms == {}


def test_console_reply_is_matched_by_token_after_the_offset(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("LIVEMIG CHECK 7 fail old answer\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("LIVEMIG HB seq=4 uptime_ms=4000\nLIVEMIG CHECK 7 ok pages=10 live_errors=0\n")
    match = asyncio.run(console.wait_for_line(log, re.compile(r"LIVEMIG CHECK 7 (.*)$"), start, 1))
    assert match.group(1).startswith("ok")
    assert console.last_heartbeat(log) == (4, 4000)


def test_hostd_drains_the_frames_qemu_left_in_its_nic_socket():
    """hostd's duplicate of QEMU's NIC socket reads back exactly what QEMU never read."""
    import socket

    from livemig.host.vnics import VswitchPorts
    from livemig.network.handoff import PAUSE_PROBE
    from livemig.network.ports import free_udp_port

    ports = VswitchPorts(None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as switch:
        switch.bind(("127.0.0.1", 0))
        qemu_port = free_udp_port()
        ours = ports._open_socket("v1", qemu_port, switch.getsockname()[1])
        assert ports._drain("v1") == (0, False)
        for n in range(3):
            switch.sendto(b"frame%d" % n, ("127.0.0.1", qemu_port))
        switch.sendto(PAUSE_PROBE, ("127.0.0.1", qemu_port))
        assert ports._drain("v1") == (3, True)  # three frames QEMU never read, and the probe
        assert ports._drain("v1") == (0, False)
        assert ports._drain("not-here") is None
        ours.send(b"to the switch")  # connected: QEMU's sends reach the vswitch's port
        assert switch.recv(100) == b"to the switch"
        ports._close_socket("v1")
        assert ours.fileno() == -1 and ports._drain("v1") is None
