"""`livemig demo --json` end to end, as `make demo` runs it (its own region, real QEMU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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


def test_cli_gives_one_line_errors_not_tracebacks(tmp_path):
    env_state = ["--state-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", "vm", "list", *env_state],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "no local region is running" in done.stderr and "Traceback" not in done.stderr
