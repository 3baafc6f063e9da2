"""``livemig sim`` as a process: it serves its hosts, and a SIGTERM (what the benchmark and any
service manager send) stops it cleanly, its VM records gone from tmpfs. Killed by the signal's
default action, it left them there: runs of the benchmark used up all of /dev/shm's inodes, and
the next run's hosts failed to create VMs with ENOSPC."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from livemig.model.migration import TERMINAL_PHASES
from livemig.region.freeport import consecutive_free_ports, free_port

ENDED = {p.value for p in TERMINAL_PHASES}


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


def _wait_json(
    url: str, ready: Callable[[Any], bool], procs: list[subprocess.Popen[bytes]], timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args!r} exited"
        with contextlib.suppress(httpx.TransportError, ValueError):
            reply = httpx.get(url, timeout=5)
            if reply.status_code == 200 and ready(reply.json()):
                return reply.json()
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout:.0f} s")


@pytest.mark.slow
def test_a_sharded_simulator_migrates_a_vm_between_its_shards_and_ends_every_shard(tmp_path: Path) -> None:
    """``livemig sim --shards 2``: each shard serves half the hosts on its own port and registers
    them with the LMO; a VM migrated from a host of one shard to a host of the other runs there
    afterwards and is gone from its source (the stream crossed the processes); a SIGTERM to shard 0
    ends both, their VM records removed."""
    lmo_port, base = free_port(), consecutive_free_ports(2)
    lmo_url = f"http://127.0.0.1:{lmo_port}"
    lmo = subprocess.Popen(
        [sys.executable, "-m", "livemig.cli.main", "lmo", "--listen", f"127.0.0.1:{lmo_port}",
         "--db", f"sqlite:///{tmp_path / 'lmo.db'}", "--insecure", "--log-level", "warning"],
    )  # fmt: skip
    sim = subprocess.Popen(
        [sys.executable, "-m", "livemig.cli.main", "sim", "--hosts", "4", "--shards", "2", "--speed", "20",
         "--listen", f"127.0.0.1:{base}", "--lmo", lmo_url, "--report-interval", "0.5"],
    )  # fmt: skip
    try:
        stats = _wait_json(f"http://127.0.0.1:{base}/fleet", lambda s: s["registered"] == 4, [lmo, sim])
        assert stats["shards"] == stats["shards_answering"] == 2 and stats["hosts"] == 4
        assert len(set(stats["pids"])) == 2
        states = [Path(stats["state_dir"])]
        states.append(Path(httpx.get(f"http://127.0.0.1:{base + 1}/fleet", timeout=5).json()["state_dir"]))
        # sim00000-01 answer on shard 0's port, sim00002-03 on shard 1's
        hosts = {h["registration"]["name"]: h["registration"]["api_url"]
                 for h in httpx.get(f"{lmo_url}/hosts", params={"observe": False}, timeout=10).json()}  # fmt: skip
        assert hosts["sim00000"].startswith(f"http://127.0.0.1:{base}/") and hosts["sim00003"].startswith(
            f"http://127.0.0.1:{base + 1}/"
        )
        spec = {"name": "crossing", "memory_mib": 512, "workload": {"wss_mib": 64, "rate_mib_s": 16}}
        created = httpx.post(f"{lmo_url}/vms", json={"spec": spec, "host": "sim00000"}, timeout=30)
        assert created.status_code == 201, created.text
        moved = httpx.post(f"{lmo_url}/migrations", json={"vm": "crossing", "destination": "sim00003"}, timeout=30)
        assert moved.status_code == 201, moved.text
        done = _wait_json(f"{lmo_url}/migrations/{moved.json()['id']}", lambda m: m["phase"] in ENDED, [lmo, sim])
        assert done["phase"] == "Succeeded", done
        vm = httpx.get(f"{lmo_url}/vms/crossing", timeout=10).json()
        assert vm["host"] == "sim00003" and vm["observed"]["state"] == "running", vm
        gone = httpx.get(f"{hosts['sim00000']}/vms/crossing", timeout=10)
        assert gone.status_code == 404, gone.text
    finally:
        for proc in (sim, lmo):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in (sim, lmo)]
    assert codes[0] == 0
    assert not any(s.exists() for s in states), f"a shard left its VM records: {states}"
