"""The dashboard's pages and live fragments, served by the LMO app over fake hosts (fast; the
browser tests in tests/e2e/test_dashboard.py drive real migrations)."""

from __future__ import annotations

import re
import time

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.control.web import dashboard_router
from livemig.model import HostInfo, Migration, VmSpec
from livemig.security.access import UserRole
from livemig.testing.callers import bearer, lmo_over_tls
from livemig.testing.fakehost import FakeFleet


@pytest.fixture
def fleet():
    return FakeFleet("A", "B", memory_mib=2048, speed=2)  # slow enough for a few pre-copy samples


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'lmo.db'}")


@pytest.fixture
def api(fleet, store):
    app = create_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app), headers=bearer(store, UserRole.OPERATOR)) as client:
        for name, host in fleet.hosts.items():
            registration = host.registration().model_copy(update={"migration_bandwidth_mib_s": 512})
            client.put(f"/hosts/{name}", json=registration.model_dump())
        reply = client.post("/vms", json={"spec": VmSpec(name="vm1", memory_mib=512).model_dump(), "host": "A"})
        assert reply.status_code == 201, reply.text
        yield client


def migrate(api, fleet, destination="B") -> Migration:
    reply = api.post("/migrations", json={"vm": "vm1", "destination": destination})
    assert reply.status_code == 201, reply.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = Migration.model_validate(api.get(f"/migrations/{reply.json()['id']}").json())
        if m.terminal:
            return m
        time.sleep(0.02)
    raise AssertionError("the migration did not end")


def cells(html: str, row_attr: str) -> dict[str, str]:
    """``data-<row_attr>="key" data-value="value"`` pairs of a table."""
    return dict(re.findall(rf'data-{row_attr}="([^"]+)" data-value="([^"]*)"', html))


def test_region_page_lists_hosts_vms_and_budgets(api):
    page = api.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'data-host="A"' in html and 'data-host="B"' in html and 'data-vm="vm1"' in html
    assert "512 MiB/s each way" in html and "simulated QEMU" in html  # budget and the accelerator's reason
    assert 'id="no-active"' in html and 'data-live="/ui/live"' in html
    live = api.get("/ui/live").json()
    assert set(live["html"]) == {"hosts", "active", "vms", "recent"} and live["final"] is False


def test_migration_page_shows_the_records_timeline_and_pause(api, fleet):
    m = migrate(api, fleet)
    assert len(m.samples) >= 3, "the controller keeps the pre-copy history"
    html = api.get(f"/ui/migrations/{m.id}").text
    at = re.findall(r'<tr data-phase="(\w+)" data-at="([^"]+)"', html)
    assert at == [(e.phase.value, e.at.isoformat()) for e in m.timeline]
    shown = cells(html, "key")
    assert set(shown) == {"guest_pause_ms", "pause_ms", "switchover_hook_ms"}
    for key, value in shown.items():  # the record's own numbers, as the hosts reported them (none: empty)
        assert (float(value) if value else None) == getattr(m.stats, key), key
    assert "data-live" not in html, "an ended migration's page does not poll"
    assert f"/ui/migrations/{m.id}/precopy.svg?v=" in html
    region = api.get("/ui").text
    assert f'href="/ui/migrations/{m.id}"' in region and "Succeeded" in region


def test_charts_are_svg_cached_by_their_tag_and_unknown_ones_are_404(api, fleet):
    m = migrate(api, fleet)
    live = api.get(f"/ui/migrations/{m.id}/live").json()
    assert live["final"] is True and live["phase"] == "Succeeded" and live["samples"] == len(m.samples)
    url = live["charts"]["chart-precopy"]
    svg = api.get(url)
    assert svg.headers["content-type"] == "image/svg+xml" and "max-age" in svg.headers["cache-control"]
    assert '<g id="remaining">' in svg.text
    assert api.get(f"/ui/migrations/{m.id}/precopy.svg?v=stale").headers["cache-control"] == "no-store"
    assert api.get(f"/ui/migrations/{m.id}/pie.svg").status_code == 404
    png = api.get(f"/ui/migrations/{m.id}/report.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


def test_unknown_pages_are_html_404s_and_static_files_are_served(api):
    page = api.get("/ui/migrations/m-nope")
    assert page.status_code == 404 and "unknown migration" in page.text and "<html" in page.text
    assert api.get("/ui/evacuations/e-nope").status_code == 404
    assert api.get("/ui/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert api.get("/ui/static/../api.py").status_code == 404


def test_a_queued_migration_says_why_it_waits(api, store):
    store.upsert_host(store.host("B").model_copy(update={"migration_bandwidth_mib_s": 8}))  # below the minimum
    reply = api.post("/migrations", json={"vm": "vm1", "destination": "B"})
    deadline = time.monotonic() + 5
    while "has 8 MiB/s of migration bandwidth free" not in (html := api.get("/ui").text):
        assert time.monotonic() < deadline, html
        time.sleep(0.05)
    assert reply.json()["id"] in api.get("/ui/live").json()["html"]["active"]
    api.post(f"/migrations/{reply.json()['id']}/cancel")


def test_evacuation_page_shows_its_migrations_and_the_concurrency(api, fleet):
    evacuation = api.post("/hosts/A/evacuate", json={}).json()
    deadline = time.monotonic() + 10
    while not api.get(f"/evacuations/{evacuation['id']}").json()["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    html = api.get(f"/ui/evacuations/{evacuation['id']}").text
    assert 'data-vm="vm1"' in html and "Peak concurrency" in html and "outbound: A 1" in html
    chart = re.search(r'id="chart-evacuation"[^>]* src="([^"]+)"', html)
    assert chart is not None and 'id="concurrency"' in api.get(chart.group(1)).text
    assert evacuation["id"] in api.get("/ui").text, "the region page links the evacuation"


def test_the_authentication_seam_guards_every_page(store):
    async def deny() -> None:
        raise HTTPException(status_code=401, detail="bearer token required")

    app = FastAPI()

    async def no_host(name: str) -> HostInfo:
        raise AssertionError(f"the guarded pages must not reach host {name}")

    app.include_router(dashboard_router(store, host_info=no_host, authorize=deny))
    with TestClient(app) as client:
        for path in ("/ui", "/ui/live", "/ui/migrations/m-x", "/ui/static/dashboard.css", "/ui/evacuations/e-x"):
            assert client.get(path).status_code == 401, path
