"""The LMO's dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium), against a real region and real guests.

Screenshots go to ``$LIVEMIG_ARTIFACTS/dashboard`` (or the test's tmp dir) for a person to look at.

The region is secure as ``livemig up`` makes it: the browser logs in once with a viewer token (the
form sets an HttpOnly cookie), and accepts the LMO's certificate without the region CA in its store
(an operator would add the CA; the CA's trust is proven by the TLS tests, not here).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from livemig.errors import LivemigError
from livemig.guest.workload import workload_vm_spec
from livemig.model import MigrationParams, Phase
from livemig.model.migration import FORWARD_PHASES
from livemig.region.local import Region
from livemig.testing.waiting import wait_until
from livemig.wire.lmo import LmoClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1360,900")  # fmt: skip
RESERVED = MigrationParams(max_bandwidth_mib_s=32)  # slow enough that pre-copy lasts seconds under TCG


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"install Debian's chromium and chromium-driver (missing {missing})"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.page_load_strategy = "eager"  # the DOM is enough: charts load as they come, as for a person
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("acceptInsecureCerts", True)  # the region CA is not in chromium's store
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def dashboard(browser: Any, region: Region, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The browser, logged in to the LMO's dashboard with a viewer token through the login form."""
    config = region.load()
    assert config is not None
    token = json.loads(livemig(region, "token", "create", "browser", "--role", "viewer", "--json").stdout)["token"]
    browser.get(f"{config.lmo_url}/ui")
    assert "/ui/login" in browser.current_url, "without a login, the dashboard sends the browser to the form"
    browser.find_element("id", "token").send_keys("lmt_wrong")
    browser.find_element("id", "login").click()
    wait_until(lambda: browser.find_elements("id", "login-error"), "the form says the token was refused")
    assert "unknown or was revoked" in browser.find_element("id", "login-error").text
    browser.find_element("id", "token").send_keys(token)
    browser.find_element("id", "login").click()
    wait_until(lambda: browser.current_url.rstrip("/").endswith("/ui") and browser.find_elements("id", "hosts"),
               "the form leads to the region page")  # fmt: skip
    cookie = browser.get_cookie("livemig_token")
    assert cookie is not None and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert js(browser, "return document.cookie") == "", "the dashboard's scripts cannot read the token"
    return browser


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    base = os.environ.get("LIVEMIG_ARTIFACTS")
    where = (Path(base) if base else tmp_path) / "dashboard"
    where.mkdir(parents=True, exist_ok=True)
    return where


