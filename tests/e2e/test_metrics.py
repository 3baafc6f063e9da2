"""Every service's /metrics during a real migration: the named series exist on each, and they move.

One guest with a blockd volume (its workload appends a log over NBD) and a VNIC on the VCN moves
A -> B while the test scrapes the LMO, blockd, both hostd and both vswitches over their TLS
listeners, with the credentials a process that loaded the region has (the LMO's certificate for
the services, the admin token for the LMO). The LMO counts the migration once (result, pause,
guest pause, bytes, rounds) and shows its bandwidth while it runs; the source hostd counts the
migration it sent; blockd's NBD latency counts the guest's writes; the destination vswitch counts
the frames the guest sends once it runs there. And the source hostd's log names the migration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from livemig.guest.workload import workload_vm_spec
from livemig.model import NicDevice, Phase
from livemig.region.local import Region
from livemig.wire.base import sync_http
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
VM, VOLUME, VNIC = "metricvm", "vol-metrics", "metrics-nic"
VNIC_MAC, VNIC_IP, NOBODY = "52:54:00:00:01:30", "10.0.1.30", "10.0.1.99"

#: the series each service must export (family names as the text format declares them)
NAMED = {
    "lmo": ["livemig_migrations", "livemig_migration_pause_seconds", "livemig_migration_guest_pause_seconds",
            "livemig_migration_transfer_seconds", "livemig_migration_duration_seconds",
            "livemig_migration_sent_bytes", "livemig_migration_precopy_rounds",
            "livemig_controller_pass_seconds", "livemig_controller_migrations_held"],
    "hostd": ["livemig_host_vms", "livemig_host_qemu_processes", "livemig_host_guest_resets",
              "livemig_host_source_migrations"],
    "blockd": ["livemig_blockd_fenced_writes", "livemig_blockd_rejected_writes",
               "livemig_blockd_nbd_request_duration_seconds", "livemig_blockd_requests"],
    "vswitch": ["livemig_vswitch_frames", "livemig_vswitch_dropped_frames", "livemig_vswitch_conntrack_entries",
                "livemig_vswitch_flow_cache_entries"],
}  # fmt: skip


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample at ``url``/metrics, and each family's type."""
    with sync_http(timeout=10, base_url=url) as http:
        reply = http.get("/metrics")
    assert reply.status_code == 200, (url, reply.status_code, reply.text[:200])
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(reply.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def guest(lmo: LmoClient) -> Iterator[LmoClient]:
    put = lmo.put_network_object
    put("vcns", {"id": "mblue", "cidr": "10.0.0.0/16", "vni": 300})
    put("subnets", {"id": "mblue-a", "vcn": "mblue", "cidr": "10.0.1.0/24", "gateway": "10.0.1.1"})
    put("security-lists", {"id": "mopen", "rules": [
        {"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"},
        {"direction": "egress", "protocol": "all", "cidr": "0.0.0.0/0"},
    ]})  # fmt: skip
    put("vnics", {"id": VNIC, "mac": VNIC_MAC, "ip": VNIC_IP, "subnet": "mblue-a", "security_lists": ["mopen"],
                  "host": ""})  # fmt: skip
    lmo.create_volume(VOLUME, 64)
    spec = workload_vm_spec(memory_mib=256, rate=5, wss_mib=32, name=VM, volume=VOLUME, disk_rate=20)
    spec.devices.append(NicDevice(id="nic0", pci_addr="0x3", mac=VNIC_MAC, backend="vswitch", vnic=VNIC))
    lmo.create_vm(spec, host="A")
    try:
        lmo.wait_for_console(VM, "disk_acked=", timeout=120)
        yield lmo
    finally:
        lmo.delete_vm(VM)
        lmo.delete_volume(VOLUME)


class Watcher(threading.Thread):
    """Scrapes the LMO every 50 ms while the migration runs: its bandwidth gauges exist only then."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.reserved_out: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                samples, _ = scrape(self.url)
            except Exception as exc:  # reported by the test, never lost in the thread
                self.errors.append(repr(exc))
                return
            reserved = value(samples, "livemig_migration_bandwidth_reserved_bytes_per_second", host="A",
                             direction="out")  # fmt: skip
            if reserved:
                self.reserved_out.append(reserved)
            self.stop.wait(0.05)


def test_every_service_exports_its_series_and_they_move_during_a_migration(region: Region, guest: LmoClient):
    config = region.load()
    assert config is not None
    urls = {"lmo": config.lmo_url, "blockd": config.blockd_url}
    for host in config.hosts:
        urls[f"hostd-{host.name}"] = host.url
        urls[f"vswitch-{host.name}"] = host.vswitch_url
    before: dict[str, Samples] = {}
    for service, url in urls.items():
        before[service], types = scrape(url)
        missing = [name for name in NAMED[service.split("-")[0]] if name not in types]
        assert not missing, f"{service} does not export {missing}"
        assert all(not name.endswith("_total") for name in types), "a counter family is named without _total"

    watcher = Watcher(config.lmo_url)
    watcher.start()
    try:
        m = guest.wait(guest.migrate(VM, "B").id, timeout=240)
    finally:
        watcher.stop.set()
        watcher.join(10)
    assert m.phase is Phase.SUCCEEDED, m.reason
    assert not watcher.errors, watcher.errors
    reserved = (m.reserved_mib_s or 0) * 1024 * 1024
    assert reserved and reserved in watcher.reserved_out, (reserved, watcher.reserved_out[:5])

    # the guest, now on B, tries to reach an address nobody holds: its ARP requests cross B's vswitch
    guest.console_input(VM, f"tcpclient {NOBODY} 7 100")
    deadline = time.monotonic() + 30
    while True:
        after = {service: scrape(url)[0] for service, url in urls.items()}
        rx = {h: value(after[f"vswitch-{h}"], "livemig_vswitch_frames_total", host=h, event="rx_vm") for h in "AB"}
        if rx["B"] > value(before["vswitch-B"], "livemig_vswitch_frames_total", host="B", event="rx_vm"):
            break
        assert time.monotonic() < deadline, f"B's vswitch saw no frame from the guest: {rx}"
        time.sleep(0.5)

    def grew(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    # the LMO: this one migration, once, with QEMU's and the guest's pause and QEMU's bytes
    assert grew("lmo", "livemig_migrations_total", result="succeeded") == 1
    assert grew("lmo", "livemig_migrations_total", result="failed") == 0
    assert grew("lmo", "livemig_migration_pause_seconds_count") == 1
    assert grew("lmo", "livemig_migration_pause_seconds_sum") == pytest.approx((m.stats.pause_ms or 0) / 1000)
    assert grew("lmo", "livemig_migration_guest_pause_seconds_count") == 1
    assert grew("lmo", "livemig_migration_precopy_rounds_count") == 1
    assert grew("lmo", "livemig_migration_duration_seconds_count", result="succeeded") == 1
    assert grew("lmo", "livemig_migration_sent_bytes_total") == m.stats.transferred_bytes > 0
    # hostd: A sent it (and runs no QEMU of it any more), B runs it
    assert grew("hostd-A", "livemig_host_source_migrations_total", host="A", outcome="completed") == 1
    assert grew("hostd-B", "livemig_host_source_migrations_total", host="B", outcome="completed") == 0
    assert grew("hostd-A", "livemig_host_qemu_processes", host="A") == -1
    assert grew("hostd-B", "livemig_host_qemu_processes", host="B") == 1
    assert value(after["hostd-B"], "livemig_host_guest_resets_total", host="B", event="RESET") == 0
    # blockd: the guest's log writes are NBD requests with a latency; a clean migration fences no write
    assert grew("blockd", "livemig_blockd_nbd_request_duration_seconds_count", op="write") > 0
    assert grew("blockd", "livemig_blockd_nbd_request_duration_seconds_sum", op="write") > 0
    assert grew("blockd", "livemig_blockd_fenced_writes_total") == 0
    # the vswitches: B forwards the guest's frames now; its flows are tracked per VNIC there
    assert ("livemig_vswitch_conntrack_entries", (("host", "B"), ("vnic", VNIC))) in after["vswitch-B"]
    assert grew("vswitch-B", "livemig_vswitch_dropped_frames_total", host="B", reason="arp_unanswered") > 0

    log = (region.state_dir / "logs" / "hostd-A.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if f"migration={m.id} vm={VM}" in line]
    assert any(f"VM {VM}: migrating to" in line for line in lines), log[-2000:]
    assert any(f"migration of {VM} to" in line and "ended completed" in line for line in lines), log[-2000:]
