"""``livemig migrations plot`` and ``livemig evacuate --plot``: the real CLI against the real LMO
app on a loopback port, over fake hosts (the e2e dashboard test plots a real migration too)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from livemig.control.api import create_app
from livemig.control.store import Store
from livemig.model import VmSpec
from livemig.region.freeport import free_port
from livemig.testing.fakehost import FakeFleet
from livemig.wire import lmo as wire_lmo
from livemig.wire.lmo import LmoClient

pytestmark = pytest.mark.slow  # each CLI run is a fresh Python process


@pytest.fixture
def lmo(tmp_path: Path) -> Iterator[tuple[LmoClient, Store]]:
    fleet = FakeFleet("A", "B", memory_mib=2048, speed=2)  # slow enough for a few pre-copy samples
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, controller_interval_s=0.01, transport=fleet.transport()),
                                           host="127.0.0.1", port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the LMO did not start"
        time.sleep(0.02)
    client = LmoClient(f"http://127.0.0.1:{port}")
    for host in fleet.hosts.values():
        client.run(wire_lmo.register_host(host.registration()))
    client.create_vm(VmSpec(name="vm1", memory_mib=512), host="A")
    try:
        yield client, store
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)


def livemig(client: LmoClient, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI; its stderr with rich's line wrapping undone."""
    done = subprocess.run([sys.executable, "-m", "livemig.cli.main", *args, "--url", client.url],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    done.stderr = " ".join(done.stderr.split())
    return done


def test_migrations_plot_writes_png_and_svg_and_refuses_other_names(lmo, tmp_path):
    client, _ = lmo
    m = client.wait(client.migrate("vm1", "B").id, timeout=30)
    png, svg, jpg = tmp_path / "m.png", tmp_path / "m.svg", tmp_path / "m.jpg"
    assert livemig(client, "migrations", "plot", m.id, "-o", str(png)).returncode == 0
    image = Image.open(io.BytesIO(png.read_bytes()))
    assert image.format == "PNG" and image.width >= 800 and image.height >= 800
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 24) or []) > 50, "not a blank canvas"
    assert livemig(client, "migrations", "plot", m.id, "--output", str(svg)).returncode == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "Succeeded" in svg.read_text()
    refused = livemig(client, "migrations", "plot", m.id, "-o", str(jpg))
    assert refused.returncode == 1 and "name it .png or .svg" in refused.stderr and "Traceback" not in refused.stderr
    assert not jpg.exists()
    unknown = livemig(client, "migrations", "plot", "m-nope", "-o", str(tmp_path / "n.png"))
    assert unknown.returncode == 1 and "unknown migration" in unknown.stderr and not (tmp_path / "n.png").exists()


def test_evacuate_plot_draws_the_evacuation_and_a_bad_name_changes_nothing(lmo, tmp_path):
    client, store = lmo
    refused = livemig(client, "evacuate", "A", "--plot", str(tmp_path / "e.gif"))
    assert refused.returncode == 1 and "name it .png or .svg" in refused.stderr
    assert not store.host("A").maintenance, "refused before the host was put in maintenance"
    chart = tmp_path / "evacuation.svg"
    done = livemig(client, "evacuate", "A", "--plot", str(chart))
    assert done.returncode == 0, done.stdout + done.stderr
    text = chart.read_text()
    assert "vm1 → B" in text and 'id="concurrency"' in text and "region limit 4" in text
