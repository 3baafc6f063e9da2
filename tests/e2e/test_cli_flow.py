"""The README's user flow through the real `livemig` command: up, vm create, migrate (progress
bar), migrations list/show, status, console, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livemig.testing.processes import qemu_pids_running

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def livemig(state: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}  # a plain terminal: ids and phases must still be whole
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    if ok:
        assert done.returncode == 0, f"livemig {' '.join(args)}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done


def test_readme_flow(tmp_path, guest_image):
    livemig(tmp_path, "up")
    try:
        livemig(tmp_path, "vm", "create", "web", "--memory", "256", "--wss", "64", "--rate", "10", "--host", "A")
        for _ in range(300):
            if "LIVEMIG HB" in livemig(tmp_path, "vm", "console", "web").stdout:
                break
        else:
            pytest.fail("no heartbeat on the console")
        dry = livemig(tmp_path, "migrate", "web", "--to", "B", "--dry-run")
        assert "destination capacity" in dry.stdout and "FAIL" not in dry.stdout
        moved = livemig(tmp_path, "migrate", "web", "--to", "B")
        assert "Succeeded" in moved.stdout and "guest check ok" in moved.stdout
        same = livemig(tmp_path, "migrate", "web", "--to", "B", ok=False)
        assert same.returncode == 1 and "already on host B" in same.stderr and "Traceback" not in same.stderr
        listing = livemig(tmp_path, "migrations", "list").stdout
        assert "Succeeded" in listing
        migration_id = next(word for word in listing.split() if word.startswith("m-"))
        assert len(migration_id) == len("m-") + 10, f"the id is never cut at 80 columns: {listing}"
        listed = json.loads(livemig(tmp_path, "migrations", "list", "--json").stdout)
        assert [m["id"] for m in listed] == [migration_id]
        shown = json.loads(livemig(tmp_path, "migrations", "show", migration_id, "--json").stdout)
        assert shown["phase"] == "Succeeded" and shown["stats"]["pause_ms"] is not None
        net = tmp_path / "net.json"
        net.write_text(json.dumps({
            "vcns": [{"id": "blue", "cidr": "10.0.0.0/16", "vni": 100}],
            "subnets": [{"id": "blue-a", "vcn": "blue", "cidr": "10.0.1.0/24", "gateway": "10.0.1.1"}],
            "security-lists": [{"id": "web", "rules": [{"direction": "ingress", "protocol": "tcp",
                                                        "dst_ports": {"min": 80, "max": 80}}]}],
            "vnics": [{"id": "web-1", "mac": "52:54:00:00:02:01", "ip": "10.0.1.20", "subnet": "blue-a",
                       "security_lists": ["web"], "host": ""}],
        }))  # fmt: skip
        assert "vnic web-1 applied" in livemig(tmp_path, "net", "apply", str(net)).stdout
        assert "10.0.1.20" in livemig(tmp_path, "net", "list", "vnics").stdout
        net.write_text(json.dumps({"subnets": [{"id": "bad", "vcn": "blue", "cidr": "10.0.2.0/24",
                                                "gateway": "10.9.9.9"}]}))  # fmt: skip
        bad = livemig(tmp_path, "net", "apply", str(net), ok=False)
        assert bad.returncode == 1 and "outside" in bad.stderr and "Traceback" not in bad.stderr
        in_use = livemig(tmp_path, "net", "delete", "subnets", "blue-a", ok=False)
        assert in_use.returncode == 1 and "used by web-1" in in_use.stderr
        livemig(tmp_path, "net", "delete", "vnics", "web-1")
        status = livemig(tmp_path, "status").stdout
        assert "tcg" in status or "kvm" in status
        assert "web" in livemig(tmp_path, "vm", "list").stdout
    finally:
        livemig(tmp_path, "down")
    assert qemu_pids_running("web") == [], "`livemig down` stops the region's VMs"
