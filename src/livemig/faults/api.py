"""The fault API every service mounts (LMO, hostd, blockd, vswitch), and the middleware that tells
the service which migration a request is for.

Routes (the contract is ``wire/faults.py``)::

    GET    /faults                    FaultsView: what is armed here, the latest firing's number
    POST   /faults                    ArmRequest -> ArmedFault
    DELETE /faults                    disarm everything (releases every waiter)
    DELETE /faults/{id}               disarm one (releases its waiters)
    POST   /faults/{id}/release       let the callers hanging or held at it go on
    GET    /faults/firings?since=N    the firings after number N

Why a middleware: a point inside a request, or in a task the request started (hostd's migration
job), must know the migration the LMO works on; the LMO names it in ``X-Livemig-Migration`` on
every call, and :data:`registry.CURRENT` carries it into everything that request runs. Every
answer carries ``X-Livemig-Faults`` (the latest firing's number) once something has fired, so the
LMO fetches firings only from services that have some.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livemig.faults.model import ArmedFault, ArmRequest, FaultsView, Firing
from livemig.faults.model import Scope as FaultScope
from livemig.faults.registry import CURRENT, FIRED_HEADER, MIGRATION_HEADER, REGISTRY, FaultRegistry

_MIGRATION_HEADER = MIGRATION_HEADER.encode()
_FIRED_HEADER = FIRED_HEADER.encode()


def parse_migration_header(value: str) -> FaultScope | None:
    """``m-123;vm=web`` -> the scope it names (None if it names no migration)."""
    migration, _, rest = value.partition(";")
    migration = migration.strip()
    if not migration:
        return None
    vm = rest.strip().removeprefix("vm=").strip() or None
    return FaultScope(migration=migration[:128], vm=vm[:128] if vm else None)


def migration_header(scope: FaultScope) -> str:
    return f"{scope.migration};vm={scope.vm}" if scope.vm else str(scope.migration)


class FaultScopeMiddleware:
    """Pure ASGI (no extra task per request): reads the migration header, advertises firings."""

    def __init__(self, app: ASGIApp, registry: FaultRegistry = REGISTRY) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        named = None
        for key, value in scope.get("headers", ()):
            if key == _MIGRATION_HEADER:
                named = parse_migration_header(value.decode("latin-1"))
                break
        registry = self.registry

        async def advertise(message: Message) -> None:
            if message["type"] == "http.response.start" and registry.seq:
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (_FIRED_HEADER, str(registry.seq).encode())]}  # fmt: skip
            await send(message)

        if named is None:
            await self.app(scope, receive, advertise)
            return
        registry.bind(str(named.migration), named.vm)
        token = CURRENT.set(named)
        try:
            await self.app(scope, receive, advertise)
        finally:
            CURRENT.reset(token)


#: the fault API's routes, (method, path): each service's access table names them (changing a
#: service's faults is for its driver or an admin; reading them is the LMO's way to collect firings)
FAULT_READS = (("GET", "/faults"), ("GET", "/faults/firings"))
FAULT_CHANGES = (
    ("POST", "/faults"),
    ("DELETE", "/faults"),
    ("DELETE", "/faults/{arm_id}"),
    ("POST", "/faults/{arm_id}/release"),
)


def fault_router(registry: FaultRegistry = REGISTRY) -> APIRouter:
    router = APIRouter(tags=["faults"])

    @router.get("/faults")
    async def faults() -> FaultsView:
        return registry.view()

    @router.post("/faults", status_code=201)
    async def arm(body: ArmRequest) -> ArmedFault:
        return registry.arm(body)

    @router.delete("/faults", status_code=204)
    async def disarm_all() -> Response:
        registry.disarm_all()
        return Response(status_code=204)

    @router.delete("/faults/{arm_id}")
    async def disarm(arm_id: str) -> ArmedFault:
        return registry.disarm(arm_id)

    @router.post("/faults/{arm_id}/release")
    async def release(arm_id: str) -> ArmedFault:
        return registry.release(arm_id)

    @router.get("/faults/firings")
    async def firings(since: int = 0) -> list[Firing]:
        return registry.since(since)

    return router


def mount_faults(app: FastAPI, registry: FaultRegistry = REGISTRY) -> None:
    """Serve the fault API on ``app`` and read the migration header of every request."""
    app.include_router(fault_router(registry))
    app.add_middleware(FaultScopeMiddleware, registry=registry)
