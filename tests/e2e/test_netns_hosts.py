"""Namespace hosts (root): a real guest with a blockd volume and a VCN NIC migrates A→B→A over the
dedicated migration network, each migration held by a tc class to its reserved share.

What it proves: the migration stream crosses the source's ``mig0`` (its bytes pass the tc class
and the interface counters), not the service interface that carries storage; the class is set to
the share the LMO admitted and is gone when the migration ends; the guest's memory, disk log and
network (DHCP through the passed NIC socket) are intact on the far side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from livemig.guest.workload import workload_vm_spec
from livemig.host.shaping import MigrationShaper
from livemig.model import MigrationParams, NicDevice, Phase
from livemig.region.hostns import MIGRATION_DEVICE, SERVICE_DEVICE
from livemig.region.local import Region
from livemig.testing.processes import qemu_pids_running
from livemig.wire.lmo import LmoClient
from livemig.wire.vswitch import VswitchClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("nsenter") is None,
        reason="namespace hosts need root, tc and nsenter",
    ),
]
HOST_BUDGET_MIB_S = 64
SHARE_MIB_S = 24
GUEST_MAC = "52:54:00:00:03:10"


@pytest.fixture(scope="module")
def region(tmp_path_factory, guest_image) -> Iterator[Region]:
    """Overrides the loopback region of conftest.py: the same region, namespace hosts."""
    region = Region(tmp_path_factory.mktemp("nsregion"))
    region.up(("A", "B"), accel=os.environ.get("LIVEMIG_ACCEL", "auto"), netns=True,
              migration_bandwidth_mib_s=HOST_BUDGET_MIB_S)  # fmt: skip
    try:
        yield region
    finally:
        region.down()


def counters(netns: str, device: str) -> dict[str, int]:
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", device],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    stats = json.loads(out)[0]["stats64"]
    return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}


def test_migration_crosses_mig0_held_by_its_tc_class(region: Region, lmo: LmoClient):
    config = region.load()
    assert config is not None and all(h.netns for h in config.hosts)
    netns = {h.name: str(h.netns) for h in config.hosts}
    put = lambda kind, body: lmo.put_network_object(kind, body)  # noqa: E731
    put("vcns", {"id": "ns-vcn", "cidr": "10.9.0.0/16", "vni": 300})
    put("subnets", {"id": "ns-a", "vcn": "ns-vcn", "cidr": "10.9.1.0/24", "gateway": "10.9.1.1"})
    put("security-lists", {"id": "ns-open", "rules": [{"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"}]})
    put("vnics", {"id": "ns-guest", "mac": GUEST_MAC, "ip": "10.9.1.10", "subnet": "ns-a",
                  "security_lists": ["ns-open"], "host": ""})  # fmt: skip
    lmo.create_volume("ns-vol", 32)
    spec = workload_vm_spec(memory_mib=256, rate=10, wss_mib=64, name="nsvm", volume="ns-vol", disk_rate=20)
    spec.devices.append(NicDevice(id="nic0", pci_addr="0x3", mac=GUEST_MAC, backend="vswitch", vnic="ns-guest"))
    lmo.create_vm(spec, host="A")
    try:
        lmo.wait_for_console("nsvm", "disk_acked=", timeout=90)
        lmo.wait_for_console("nsvm", "net=10.9.1.10", timeout=60)  # DHCP through the passed NIC socket
        for source, destination in (("A", "B"), ("B", "A")):
            before = {dev: counters(netns[source], dev) for dev in (MIGRATION_DEVICE, SERVICE_DEVICE)}
            m = lmo.wait(lmo.migrate("nsvm", destination, MigrationParams(max_bandwidth_mib_s=SHARE_MIB_S)).id,
                         timeout=240)  # fmt: skip
            after = {dev: counters(netns[source], dev) for dev in (MIGRATION_DEVICE, SERVICE_DEVICE)}
            assert m.phase is Phase.SUCCEEDED, m.reason
            assert m.guest_check == "ok" and m.disk_check == "ok", (m.guest_check, m.disk_check)
            stats = m.stats
            moved = stats.transferred_bytes
            mig_tx = after[MIGRATION_DEVICE]["tx"] - before[MIGRATION_DEVICE]["tx"]
            svc_tx = after[SERVICE_DEVICE]["tx"] - before[SERVICE_DEVICE]["tx"]
            print(f"{source}->{destination}: QEMU sent {moved} B; {stats.bandwidth_enforced_by}; class passed "
                  f"{stats.shaped_bytes} B; {MIGRATION_DEVICE} tx {mig_tx} B, {SERVICE_DEVICE} tx {svc_tx} B; "
                  f"{moved / (stats.total_ms or 1) * 1000 / 2**20:.1f} MiB/s over {stats.total_ms} ms")  # fmt: skip
            assert m.reserved_mib_s == SHARE_MIB_S
            assert stats.bandwidth_enforced_by and f"{SHARE_MIB_S} MiB/s" in stats.bandwidth_enforced_by
            assert f"netns {netns[source]}" in stats.bandwidth_enforced_by
            held = next(c for c in m.conditions if c.type == "BandwidthEnforced")
            assert "tc htb class" in held.reason, held.reason
            assert stats.shaped_bytes is not None and stats.shaped_bytes >= moved, "the stream passed the class"
            assert mig_tx >= moved, "the migration stream left through the migration interface"
            assert svc_tx < moved / 4, "and not through the service interface (storage only)"
            shaper = MigrationShaper(netns[source], MIGRATION_DEVICE, HOST_BUDGET_MIB_S)
            assert list(shaper.classes()) == ["1:1"], "the migration's class is gone when it ends"
            assert lmo.vm("nsvm").host == destination and len(qemu_pids_running("nsvm")) == 1
            vswitch = next(h.vswitch_url for h in config.hosts if h.name == destination)
            seen = VswitchClient(vswitch).counters().vnics["ns-guest"]
            print(f"VNIC on {destination}'s vswitch: {seen}")
            assert seen.get("rx", 0) > 0, "frames from the namespaced QEMU reach the vswitch (its announce)"
    finally:
        lmo.delete_vm("nsvm")
        lmo.delete_volume("ns-vol")


def test_host_agent_refuses_a_missing_namespace(tmp_path):
    from typer.testing import CliRunner

    from livemig.cli.main import app

    result = CliRunner().invoke(app, ["hostd", "--name", "X", "--state-dir", str(tmp_path), "--netns", "lm-none-0"])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_hostd_killed_mid_migration_leaves_no_stale_class(region: Region, lmo: LmoClient):
    """SIGKILL the source hostd while its migration runs under a tc class: the class outlives it,
    the restarted hostd cancels the orphaned migration and sweeps the class, the LMO rolls back,
    and the VM runs on the source with its memory intact."""
    config = region.load()
    assert config is not None
    source_ns = str(next(h.netns for h in config.hosts if h.name == "A"))
    shaper = MigrationShaper(source_ns, MIGRATION_DEVICE, HOST_BUDGET_MIB_S)
    # dirtying twice the share: pre-copy cannot finish while hostd is down (at 10 MiB/s QEMU
    # sometimes completed it before the restart, and the migration rightly succeeded)
    lmo.create_vm(workload_vm_spec(memory_mib=256, rate=2 * SHARE_MIB_S, wss_mib=64, name="nskill"), host="A")
    try:
        lmo.wait_for_console("nskill", "LIVEMIG HB", timeout=90)
        migration = lmo.migrate("nskill", "B", MigrationParams(max_bandwidth_mib_s=SHARE_MIB_S))
        deadline = time.monotonic() + 60
        while len(shaper.classes()) < 2 or lmo.migration(migration.id).phase is not Phase.PRECOPY:
            assert time.monotonic() < deadline, "the migration reaches pre-copy under its class"
            time.sleep(0.1)
        region.kill_host("A")
        assert len(shaper.classes()) == 2, "the class outlives the hostd that made it"
        region.restart_host("A")
        final = lmo.wait(migration.id, timeout=180)
        print(f"after the kill: {final.phase.value}: {final.reason}")
        assert final.phase in (Phase.ABORTED, Phase.FAILED), final.reason
        assert list(shaper.classes()) == ["1:1"], "the restarted hostd swept the orphaned class"
        assert lmo.vm("nskill").host == "A" and len(qemu_pids_running("nskill")) == 1
        assert lmo.guest_check("nskill").ok
    finally:
        lmo.delete_vm("nskill")