def screenshot(driver: Any, path: Path) -> None:
    """The whole page, not only the window."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1360, min(max(height, 600), 6000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1360, 900)


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def chart_points(driver: Any, img_id: str, http: httpx.Client) -> int | None:
    """How many points the pre-copy line has in the picture the page shows now (None: the first
    picture has not loaded yet)."""
    src, loaded = js(driver, f"const i = document.getElementById('{img_id}'); return [i.currentSrc, i.naturalWidth];")
    if not loaded:
        return None
    svg = http.get(src, timeout=30).text
    path = re.search(r'<g id="remaining">\s*<path d="([^"]+)"', svg)
    return len(re.findall(r"[ML] ", path.group(1))) if path else 0


def livemig(region: Region, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as the local user runs it (the region's client.toml: URL, CA, admin token)."""
    env = {**os.environ, "LIVEMIG_CONFIG": str(region.client_file)}
    return subprocess.run([sys.executable, "-m", "livemig.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def boot(lmo: LmoClient, name: str, rate: int, wss: int) -> None:
    lmo.create_vm(workload_vm_spec(memory_mib=256, rate=rate, wss_mib=wss, name=name), host="A")
    lmo.wait_for_console(name, "LIVEMIG HB", timeout=90)


def remove(lmo: LmoClient, name: str) -> None:
    """Delete the VM once no migration of it runs (a failed assertion may leave one running)."""
    for m in lmo.migrations():
        if m.vm == name and not m.terminal:
            with contextlib.suppress(LivemigError):
                lmo.cancel(m.id)
            lmo.wait(m.id, timeout=300)
    lmo.delete_vm(name)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_region_page_and_a_live_migration_page_match_the_record(
    lmo: LmoClient, region: Region, dashboard: Any, shots: Path
):
    browser = dashboard
    boot(lmo, "dash", rate=10, wss=96)
    try:
        browser.get(f"{lmo.url}/ui")
        assert js(browser, "return [...document.querySelectorAll('#hosts-table tr[data-host]')]"
                           ".map(r => r.dataset.host)") == ["A", "B"]  # fmt: skip
        assert js(browser, "return document.querySelector('#vms-table tr[data-vm=dash] td[data-host]')"
                           ".dataset.host") == "A"  # fmt: skip
        assert "in service" in browser.find_element("id", "hosts").text
        screenshot(browser, shots / "region.png")

        migration = lmo.migrate("dash", "B", RESERVED)
        browser.get(f"{lmo.url}/ui/migrations/{migration.id}")
        phases: list[str] = []
        growth: list[tuple[int, int]] = []  # (samples on the page, points in the chart shown), during pre-copy
        shot_taken = False
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, f"still {phases[-1:]} after 240 s"
            phase = js(browser, "return document.getElementById('phase').dataset.phase")
            if not phases or phases[-1] != phase:
                phases.append(phase)
            if phase == Phase.PRECOPY.value:
                # read in one script: the page swaps its fragments in place, so an element found
                # first and read after may already be gone (a stale reference)
                text = js(browser, "const e = document.getElementById('samples'); return e ? e.textContent : null")
                if text is None or not text.strip().isdigit():
                    time.sleep(0.2)
                    continue
                samples = int(text)
                points = chart_points(browser, "chart-precopy", lmo.http)
                if points is not None:
                    growth.append((samples, points))
                if not shot_taken and samples >= 15 and (points or 0) >= 10:
                    screenshot(browser, shots / "migration-precopy.png")
                    shot_taken = True
            if phase in {p.value for p in (Phase.SUCCEEDED, Phase.FAILED, Phase.ABORTED, Phase.CANCELLED)}:
                break
            time.sleep(0.4)
        assert phases[-1] == "Succeeded", phases
        order = [p.value for p in FORWARD_PHASES]
        assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases
        assert phases[0] in order[: order.index("PreCopy") + 1] and len(phases) >= 2, (
            f"the open page showed the phases advance from pre-copy or before: {phases}"
        )
        print(f"phases seen {phases}; samples and chart points during pre-copy {growth}")
        assert len({s for s, _ in growth}) >= 3, f"the sample count grew on the page during pre-copy: {growth}"
        assert len({n for _, n in growth}) >= 3 and max(n for _, n in growth) > min(n for _, n in growth), (
            f"the pre-copy chart the page showed grew: {growth}"
        )

        # after it: the live-updated page shows the numbers of `livemig migrations show ID --json`
        shown = livemig(region, "migrations", "show", migration.id, "--json")
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        rows = js(browser, "return [...document.querySelectorAll('#timeline-table tr[data-phase]')]"
                           ".map(r => [r.dataset.phase, r.dataset.at, r.cells[0].textContent.trim()])")  # fmt: skip
        assert [(p, at(a)) for p, a, _ in rows] == [(e["phase"], at(e["at"])) for e in record["timeline"]]
        assert [clock for _, _, clock in rows] == [at(e["at"]).strftime("%H:%M:%S.%f")[:-3] for e in record["timeline"]]
        pause = js(
            browser,
            "return Object.fromEntries([...document.querySelectorAll('#pause-table tr[data-key]')]"
            ".map(r => [r.dataset.key, [r.dataset.value, r.cells[1].textContent.trim()]]))",
        )
        # a VM without VNICs has no switchover hook: QEMU does not stop for one (host/source.py)
        assert record["stats"]["switchover_hook_ms"] is None and pause["switchover_hook_ms"][0] == ""
        for key in ("pause_ms", "guest_pause_ms"):
            value = record["stats"][key]
            assert value is not None, f"QEMU and the hosts reported {key}"
            assert float(pause[key][0]) == value, (key, pause[key], value)
            assert pause[key][1].replace(",", "").startswith(f"{value:.2f}".rstrip("0").rstrip(".")), pause[key]
        assert browser.find_element("id", "live-status").text == "final"
        final = lmo.http.get(f"{lmo.url}/ui/migrations/{migration.id}/live", timeout=30).json()["charts"]
        deadline = time.monotonic() + 60
        while js(browser, "return [...document.querySelectorAll('img.chart')].map(i => i.dataset.src)") != [
            final["chart-timeline"],
            final["chart-precopy"],
            final["chart-pause"],
        ]:
            assert time.monotonic() < deadline, "the page swaps in the final charts once they have loaded"
            time.sleep(0.3)
        pause_svg = lmo.http.get(js(browser, "return document.getElementById('chart-pause').currentSrc")).text
        for key in ("pause_ms", "guest_pause_ms"):
            assert f">{pause[key][1]}<" in pause_svg, f"the pause chart prints {key} as the table does"
        drawn = [x for x in record["samples"] if x["total_bytes"] > 0]  # QEMU's setup readings have no numbers
        assert chart_points(browser, "chart-precopy", lmo.http) == len(drawn), "the final chart draws the samples"
        screenshot(browser, shots / "migration-done.png")

        # the same pictures from the CLI
        png = shots / f"{migration.id}.png"
        plotted = livemig(region, "migrations", "plot", migration.id, "-o", str(png))
        assert plotted.returncode == 0, plotted.stderr
        image = Image.open(io.BytesIO(png.read_bytes()))
        assert image.format == "PNG" and image.width >= 800 and image.height >= 800, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
        assert len(colours) > 50, f"a drawn chart, not a blank canvas ({len(colours)} colours)"
    finally:
        remove(lmo, "dash")


def test_an_aborted_migrations_page_shows_the_reason_with_its_numbers(lmo: LmoClient, dashboard: Any, shots: Path):
    browser = dashboard
    boot(lmo, "dirty", rate=200, wss=128)
    try:
        browser.get(f"{lmo.url}/ui")
        migration = lmo.migrate("dirty", "B", RESERVED)
        row = f"#active-table tr[data-migration='{migration.id}']"
        deadline = time.monotonic() + 60
        while "PreCopy" not in (js(browser, f'return document.querySelector("{row}")?.textContent') or ""):
            assert time.monotonic() < deadline, "the region page lists the running migration by itself"
            time.sleep(0.3)
        time.sleep(3)  # a few pre-copy updates
        cells = js(browser, f'return [...document.querySelector("{row}").cells].map(c => c.textContent.trim())')
        assert cells[1] == "dirty" and cells[2] == "A → B" and cells[-1] == "32 MiB/s", cells
        assert re.fullmatch(r"\d+%", cells[4]) and cells[5].endswith(" MiB"), cells
        screenshot(browser, shots / "region-migrating.png")
        browser.get(f"{lmo.url}/ui/migrations/{migration.id}")
        final = lmo.wait(migration.id, timeout=300)
        assert final.phase is Phase.ABORTED, final.reason
        deadline = time.monotonic() + 15
        while js(browser, "return document.getElementById('phase').dataset.phase") != "Aborted":
            assert time.monotonic() < deadline, "the open page turns to Aborted by itself"
            time.sleep(0.3)
        reason = browser.find_element("id", "reason").text
        assert reason == f"Aborted: {final.reason}", reason
        assert re.search(r"dirty rate \d+ MiB/s exceeds reserved bandwidth 32 MiB/s after \d rounds", reason)
        time.sleep(2.5)  # the final charts load
        screenshot(browser, shots / "migration-aborted.png")
        browser.get(f"{lmo.url}/ui")
        recent = browser.find_element("css selector", f"#recent-table tr[data-migration='{migration.id}']").text
        assert "Aborted" in recent and "exceeds reserved bandwidth" in recent
    finally:
        remove(lmo, "dirty")
