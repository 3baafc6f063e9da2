"""The demo's report: each migration's network numbers, the flows moved, the dashboard lines, and
why the network probes would be skipped (fast; tests/e2e/test_demo_cli.py runs the real demo)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from livemig.cli import demo_report
from livemig.cli.demo_net import parse_counters, probes_unavailable
from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import Migration, Phase, VmSpec
from livemig.security.access import UserRole
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet

LMO = "https://127.0.0.1:40123"


def migration_with_flows(**flows: int) -> Migration:
    """A migration whose timeline says what the controller's bulk copy imported (SyncingFlows)."""
    m = Migration(id="m-1", vm="demo", source="A", destination="B")
    m.transition(Phase.SYNCING_FLOWS, "destination listening")
    m.transition(Phase.PRECOPY, "dual ingress on", flows=flows, flow_versions={k: 9 for k in flows})
    m.note("round 2: throttle 20 %")
    m.transition(Phase.SUCCEEDED, "done")
    return m


def test_flows_moved_adds_every_vnic_of_the_bulk_copy() -> None:
    assert demo_report.flows_moved(migration_with_flows(**{"demo-nic": 2, "other": 3})) == 5
    assert demo_report.flows_moved(migration_with_flows()) == 0
    no_vnics = Migration(id="m-2", vm="demo", source="A", destination="B")
    no_vnics.transition(Phase.PRECOPY, "no VNICs on the livemig dataplane: no flow state to copy")
    assert demo_report.flows_moved(no_vnics) == 0


def report_of(m: Migration) -> dict:
    """The demo's report of a migration, as far as the network numbers read it."""
    return {"id": m.id, "from": m.source, "to": m.destination, "flows_moved": demo_report.flows_moved(m),
            "stopped_at": m.stats.stopped_at, "guest_pause_ms": m.stats.guest_pause_ms,
            "timeline": [{"at": e.at.isoformat(), "phase": e.phase.value} for e in m.timeline]}  # fmt: skip


def timed_migration(stopped_at: float) -> Migration:
    """PreCopy from t0+1 s, the guest paused 40 ms at ``stopped_at``, Switchover recorded after it."""
    t0 = stopped_at - 3
    m = Migration(id="m-1", vm="demo", source="A", destination="B")
    for offset, phase in ((0, Phase.PENDING), (1, Phase.PRECOPY), (3.05, Phase.SWITCHOVER), (3.5, Phase.SUCCEEDED)):
        m.transition(phase, "", at=datetime.fromtimestamp(t0 + offset, UTC))
    m.stats.stopped_at, m.stats.guest_pause_ms = stopped_at, 40.0
    return m


def test_one_migration_gets_its_echo_segment_and_the_change_of_the_udp_counters() -> None:
    stopped_at = 1_800_000_000.0
    m = report_of(timed_migration(stopped_at))
    echo = {"segments": [
        {"label": "start", "sent": 40, "received": 40, "max_gap_ms": 900.0},  # the connect, not a migration
        {"label": "migration-1", "sent": 700, "received": 700, "max_gap_ms": 212.4,
         "max_gap_end_unix": stopped_at + 0.15},  # began 62 ms before STOP, ended 150 ms after it
        {"label": "after-migration-1", "sent": 300, "received": 300, "max_gap_ms": 15.0},
    ], "long_gaps": [[stopped_at - 5, 900.0], [stopped_at + 0.15, 212.4], [stopped_at + 2, 25.0]]}  # fmt: skip
    before = {"received": 1000, "lost": 1, "duplicated": 0, "reordered": 2, "max_seq": 1001}
    after = {"received": 3000, "lost": 1, "duplicated": 0, "reordered": 2, "max_seq": 3001}
    net = demo_report.migration_network(m, echo, "migration-1", before, after)
    assert net == {"tcp": {"sent": 700, "received": 700, "lost": 0, "max_gap_ms": 212.4, "max_gap_in": "pause",
                           "pause_gap_ms": 212.4},
                   "udp": {"received": 2000, "lost": 0, "duplicated": 0, "reordered": 0}}  # fmt: skip
    assert demo_report.migration_network(m, echo, "migration-2", before, None) == {"tcp": None, "udp": None}


