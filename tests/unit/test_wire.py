"""One contract per process boundary: every route a client calls is one the service serves, the
fake hostd is the real hostd app, and an error reply becomes the same exception on the caller's side."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match, Route

from livemig import errors
from livemig.control.api import create_app as lmo_app
from livemig.control.store import Store
from livemig.host.accel import AccelChoice
from livemig.host.agent import HostAgent
from livemig.host.api import create_app as hostd_app
from livemig.host.api import router as hostd_router
from livemig.model import HostRegistration, MigrationParams, VmSpec
from livemig.network.api import create_app as vswitch_app
from livemig.network.model import Mapping, SecurityList
from livemig.network.vswitch import Vswitch
from livemig.storage.api import create_app as blockd_app
from livemig.storage.blockd import Blockd
from livemig.testing.fakehost import FakeFleet
from livemig.wire import blockd, faults, hostd, lmo, vswitch
from livemig.wire.base import AsyncService, Call, async_http, error_from_reply
from livemig.wire.lmo import EvacuationRequest, MigrationRequest, NetKind, WaveRequest
from livemig.wire.server import install_error_handlers

SPEC = VmSpec(name="vm", memory_mib=256)
#: an example argument per parameter name, to build every route of a boundary module
EXAMPLES: dict[str, Any] = {
    "name": "vm", "spec": SPEC, "exports": None, "uri": "tcp:127.0.0.1:4444", "params": MigrationParams(),
    "handoffs": None, "since": 0, "versions": {"web": 1}, "tail": 10, "line": "hello", "size_bytes": 1 << 20,
    "volume": "vol", "vm": "vm", "host": "A", "attachment_id": "a1", "include_detached": False,
    "mapping": Mapping(generation=1), "security_list": SecurityList(id="sl"), "list_id": "sl", "vnic_id": "web",
    "hold": False, "qemu_port": None, "tap": None, "envelope": b"x", "flows_since": None, "marker": {},
    "flows": None, "replay_recent": False, "registration": HostRegistration(name="A", api_url="http://a",
    migration_address="127.0.0.1"), "on": True, "kind": NetKind.VCNS, "body": {"id": "v"}, "object_id": "v",
    "request": MigrationRequest(vm="vm", destination="B"), "migration_id": "m-1", "evacuation_id": "e-1",
    "active": False, "policies": None, "arm_id": "hostd-1-1", "preallocate": False,
    "role": "viewer", "token_id": "t1", "tls_source": "A", "tls_hostname": "B",
    "seconds": 1.0, "observe": True, "limit": None, "names": None,
    "transfer_id": "t-1", "mode": lmo.TransferMode.WRITE, "ttl_s": 60.0,
}  # fmt: skip
EXAMPLES_BY_ROUTE: dict[str, dict[str, Any]] = {
    "evacuate": {"request": EvacuationRequest()},
    "arm": {"request": faults.ArmRequest(point="hostd.switchover", action=faults.Action.HANG)},
    "start_wave": {"request": WaveRequest(hosts=["A"])},
    "plan_wave": {"request": WaveRequest(hosts=["A"])},
}


def calls_of(module: ModuleType) -> dict[str, Call[Any]]:
    """Every route function of a boundary module, called with example arguments."""
    found: dict[str, Call[Any]] = {}
    for name, function in inspect.getmembers(module, inspect.isfunction):
        if (
            function.__module__ != module.__name__
            or name.startswith("_")
            or "Call[" not in str(inspect.signature(function).return_annotation)
        ):
            continue
        params = inspect.signature(function).parameters
        examples = {**EXAMPLES, **EXAMPLES_BY_ROUTE.get(name, {})}
        found[name] = function(**{p: examples[p] for p in params})
    return found


def served(app: FastAPI) -> list[Route]:
    return [r for r in app.routes if isinstance(r, Route)]


def matches(app: FastAPI, call: Call[Any]) -> bool:
    """Would the app route this call to a handler (method and path), as Starlette decides?"""
    scope = {"type": "http", "method": call.method, "path": call.path, "root_path": ""}
    return any(route.matches(scope)[0] is Match.FULL for route in app.routes)


def hostd_agent(tmp_path: Path) -> HostAgent:
    return HostAgent("A", tmp_path / "host", "127.0.0.1", AccelChoice("tcg", "test"), 1024)


@pytest.mark.parametrize(
    "module, make_app",
    [
        (hostd, lambda tmp: hostd_app(hostd_agent(tmp))),
        (lmo, lambda tmp: lmo_app(Store(f"sqlite:///{tmp / 'lmo.db'}"))),
        (blockd, lambda tmp: blockd_app(Blockd(tmp / "blockd"))),
        (vswitch, lambda tmp: vswitch_app(Vswitch("A", "127.0.0.1:0"))),
    ],
    ids=["hostd", "lmo", "blockd", "vswitch"],
)
def test_every_route_a_client_calls_is_served(tmp_path: Path, module: ModuleType, make_app: Any) -> None:
    calls = calls_of(module)
    assert len(calls) >= 8, f"{module.__name__} defines its routes as Call builders"
    app = make_app(tmp_path)
    unserved = [f"{name}: {call.name}" for name, call in calls.items() if not matches(app, call)]
    assert unserved == []


APPS = {
    "hostd": lambda tmp: hostd_app(hostd_agent(tmp)),
    "lmo": lambda tmp: lmo_app(Store(f"sqlite:///{tmp / 'lmo.db'}")),
    "blockd": lambda tmp: blockd_app(Blockd(tmp / "blockd")),
    "vswitch": lambda tmp: vswitch_app(Vswitch("A", "127.0.0.1:0")),
}


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_service_serves_the_fault_api(tmp_path: Path, service: str) -> None:
    calls = calls_of(faults)
    assert len(calls) == 6
    app = APPS[service](tmp_path)
    assert [f"{name}: {call.name}" for name, call in calls.items() if not matches(app, call)] == []


def test_the_fake_hostd_is_the_real_hostd_app(tmp_path: Path) -> None:
    """The fleet serves every simulated host from one app: hostd's own routes under ``/h/{host}``,
    each request answered by the agent its path names."""
    fleet = FakeFleet("A", "B", state_dir=tmp_path / "fleet")
    fake = fleet.hosts["A"].app
    assert fleet.hosts["B"].app is fake
    real = hostd_app(hostd_agent(tmp_path))
    routes = [r for r in hostd_router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 15
    assert {"/vms/{name}/migrate", "/vms/{name}/incoming", "/vms/{name}/migration/flow-versions"} <= {
        r.path for r in routes
    }
    for route in routes:
        for method in route.methods or ():
            path = route.path.replace("{name}", "vm")
            assert matches(real, Call(method, path, str)), (method, path)
            assert matches(fake, Call(method, "/h/A" + path, str)), (method, path)

    async def ask() -> list[str]:
        async with async_http(transport=fleet.transport()) as http:
            return [(await AsyncService(n, fleet.url(n), http).run(hostd.info())).name for n in ("A", "B")]

    assert asyncio.run(ask()) == ["A", "B"]
    assert fleet.hosts["A"].calls == ["GET /host"]


def test_an_error_reply_becomes_the_same_exception_with_its_message() -> None:
    app = FastAPI()
    install_error_handlers(app)
    raised: dict[str, errors.LivemigError] = {
        "conflict": errors.Conflict("VM vm busy", vm="vm"),
        "capacity": errors.CapacityError("no room", free_mib=3),
        "missing": errors.NotFound("no such VM"),
        "qemu": errors.QemuError("QMP migrate failed"),
        "state": errors.StateError("vm.json is torn"),
    }

    @app.get("/raise/{what}")
    async def boom(what: str) -> None:
        raise raised[what]

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            service = AsyncService("host A", "http://a", http)
            for what, original in raised.items():
                with pytest.raises(errors.LivemigError) as caught:
                    await service.run(Call("GET", f"/raise/{what}", lambda r: r))
                assert type(caught.value) is type(original)
                assert caught.value.message == f"host A: {original.message}"
                assert caught.value.details == original.details

    asyncio.run(scenario())


def test_a_reply_that_is_not_ours_is_judged_by_its_status() -> None:
    def reply(status: int, text: str) -> httpx.Response:
        return httpx.Response(status, text=text, request=httpx.Request("GET", "http://x/"))

    assert isinstance(error_from_reply(reply(404, "<html>nope</html>"), "LMO"), errors.NotFound)
    assert isinstance(error_from_reply(reply(502, "Bad Gateway"), "LMO"), errors.HostUnreachable)
    unknown = error_from_reply(reply(500, '{"error": "NoSuchClass", "message": "odd"}'), "LMO")
    assert type(unknown) is errors.LivemigError and unknown.message == "LMO: odd"


def test_an_unreachable_service_is_host_unreachable() -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=1) as http:
            service = AsyncService("blockd", "http://127.0.0.1:9", http)
            with pytest.raises(errors.HostUnreachable, match=r"blockd at http://127\.0\.0\.1:9 did not answer GET /x"):
                await service.run(Call("GET", "/x", lambda r: r))

    asyncio.run(scenario())
