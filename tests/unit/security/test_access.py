"""Who may call what, on every service's real app: the certificate's role (403 for the wrong one),
a host's own certificate where it must be its own, users' bearer tokens on the LMO (401 without,
403 for too small a role, 401 once revoked), the dashboard's login cookie. The TLS handshake is not
simulated away here: tests/integration/security runs real servers and clients for that."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from livemig.control import tokens
from livemig.control.access import POLICY as LMO_POLICY
from livemig.control.api import create_app as lmo_app
from livemig.control.store import Store
from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent
from livemig.host.api import POLICY as HOSTD_POLICY
from livemig.host.api import create_app as hostd_app
from livemig.model import VmSpec
from livemig.network.api import POLICY as VSWITCH_POLICY
from livemig.network.api import create_app as vswitch_app
from livemig.network.vswitch import Vswitch
from livemig.security.access import UserRole, served_routes, unruled_routes
from livemig.security.pki import Identity, Role
from livemig.storage.api import POLICY as BLOCKD_POLICY
from livemig.storage.api import create_app as blockd_app
from livemig.storage.blockd import Blockd
from livemig.testing.callers import LMO, REGION, lmo_over_tls, over_tls
from livemig.testing.fakehost import FakeFleet


def who(role: Role, name: str) -> Identity:
    return Identity(REGION, role, name)


def hostd(tmp_path: Path) -> FastAPI:
    return hostd_app(HostAgent("A", tmp_path / "host", "127.0.0.1", AccelChoice("tcg", "test"), 1024))


def call(app: FastAPI, identity: Identity | None, method: str, path: str, **kwargs: object) -> httpx.Response:
    with TestClient(over_tls(app, identity)) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make_app, policy",
    [
        (lambda tmp: hostd(tmp), HOSTD_POLICY),
        (lambda tmp: blockd_app(Blockd(tmp / "blockd")), BLOCKD_POLICY),
        (lambda tmp: vswitch_app(Vswitch("A", "127.0.0.1:0")), VSWITCH_POLICY),
    ],
    ids=["hostd", "blockd", "vswitch"],
)
def test_every_route_of_a_service_has_its_rule(tmp_path: Path, make_app, policy) -> None:  # type: ignore[no-untyped-def]
    app = make_app(tmp_path)
    assert unruled_routes(app, policy) == []
    assert set(policy) <= served_routes(app), "every rule names a route the service serves"


def test_the_lmo_names_its_exceptions_and_every_rule_names_a_route(tmp_path: Path) -> None:
    app = lmo_app(Store(f"sqlite:///{tmp_path / 'lmo.db'}"))
    assert set(LMO_POLICY) <= served_routes(app)
    guard = app.state.guard
    # the defaults: reading takes a viewer, changing an operator; the dashboard also takes the cookie
    assert guard.access("GET", "/vms").user is UserRole.VIEWER
    assert guard.access("POST", "/vms/{name}/guest-check").user is UserRole.OPERATOR
    assert guard.access("GET", "/ui/migrations/{migration_id}").pages
    assert guard.access("PUT", "/hosts/{name}").services == {Role.HOSTD}


def test_hostd_takes_orders_only_from_the_lmo(tmp_path: Path) -> None:
    app = hostd(tmp_path)
    assert call(app, LMO, "GET", "/host").status_code == 200
    for stranger in (who(Role.VSWITCH, "a"), who(Role.HOSTD, "b"), who(Role.QEMU, "a"), who(Role.BLOCKD, "blockd")):
        reply = call(app, stranger, "POST", "/vms/x/migrate", json={"uri": "tcp:127.0.0.1:1"})
        assert reply.status_code == 403, (stranger, reply.text)
        assert reply.json()["error"] == "Forbidden" and stranger.uri == reply.json()["caller"]
    assert call(app, who(Role.VSWITCH, "a"), "GET", "/healthz").status_code == 200  # health: any service
    # a TLS connection without a certificate (only the LMO admits those) and plain HTTP: 401
    assert call(app, None, "GET", "/host").status_code == 401
    with TestClient(app) as plain:
        assert plain.get("/host").status_code == 401


def test_an_insecure_service_serves_anyone(tmp_path: Path) -> None:
    app = hostd_app(HostAgent("A", tmp_path / "host", "127.0.0.1", AccelChoice("tcg", "t"), 1024), insecure=True)
    with TestClient(app) as plain:
        assert plain.get("/host").status_code == 200


def test_only_the_lmo_fences_a_volume(tmp_path: Path) -> None:
    app = blockd_app(Blockd(tmp_path / "blockd"))
    assert call(app, who(Role.HOSTD, "a"), "POST", "/attachments/x/fence").status_code == 403
    assert call(app, who(Role.QEMU, "a"), "POST", "/volumes", json={"name": "v", "size_bytes": 1 << 20}).status_code \
        == 403  # fmt: skip
    assert call(app, LMO, "POST", "/attachments/x/fence").status_code == 404  # past the guard: no such attachment


def test_a_vswitch_takes_nics_only_from_its_own_hostd_and_hand_offs_from_any(tmp_path: Path) -> None:
    app = vswitch_app(Vswitch("A", "127.0.0.1:0"))
    with TestClient(over_tls(app, who(Role.HOSTD, "a"))) as own:
        attached = own.post("/vnics", json={"vnic_id": "web"})
        assert attached.status_code != 403 and attached.json()["error"] != "Forbidden"  # judged on its merits
        assert own.put("/mapping", json={"generation": 1}).status_code == 403  # the mapping is the LMO's
    other = who(Role.HOSTD, "b")
    assert call(app, other, "POST", "/vnics", json={"vnic_id": "db"}).status_code == 403
    assert "only for its own host" in call(app, other, "POST", "/vnics/web/pause-marker").json()["message"]
    # the source host's hostd hands a VNIC over to the destination's vswitch: allowed (then judged on its merits)
    assert call(app, other, "POST", "/vnics/web/handoff", json={"marker": {}}).status_code != 403
    assert call(app, LMO, "PUT", "/mapping", json={"generation": 1}).status_code == 200


@pytest.fixture
def lmo(tmp_path: Path) -> Iterator[tuple[TestClient, Store, FakeFleet]]:
    fleet = FakeFleet("A", "B")
    store = Store(f"sqlite:///{tmp_path / 'lmo.db'}")
    app = lmo_app(store, controller_interval_s=0.01, transport=fleet.transport())
    with TestClient(lmo_over_tls(app)) as client:
        client.app_itself = app  # type: ignore[attr-defined]
        yield client, store, fleet
    fleet.close()


def bearer(store: Store, role: UserRole) -> tuple[str, dict[str, str]]:
    record, token = tokens.issue(store, f"{role.value}-user", role)
    return record.id, {"Authorization": f"Bearer {token}"}


def test_users_need_a_token_of_a_large_enough_role(lmo: tuple[TestClient, Store, FakeFleet]) -> None:
    client, store, _fleet = lmo
    bare = client.get("/vms")
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == 'Bearer realm="livemig"'
    assert client.get("/healthz").status_code == 200  # the one public route
    bad = client.get("/vms", headers={"Authorization": "Bearer lmt_000000000000_" + "x" * 43})
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert client.get("/vms", headers={"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    _vid, viewer = bearer(store, UserRole.VIEWER)
    assert client.get("/vms", headers=viewer).status_code == 200
    refused = client.post("/migrations", json={"vm": "vm1", "destination": "B"}, headers=viewer)
    assert refused.status_code == 403 and "it takes operator or above" in refused.json()["message"]
    assert client.get("/vms/vm1/console", headers=viewer).status_code == 403  # the guest's own words
    _oid, operator = bearer(store, UserRole.OPERATOR)
    assert client.post("/migrations", json={"vm": "vm1", "destination": "B"}, headers=operator).status_code == 404
    client.put("/hosts/A", json=_fleet.hosts["A"].registration().model_dump())
    client.put("/hosts/B", json=_fleet.hosts["B"].registration().model_dump())
    assert client.post("/vms", json={"spec": VmSpec(name="vm1", memory_mib=256).model_dump(), "host": "A"},
                       headers=operator).status_code == 201  # fmt: skip
    created = client.post("/migrations", json={"vm": "vm1", "destination": "B"}, headers=operator).json()
    assert created["timeline"][0]["message"].startswith("requested by operator-user (operator): vm1 A -> B; ")
    assert client.get("/tokens", headers=operator).status_code == 403  # tokens: admin only


def test_a_revoked_token_is_refused_from_the_next_request(lmo: tuple[TestClient, Store, FakeFleet]) -> None:
    client, store, _fleet = lmo
    _aid, admin = bearer(store, UserRole.ADMIN)
    created = client.post("/tokens", json={"name": "ci", "role": "operator"}, headers=admin)
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    ci = {"Authorization": f"Bearer {token}"}
    assert client.get("/vms", headers=ci).status_code == 200
    listed = client.get("/tokens", headers=admin).json()
    assert {t["name"] for t in listed} == {"admin-user", "ci"} and all("token" not in t for t in listed)
    assert client.delete(f"/tokens/{created.json()['id']}", headers=admin).status_code == 200
    assert client.get("/vms", headers=ci).status_code == 401
    # only the digest is stored, never the token
    with store.engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.execute(text("SELECT * FROM tokens")) for v in row)
    assert token not in stored and tokens.digest(token) in stored


def test_a_host_registers_only_itself(lmo: tuple[TestClient, Store, FakeFleet]) -> None:
    client, store, fleet = lmo
    app = client.app_itself  # type: ignore[attr-defined]
    registration = fleet.hosts["A"].registration().model_dump()
    assert client.put("/hosts/A", json=registration).status_code == 200  # lmo_over_tls: as hostd/a
    as_b = TestClient(over_tls(app, who(Role.HOSTD, "b")))
    refused = as_b.put("/hosts/A", json=registration)
    assert refused.status_code == 403 and "only for its own host" in refused.json()["message"]
    # a user, even an admin, cannot register (or redirect) a host
    _aid, admin = bearer(store, UserRole.ADMIN)
    assert TestClient(over_tls(app, None)).put("/hosts/A", json=registration, headers=admin).status_code == 403
    # and a host's certificate is no user: it reads nothing else
    assert as_b.get("/vms").status_code == 403


def test_the_dashboard_logs_in_with_a_token_and_keeps_it_in_an_httponly_cookie(
    lmo: tuple[TestClient, Store, FakeFleet],
) -> None:
    client, store, _fleet = lmo
    first = client.get("/ui/migrations/m-1?x=1", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/ui/login?next=/ui/migrations/m-1%3Fx%3D1"
    assert client.get("/ui/live", headers={"Accept": "application/json"}).status_code == 401  # the polling script
    form = client.get("/ui/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    wrong = client.post("/ui/login", data={"token": "nope", "next": "/ui"}, follow_redirects=False)
    assert wrong.status_code == 401 and "unknown or was revoked" in wrong.text
    token_id, viewer = bearer(store, UserRole.VIEWER)
    token = viewer["Authorization"].removeprefix("Bearer ")
    ok = client.post("/ui/login", data={"token": token, "next": "https://elsewhere.example/"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/ui"  # never off to another site
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert client.get("/ui").status_code == 200  # the TestClient keeps the cookie
    assert client.get("/vms").status_code == 401  # the cookie is the dashboard's only, not the API's
    store.revoke_token(token_id)
    assert client.get("/ui", follow_redirects=False).status_code == 303