def test_the_gap_at_the_pause_is_the_listed_gap_that_spans_stop_to_resume() -> None:
    stopped_at = 1_800_000_000.0
    m = report_of(timed_migration(stopped_at))  # paused 40 ms
    assert demo_report.pause_gap(m, [[stopped_at - 0.5, 300.0], [stopped_at + 0.06, 55.0]]) == 55.0
    assert demo_report.pause_gap(m, [[stopped_at + 0.045, 30.0]]) == 30.0  # began inside the pause
    assert demo_report.pause_gap(m, [[stopped_at - 0.001, 25.0], [stopped_at + 0.3, 25.0]]) is None
    assert demo_report.pause_gap({**m, "stopped_at": None}, [[stopped_at + 0.06, 55.0]]) is None


def test_a_gap_away_from_the_pause_is_named_by_the_phase_it_began_in() -> None:
    stopped_at = 1_800_000_000.0
    m = report_of(timed_migration(stopped_at))
    assert demo_report.gap_phase(m, stopped_at - 1.0, 400) == "PreCopy"  # a dirty sync holding the vCPU
    assert demo_report.gap_phase(m, stopped_at - 2.5, 300) == "Pending"
    assert demo_report.gap_phase(m, stopped_at - 2.9, 200) == "before Pending"  # the segment starts just before
    assert demo_report.gap_phase(m, stopped_at + 0.039, 10) == "pause"  # inside STOP..RESUME
    assert demo_report.gap_phase(m, stopped_at + 0.3, 100) == "Switchover"  # began after RESUME
    assert demo_report.gap_phase(m, None, None) is None
    unpaused = {**m, "stopped_at": None}
    assert demo_report.gap_phase(unpaused, stopped_at + 0.15, 212) == "PreCopy"


def test_the_echo_line_left_unanswered_counts_as_lost() -> None:
    m = report_of(timed_migration(1_800_000_000.0))
    echo = {"segments": [{"label": "migration-1", "sent": 51, "received": 50, "max_gap_ms": 15000.0}]}
    net = demo_report.migration_network(m, echo, "migration-1", None, None)
    assert net["tcp"]["lost"] == 1 and net["tcp"]["max_gap_in"] is None and net["tcp"]["pause_gap_ms"] is None
    assert not demo_report.network_ok([{"network": net}], None)


def test_network_table_fits_80_columns() -> None:
    measured = {"from": "A", "to": "B", "flows_moved": 2, "network": {
        "tcp": {"sent": 1532, "received": 1532, "lost": 0, "max_gap_ms": 412.4, "max_gap_in": "Switchover",
                "pause_gap_ms": 36.0},
        "udp": {"received": 10980, "lost": 1, "duplicated": 0, "reordered": 0}}}  # fmt: skip
    short_pause = {**measured, "network": {**measured["network"],
                                           "tcp": {**measured["network"]["tcp"], "pause_gap_ms": None}}}  # fmt: skip
    unmeasured = {"from": "B", "to": "A", "flows_moved": 0, "network": {"tcp": None, "udp": None}}
    assert demo_report.network_row(measured) == ["A → B", "412 ms (Switchover)", "36 ms", "0 of 1532", "10980",
                                                 "1/0", "2"]  # fmt: skip
    assert demo_report.network_row(short_pause)[2] == "< 20 ms"  # not among the probe's long gaps
    assert demo_report.network_row(unmeasured) == ["B → A", "-", "-", "-", "-", "-", "0"]
    console = Console(width=80, record=True)
    console.print(demo_report.network_table([measured, unmeasured]))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "412 ms (Switchover)" in text and "0 of 1532" in text and "10980" in text


