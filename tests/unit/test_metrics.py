"""The metric logic, against the fake fleet: the LMO counts each ended migration once (with its
result, its pause, its bytes), also with several replicas; the bandwidth gauges follow the
migrations a replica drives; hostd counts guest resets and the migrations it sent; the vswitch
reports drops by reason and conntrack entries. The real services are scraped in tests/e2e/test_metrics.py."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from livemig.control.api import create_app
from livemig.control.controller import Controller
from livemig.control.metrics import RESULTS, migration_ended
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.host.metrics import host_registry
from livemig.model import Migration, Phase, VmSpec
from livemig.network.api import VswitchCollector
from livemig.network.model import derived_gateway_mac
from livemig.network.packets import TCP_SYN
from livemig.network.vswitch import Vswitch
from livemig.testing.callers import LMO, bearer, lmo_over_tls, over_tls
from livemig.testing.fakehost import FakeFleet
from livemig.testing.fakevm import SAMPLE, sample_mapping, sample_security_lists, tcp_frame, udp_frame
from livemig.wire.base import async_http
from livemig.wire.vswitch import Attachment

#: the series about ended migrations this file follows: (name, labels)
SERIES = {
    "pause": ("livemig_migration_pause_seconds_count", {}),
    "pause_sum": ("livemig_migration_pause_seconds_sum", {}),
    "guest_pause": ("livemig_migration_guest_pause_seconds_count", {}),
    "transfer": ("livemig_migration_transfer_seconds_count", {}),
    "rounds": ("livemig_migration_precopy_rounds_count", {}),
    "sent": ("livemig_migration_sent_bytes_total", {}),
    **{result: ("livemig_migrations_total", {"result": result}) for result in RESULTS},
    **{f"duration_{result}": ("livemig_migration_duration_seconds_count", {"result": result}) for result in RESULTS},
}


def snapshot() -> dict[str, float]:
    return {key: REGISTRY.get_sample_value(name, labels) or 0.0 for key, (name, labels) in SERIES.items()}


def grown(before: dict[str, float]) -> dict[str, float]:
    """What grew since ``before`` (nothing else: a series that stayed is left out)."""
    now = snapshot()
    return {key: round(now[key] - before[key], 6) for key in now if now[key] != before[key]}


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    fleet = FakeFleet("A", "B", memory_mib=4096)
    yield fleet
    fleet.close()


@pytest.fixture
def api(fleet: FakeFleet, tmp_path: Path) -> Iterator[TestClient]:
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store)) as client:
        for name, host in fleet.hosts.items():
            assert client.put(f"/hosts/{name}", json=host.registration().model_dump()).status_code == 200
        yield client


def migrate(api: TestClient, vm: str, destination: str = "B", wait: bool = True) -> Migration:
    reply = api.post("/migrations", json={"vm": vm, "destination": destination})
    assert reply.status_code == 201, reply.text
    m = Migration.model_validate(reply.json())
    return wait_terminal(api, m.id) if wait else m


def wait_terminal(api: TestClient, migration_id: str, timeout: float = 15.0) -> Migration:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{migration_id}").json())
        if m.terminal:
            time.sleep(0.1)  # a few more passes: an ended migration must not be counted again
            return m
        time.sleep(0.02)
    raise AssertionError(f"migration {migration_id} did not end")


def create_vm(api: TestClient, name: str, host: str = "A") -> None:
    reply = api.post("/vms", json={"spec": VmSpec(name=name, memory_mib=256).model_dump(), "host": host})
    assert reply.status_code == 201, reply.text


def test_each_ended_migration_is_counted_once_with_its_result_pause_and_bytes(api: TestClient, fleet: FakeFleet):
    create_vm(api, "vm1")
    before = snapshot()
    m = migrate(api, "vm1")
    assert m.phase is Phase.SUCCEEDED and m.stats.pause_ms and m.stats.guest_pause_ms and m.stats.total_ms
    assert grown(before) == {
        "succeeded": 1, "duration_succeeded": 1, "pause": 1, "guest_pause": 1, "transfer": 1, "rounds": 1,
        "pause_sum": round(m.stats.pause_ms / 1000, 6), "sent": m.stats.transferred_bytes,
    }  # fmt: skip

    before = snapshot()
    fleet.hosts["B"].behaviour.fail_migration = "Unable to write to socket: Broken pipe"  # B is the source now
    failed = migrate(api, "vm1", "A")
    assert failed.phase is Phase.FAILED
    expected = {"failed": 1, "duration_failed": 1}  # no pause to observe: the guest never stopped
    if failed.stats.rounds:  # the rounds QEMU ran, and what it sent, before the stream broke
        expected["rounds"] = 1
    if failed.stats.transferred_bytes:
        expected["sent"] = failed.stats.transferred_bytes
    assert grown(before) == expected

    text = api.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["livemig_migrations"].type == "counter"
    assert families["livemig_migration_pause_seconds"].type == "histogram"
    assert {s.labels["result"] for s in families["livemig_migrations"].samples if s.name.endswith("_total")} == {
        "succeeded", "failed", "aborted", "cancelled",
    }  # fmt: skip
    assert "livemig_controller_pass_seconds_count" in text, "the controller's series stay"


def test_bandwidth_gauges_follow_the_migrations_the_replica_drives(api: TestClient, fleet: FakeFleet):
    create_vm(api, "vm1")
    fleet.hosts["A"].behaviour.hold_precopy = True  # pre-copy never ends by itself
    m = migrate(api, "vm1", wait=False)
    mib = 1024 * 1024
    deadline = time.monotonic() + 10
    while True:
        text = api.get("/metrics").text
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
        used = values.get(("livemig_migration_bandwidth_used_bytes_per_second", (("direction", "out"), ("host", "A"))))
        if used:
            break
        assert time.monotonic() < deadline, "no throughput reported during pre-copy"
        time.sleep(0.05)
    reserved = Migration.model_validate(api.get(f"/migrations/{m.id}").json()).reserved_mib_s
    assert reserved
    assert values[("livemig_migration_bandwidth_reserved_bytes_per_second", (("direction", "out"), ("host", "A")))] \
        == reserved * mib  # fmt: skip
    assert values[("livemig_migration_bandwidth_reserved_bytes_per_second", (("direction", "in"), ("host", "B")))] \
        == reserved * mib  # fmt: skip
    assert 0 < used <= reserved * mib * 1.05, "QEMU is held to its share"
    assert values[("livemig_host_migration_bandwidth_budget_bytes_per_second", (("host", "A"),))] == 1024 * mib

    before = snapshot()
    assert api.post(f"/migrations/{m.id}/cancel").status_code in (200, 202)
    assert wait_terminal(api, m.id).phase is Phase.CANCELLED
    assert grown(before) == {"cancelled": 1, "duration_cancelled": 1}
    text = api.get("/metrics").text
    assert "livemig_migration_bandwidth_reserved_bytes_per_second{" not in text, "nothing held, nothing reserved"


def test_replicas_count_the_migrations_they_end_once_between_them(fleet: FakeFleet, tmp_path: Path) -> None:
    """Three replicas on one store share six migrations; each is counted by the one that ended it."""
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    for host in fleet.hosts.values():
        store.upsert_host(host.registration())
    names = [f"vm{i}" for i in range(6)]

    async def scenario() -> list[Controller]:
        async with async_http(transport=fleet.transport()) as http:
            for name in names:
                vm = await fleet.hosts["A"].agent.create(VmSpec(name=name, memory_mib=256))
                store.add_vm(vm.spec, "A")  # as hostd resolved it (boot files pinned), as the LMO keeps it
                m = Migration(id=f"m-{name}", vm=name, source="A", destination="B")
                m.transition(Phase.PENDING, "requested")
                store.add_migration(m)
            replicas = [Controller(Services.build(store, http), replica=f"lmo-{r}") for r in range(3)]
            deadline = time.monotonic() + 30
            while not all(store.migration(f"m-{name}").terminal for name in names):
                assert time.monotonic() < deadline, "the migrations did not end"
                for replica in replicas:
                    await replica.pass_once()
                await asyncio.sleep(0.01)
            for _ in range(5):  # more passes: nothing is counted twice
                for replica in replicas:
                    await replica.pass_once()
            return replicas

    before = snapshot()
    replicas = asyncio.run(scenario())
    assert {store.migration(f"m-{name}").phase for name in names} == {Phase.SUCCEEDED}
    assert sorted(r.finished for r in replicas) == [2, 2, 2], "each replica ended its fair part"
    assert grown(before)["succeeded"] == 6 and grown(before)["pause"] == 6


def test_a_replica_that_lost_the_lease_counts_nothing() -> None:
    ended = Migration(id="m-1", vm="web", source="A", destination="B")
    ended.transition(Phase.SUCCEEDED, "VM runs on B")
    ended.stats.pause_ms = 12
    controller = Controller.__new__(Controller)  # only _saved's bookkeeping is exercised
    controller._held, controller._vms, controller._flows_synced_at, controller._saved_at = {}, {}, {}, {}
    controller.finished = 0
    before = snapshot()
    assert controller._saved(ended, None) is False, "the store refused the save: another replica holds it"
    assert grown(before) == {}
    controller.store = None  # type: ignore[assignment]  # no last sample: the dirty rate is not recorded
    assert controller._saved(ended, 7) is True
    assert grown(before) == {"succeeded": 1, "duration_succeeded": 1, "pause": 1, "pause_sum": 0.012}


def test_a_migration_that_has_not_ended_is_refused() -> None:
    with pytest.raises(ValueError, match="has not ended"):
        migration_ended(Migration(id="m-2", vm="web", source="A", destination="B"))


def test_hostd_counts_guest_resets_and_the_migrations_it_sent(api: TestClient, fleet: FakeFleet):
    api.post("/vms", json={"spec": VmSpec(name="plain", memory_mib=256, workload=None).model_dump(), "host": "A"})
    fleet.hosts["B"].behaviour.crash_after_resume = True
    m = migrate(api, "plain")
    assert m.phase is Phase.FAILED and "RESET" in m.reason
    source = generate_latest(host_registry(fleet.hosts["A"].agent)).decode()
    destination = generate_latest(host_registry(fleet.hosts["B"].agent)).decode()
    assert 'livemig_host_source_migrations_total{host="A",outcome="completed"} 1.0' in source
    assert 'livemig_host_guest_resets_total{event="RESET",host="B"} 1.0' in destination
    assert 'livemig_host_guest_resets_total{event="RESET",host="A"} 0.0' in source
    assert 'livemig_host_source_migrations_total{host="B",outcome="completed"} 0.0' in destination
    assert 'livemig_host_qemu_processes{host="B"} 1.0' in destination, "the reset guest's QEMU still runs"
    assert 'livemig_host_qemu_processes{host="A"} 0.0' in source and 'livemig_host_vms{host="A"} 0.0' in source


class _Port:
    kind = "fake"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def send(self, frame: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_vswitch_reports_frames_drops_by_reason_and_conntrack_entries() -> None:
    hosts = {"A": "10.99.0.1:4789", "B": "10.99.0.2:4789"}
    vs = Vswitch("A", hosts["A"])
    vs.set_mapping(sample_mapping(hosts))
    for security_list in sample_security_lists():
        vs.set_security_list(security_list)
    for vnic in ("web", "db"):
        vs.plug(_Port(), Attachment(vnic_id=vnic, kind="udp", switch_port=1, qemu_port=2))
    (web_mac, web_ip), (db_mac, db_ip) = SAMPLE["web"][:2], SAMPLE["db"][:2]
    vs.vm_frame("web", tcp_frame(web_mac, db_mac, web_ip, db_ip, 40000, 5432, TCP_SYN))  # a tracked flow
    vs.vm_frame("web", udp_frame(db_mac, web_mac, web_ip, db_ip, 1, 9000))  # spoofed source MAC
    vs.vm_frame("web", udp_frame(web_mac, derived_gateway_mac("blue-a"), web_ip, "10.0.3.3", 1, 9000))  # no route
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VswitchCollector(vs))
    text = generate_latest(registry).decode()
    assert 'livemig_vswitch_frames_total{event="rx_vm",host="A"} 3.0' in text
    assert 'livemig_vswitch_dropped_frames_total{host="A",reason="spoofed_mac"} 1.0' in text
    assert 'livemig_vswitch_dropped_frames_total{host="A",reason="no_route"} 1.0' in text
    assert 'event="dropped"' not in text and 'event="dropped_' not in text, "drops are their own series"
    assert 'livemig_vswitch_conntrack_entries{host="A",vnic="web"} 1.0' in text
    assert 'livemig_vswitch_flow_cache_entries{cache="vm",host="A"}' in text
    assert 'livemig_vswitch_flow_cache_events_total{cache="vm",event="misses",host="A"}' in text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["livemig_vswitch_conntrack_entries"] == "gauge"
    assert families["livemig_vswitch_dropped_frames"] == "counter"


def _names(text: str) -> set[str]:
    """Every series name ``text`` exposes (a family with no samples yet by its type's suffixes)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_the_grafana_dashboard_uses_only_series_the_services_export(api: TestClient, fleet: FakeFleet,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    from livemig.storage.api import create_app as blockd_app
    from livemig.storage.blockd import Blockd

    dashboard = json.loads((Path(__file__).parents[2] / "docs" / "grafana-livemig.json").read_text())
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    used = {name for t in targets for name in re.findall(r"\blivemig_[a-z_]+", t["expr"])}

    fleet.hosts["A"].behaviour.hold_precopy = True  # the bandwidth series exist while a migration is held
    create_vm(api, "vm1")
    m = migrate(api, "vm1", wait=False)
    deadline = time.monotonic() + 10
    while "livemig_migration_bandwidth_used_bytes_per_second{" not in (lmo_text := api.get("/metrics").text):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.post(f"/migrations/{m.id}/cancel")
    with TestClient(over_tls(blockd_app(Blockd(tmp_path / "blockd")), LMO)) as blockd:
        blockd_text = blockd.get("/metrics").text
    hosts = {"A": "10.99.0.1:4789"}
    vswitch = Vswitch("A", hosts["A"])
    vswitch.set_mapping(sample_mapping({**hosts, "B": "10.99.0.2:4789"}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VswitchCollector(vswitch))
    exported = set().union(*(_names(text) for text in (
        lmo_text, blockd_text, generate_latest(host_registry(fleet.hosts["A"].agent)).decode(),
        generate_latest(registry).decode(),
    )))  # fmt: skip
    assert used - exported == set(), "the dashboard names series nobody exports"
    assert {"livemig_migrations_total", "livemig_migration_pause_seconds_bucket",
            "livemig_migration_bandwidth_reserved_bytes_per_second", "livemig_blockd_fenced_writes_total",
            "livemig_blockd_nbd_request_duration_seconds_bucket", "livemig_vswitch_frames_total",
            "livemig_vswitch_dropped_frames_total", "livemig_vswitch_conntrack_entries"} <= used  # fmt: skip
