"""Admin API: routes, clear 4xx JSON for bad input, export names that carry the secret."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from livemig.storage.api import create_app
from livemig.storage.blockd import Blockd, parse_export_name
from livemig.storage.nbd import protocol as p
from livemig.storage.nbd.server import ExportRefused
from livemig.testing.callers import LMO, over_tls

MIB = 1 << 20


@pytest.fixture
def blockd(tmp_path: Path) -> Blockd:
    return Blockd(tmp_path, fencing=True)


@pytest.fixture
def api(blockd: Blockd) -> Iterator[TestClient]:
    with TestClient(over_tls(create_app(blockd), LMO)) as client:  # the LMO's certificate
        yield client


def test_volume_lifecycle(api: TestClient) -> None:
    created = api.post("/volumes", json={"name": "v1", "size_bytes": 8 * MIB})
    assert created.status_code == 201, created.text
    assert created.json()["size_bytes"] == 8 * MIB
    assert [v["name"] for v in api.get("/volumes").json()] == ["v1"]
    assert api.get("/volumes/v1").json()["attachments"] == 0
    grown = api.post("/volumes/v1/resize", json={"size_bytes": 16 * MIB})
    assert grown.status_code == 200 and grown.json()["size_bytes"] == 16 * MIB
    assert api.delete("/volumes/v1").status_code == 204
    assert api.get("/volumes/v1").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("post", "/volumes", {"name": "Bad Name", "size_bytes": MIB}, 422, "InvalidRequest"),
        ("post", "/volumes", {"name": "v", "size_bytes": 1000}, 422, "InvalidRequest"),
        ("post", "/volumes", {"name": "v", "size_bytes": "lots"}, 422, "InvalidRequest"),
        ("post", "/volumes", {"name": "v", "size_bytes": MIB, "extra": 1}, 422, "InvalidRequest"),
        ("post", "/volumes", {"size_bytes": MIB}, 422, "InvalidRequest"),
        ("get", "/volumes/nope", None, 404, "NotFound"),
        ("post", "/volumes/nope/resize", {"size_bytes": MIB}, 404, "NotFound"),
        ("delete", "/volumes/nope", None, 404, "NotFound"),
        ("post", "/volumes/nope/attachments", {"vm": "x", "host": "h"}, 404, "NotFound"),
        ("delete", "/attachments/nope", None, 404, "NotFound"),
        ("post", "/attachments/nope/fence", None, 404, "NotFound"),
    ],
)
def test_bad_input_is_clear_json(
    api: TestClient, method: str, path: str, body: dict[str, object] | None, status: int, error: str
) -> None:
    reply = api.request(method.upper(), path, json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"] == error
    assert reply.json()["message"]
    assert "Traceback" not in reply.text


def test_shrink_and_duplicate_are_refused(api: TestClient) -> None:
    api.post("/volumes", json={"name": "v", "size_bytes": 2 * MIB})
    shrink = api.post("/volumes/v/resize", json={"size_bytes": MIB})
    assert shrink.status_code == 422 and "only grow" in shrink.json()["message"]
    again = api.post("/volumes", json={"name": "v", "size_bytes": MIB})
    assert again.status_code == 409


def test_attach_fence_detach(api: TestClient, blockd: Blockd) -> None:
    api.post("/volumes", json={"name": "v", "size_bytes": MIB})
    reply = api.post("/volumes/v/attachments", json={"vm": "vm1", "host": "A"})
    assert reply.status_code == 201, reply.text
    att = reply.json()
    assert att["export_name"] == f"v/{att['id']}.{att['secret']}"
    assert att["nbd_uri"].startswith("nbd://127.0.0.1:") and att["nbd_uri"].endswith(att["export_name"])
    assert parse_export_name(att["export_name"]) == ("v", att["id"], att["secret"])

    delete = api.delete("/volumes/v")
    assert delete.status_code == 409 and att["id"] in delete.json()["message"]

    fenced = api.post(f"/attachments/{att['id']}/fence")
    assert fenced.status_code == 200 and fenced.json()["fenced"] is True
    listed = api.get("/volumes/v/attachments").json()
    assert [(a["id"], a["fenced"], a["rejected_writes"], a["is_writer"]) for a in listed] == [
        (att["id"], True, 0, False)
    ]
    assert "secret" not in listed[0]

    assert api.delete(f"/attachments/{att['id']}").status_code == 204
    assert api.delete(f"/attachments/{att['id']}").status_code == 204  # idempotent
    assert api.get("/volumes/v/attachments").json() == []
    assert len(api.get("/volumes/v/attachments", params={"include_detached": True}).json()) == 1
    assert api.post(f"/attachments/{att['id']}/fence").status_code == 409
    assert api.delete("/volumes/v").status_code == 204


def test_export_name_checks(api: TestClient, blockd: Blockd) -> None:
    api.post("/volumes", json={"name": "v", "size_bytes": MIB})
    api.post("/volumes", json={"name": "w", "size_bytes": MIB})
    att = api.post("/volumes/v/attachments", json={"vm": "vm1", "host": "A"}).json()
    session = blockd.open_export(att["export_name"])
    assert session.size == MIB
    session.close()
    cases = {
        "": p.OptionReply.ERR_UNKNOWN,
        "v": p.OptionReply.ERR_UNKNOWN,
        f"v/{att['id']}": p.OptionReply.ERR_UNKNOWN,
        f"v/nope.{att['secret']}": p.OptionReply.ERR_UNKNOWN,
        f"w/{att['id']}.{att['secret']}": p.OptionReply.ERR_UNKNOWN,
        f"../v/{att['id']}.{att['secret']}": p.OptionReply.ERR_UNKNOWN,
        f"v/{att['id']}.{'0' * 32}": p.OptionReply.ERR_POLICY,
    }
    for name, reply in cases.items():
        with pytest.raises(ExportRefused) as refused:
            blockd.open_export(name)
        assert refused.value.reply == reply, name


def test_health_and_metrics(api: TestClient) -> None:
    api.post("/volumes", json={"name": "v", "size_bytes": MIB})
    api.post("/volumes/v/attachments", json={"vm": "vm1", "host": "A"})
    health = api.get("/healthz").json()
    assert health["status"] == "ok" and health["fencing"] is True and health["volumes"] == 1
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert "livemig_blockd_rejected_writes_total" in metrics.text
    assert "livemig_blockd_fenced_writes_total 0.0" in metrics.text
    for op in ("read", "write", "flush", "trim", "write_zeroes"):  # before any NBD server: all at 0
        assert f'livemig_blockd_nbd_request_duration_seconds_count{{op="{op}"}} 0.0' in metrics.text
    assert 'livemig_blockd_volume_size_bytes{volume="v"} 1.048576e+06' in metrics.text