def test_network_ok_needs_every_migration_measured_with_nothing_lost_and_no_error() -> None:
    good = {"network": {"tcp": {"sent": 9, "received": 9, "lost": 0, "max_gap_ms": 5.0}, "udp": None}}
    unmeasured = {"network": {"tcp": None, "udp": None}}
    assert demo_report.network_ok([good, good], None)
    assert not demo_report.network_ok([good, unmeasured], None)
    assert not demo_report.network_ok([good, good], "TimeoutError: timed out")


def test_dashboard_lines_say_where_to_log_in_and_never_print_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "client.toml"
    token_file.write_text('token = "lmt_secret"\n')
    migrations = [{"id": "m-1a", "from": "A", "to": "B"}, {"id": "m-2b", "from": "B", "to": "A"}]
    lines = demo_report.dashboard_lines(LMO + "/", migrations, token_file=token_file, running=True)
    assert lines == ["dashboard (its first page asks once for the admin token):", f"  login  {LMO}/ui/login",
                     f"  token  in {token_file}",
                     f"  A → B  {LMO}/ui/migrations/m-1a", f"  B → A  {LMO}/ui/migrations/m-2b"]  # fmt: skip
    assert "lmt_secret" not in "\n".join(lines)
    stopped = demo_report.dashboard_lines(LMO, migrations, token_file=None, running=False)
    assert stopped[0] == "dashboard (an --insecure region: no login):"
    assert "--keep" in stopped[-1]


def test_the_printed_urls_are_the_lmo_dashboards_pages(tmp_path: Path) -> None:
    """The migration page and the login form behind the URLs the demo prints (the LMO app over
    fake hosts)."""
    fleet = FakeFleet("A", "B", memory_mib=2048)
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store, UserRole.OPERATOR)) as api:
        for name, host in fleet.hosts.items():
            api.put(f"/hosts/{name}", json=host.registration().model_dump())
        api.post("/vms", json={"spec": VmSpec(name="demo", memory_mib=512).model_dump(), "host": "A"})
        migration_id = api.post("/migrations", json={"vm": "demo", "destination": "B"}).json()["id"]
        deadline = time.monotonic() + 10
        while not Migration.model_validate(api.get(f"/migrations/{migration_id}").json()).terminal:
            assert time.monotonic() < deadline, "the migration did not end"
            time.sleep(0.02)
        page = api.get(urlsplit(demo_report.dashboard_url(LMO, migration_id)).path)
        assert page.status_code == 200 and migration_id in page.text
        login_line = demo_report.dashboard_lines(LMO, [], token_file=tmp_path / "client.toml", running=True)[1]
        login_url = login_line.split()[-1]
        form = api.get(urlsplit(login_url).path, headers={"Authorization": ""})
        assert form.status_code == 200 and 'name="token"' in form.text


@pytest.mark.parametrize(
    ("euid", "tun", "ip_tool", "says"),
    [(1000, True, "/usr/sbin/ip", "not root"), (0, False, "/usr/sbin/ip", "load the tun module"),
     (0, True, None, "install iproute2"), (0, True, "/usr/sbin/ip", None)],
)  # fmt: skip
def test_why_the_probes_are_skipped(
    tmp_path: Path, euid: int, tun: bool, ip_tool: str | None, says: str | None
) -> None:
    device = tmp_path / "tun"
    if tun:
        device.touch()
    reason = probes_unavailable(euid=euid, tun=device, ip_tool=ip_tool)
    if says is None:
        assert reason is None
    else:
        assert reason is not None and says in reason and "\n" not in reason


def test_guest_counters_are_parsed_as_numbers() -> None:
    line = "LIVEMIG UDPSTATS t1 received=2000 lost=1 duplicated=0 reordered=3 max_seq=2001"
    assert parse_counters(line.split()[3:]) == {"received": 2000, "lost": 1, "duplicated": 0, "reordered": 3,
                                                "max_seq": 2001}  # fmt: skip
    assert parse_counters(["state=ok", "n=-1", "junk"]) == {"n": -1}
