"""``livemig sim`` as a process: it serves its hosts, and a SIGTERM (what the benchmark and any
service manager send) stops it cleanly, its VM records gone from tmpfs. Killed by the signal's
default action, it left them there: runs of the benchmark used up all of /dev/shm's inodes, and
the next run's hosts failed to create VMs with ENOSPC."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from livemig.region.freeport import free_port


def test_the_simulator_serves_its_hosts_and_a_sigterm_removes_its_vm_records() -> None:
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "livemig.cli.main", "sim", "--hosts", "20", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        stats = None
        deadline = time.monotonic() + 60
        while stats is None and time.monotonic() < deadline:
            try:
                stats = httpx.get(f"http://127.0.0.1:{port}/fleet", timeout=5).json()
            except httpx.TransportError:
                assert sim.poll() is None, sim.stdout.read().decode() if sim.stdout else ""
                time.sleep(0.2)
        assert stats is not None, "the simulator did not answer within 60 s"
        assert stats["hosts"] == 20
        state = Path(stats["state_dir"])
        assert state.is_dir()
        host = httpx.get(f"http://127.0.0.1:{port}/h/sim00003/host", timeout=5)
        assert host.status_code == 200 and host.json()["name"] == "sim00003"
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=30) == 0
        assert not state.exists(), f"the simulator left {state} behind"
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
