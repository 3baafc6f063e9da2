"""`livemig demo --json` end to end, as `make demo` runs it (its own region, real QEMU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.cli.guestnet import gateway_netns
from livemig.testing.netprobe import LONG_GAP_MS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
AS_ROOT = os.geteuid() == 0 and Path("/dev/net/tun").exists()
#: the longest echo gap of a migration: under TCG on a busy 2-core machine a pre-copy stall of the
#: vCPU or the resumed guest's warm-up (hundreds of ms here); seconds would mean a stalled connection
GAP_BOUND_MS = 3000
#: an echo the guest answered just before its STOP can reach the probe a few ms after it
IN_FLIGHT_MS = 15


def test_demo_reports_two_successful_live_migrations(tmp_path):
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", "demo", "--json", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["tls"] == ["migration", "nbd", "api"], "on by default: every stream and API encrypted"
    assert [(m["from"], m["to"]) for m in report["migrations"]] == [("A", "B"), ("B", "A")]
    for m in report["migrations"]:
        assert {"id", "vm", "from", "to", "phase", "pause_ms", "total_ms", "transferred_bytes", "rounds",
                "guest_memory_check"} <= set(m)  # fmt: skip
        assert m["phase"] == "Succeeded" and m["guest_memory_check"] == "ok"
        assert m["heartbeat_continues"] and m["source_qemu_exited"]
        assert 0 <= m["pause_ms"] < m["total_ms"] and m["transferred_bytes"] > 0 and m["rounds"] >= 1
        # the guest's own pause (source STOP -> destination RESUME) includes QEMU's downtime
        assert m["pause_ms"] - 5 <= m["guest_pause_ms"] < m["total_ms"], m
    assert not (tmp_path / "region.json").exists(), "the demo stops the region it started"
    assert_dashboard(report, tmp_path)
    if AS_ROOT:
        assert_network(report)
    else:
        assert report["network"]["probes"] == "skipped" and "not root" in report["network"]["reason"]
        assert "network probes skipped: not root" in done.stderr
        assert all(m["network"] is None for m in report["migrations"])
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert gateway_netns("demo-net") not in netns, "the demo removes its gateway namespace"


def assert_dashboard(report: dict, state_dir: Path) -> None:
    """Each migration's page, and where to log in (the token stays in the client file)."""
    dashboard = report["dashboard"]
    assert dashboard["login_url"].startswith("https://") and dashboard["login_url"].endswith("/ui/login")
    assert dashboard["token_file"] == str(state_dir / "client.toml") and dashboard["region_running"] is False
    lmo = dashboard["login_url"].removesuffix("/ui/login")
    assert [m["dashboard_url"] for m in report["migrations"]] == [
        f"{lmo}/ui/migrations/{m['id']}" for m in report["migrations"]
    ]


def assert_network(report: dict) -> None:
    """One TCP connection and a UDP stream through the gateway lived through both migrations."""
    network = report["network"]
    print(f"demo network: {json.dumps(network)}; per migration: {[m['network'] for m in report['migrations']]}")
    assert network["probes"] == "ran" and network["reason"] is None, network
    tcp, udp = network["tcp"], network["udp"]
    assert tcp["error"] is None and tcp["received"] == tcp["sent"] > 0, tcp
    assert udp["sent"] > 0 and udp["duplicated"] == 0, udp
    assert udp["received"] + udp["lost"] >= udp["sent"] - 5, "every datagram sent is accounted for"
    for m in report["migrations"]:
        mtcp, mudp = m["network"]["tcp"], m["network"]["udp"]
        assert mtcp["lost"] == 0 and mtcp["received"] == mtcp["sent"] > 0, m["network"]
        # no echo comes back while the guest is paused: the gap across the pause is at least as long
        paused = m["guest_pause_ms"]
        assert paused - IN_FLIGHT_MS <= mtcp["max_gap_ms"] < GAP_BOUND_MS, (mtcp, paused)
        assert mtcp["max_gap_in"] == "pause" or mtcp["max_gap_in"] in {e["phase"] for e in m["timeline"]}, mtcp
        if paused >= LONG_GAP_MS + IN_FLIGHT_MS:  # long enough for the probe's list: found at this pause
            assert paused - IN_FLIGHT_MS <= mtcp["pause_gap_ms"] <= mtcp["max_gap_ms"], (mtcp, paused)
        assert {"received", "lost", "duplicated", "reordered"} <= set(mudp) and mudp["received"] > 0, mudp
        assert mudp["duplicated"] == 0, "nothing delivered twice"
        assert m["flows_moved"] >= 2, "the echo connection's and the UDP stream's conntrack entries"


def test_cli_gives_one_line_errors_not_tracebacks(tmp_path):
    env_state = ["--state-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", "vm", "list", *env_state],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "no local region is running" in done.stderr and "Traceback" not in done.stderr
