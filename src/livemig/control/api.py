"""The LMO's REST API: requests are validated synchronously (a clear 4xx, nothing started);
accepted migrations are then driven by the controller in the background.

The routes live in ``routes/``, one module per resource; what they share (the store, the clients
to hosts, blockd and vswitches) is one ``Services`` object built here. Every request passes one
guard (``control/access.py`` says who may call what): users with bearer tokens, hosts with their
certificates, on the same TLS listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livemig.control import tokens
from livemig.control.access import DASHBOARD, POLICY, default_rule
from livemig.control.controller import Controller
from livemig.control.routes import hosts, migrations, netobjects, vms, volumes
from livemig.control.routes import tokens as token_routes
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.control.web import dashboard_router
from livemig.control.web.login import COOKIE, login_redirect, login_router
from livemig.faults.api import mount_faults
from livemig.model.host import HostInfo
from livemig.security.access import NO_DOCS, Guard, LoginRequired
from livemig.security.tls import INSECURE_STATE
from livemig.wire import hostd
from livemig.wire.base import async_http
from livemig.wire.server import install_error_handlers


def create_app(
    store: Store,
    *,
    controller_interval_s: float = 0.1,
    transport: httpx.AsyncBaseTransport | None = None,
    blockd_url: str | None = None,
    insecure: bool = False,
    migration_tls: bool | None = None,
) -> FastAPI:
    """The LMO app; ``transport`` replaces the network to hosts in fast tests (the fake fleet).

    ``insecure`` (a lab's ``--insecure``): plain HTTP, every caller allowed everything.
    ``migration_tls``: ask hosts to encrypt migration streams (default: unless insecure)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = async_http(transport=transport)
        services = Services.build(store, http, blockd_url)
        services.migration_tls = not insecure if migration_tls is None else migration_tls
        app.state.services = services
        task = asyncio.create_task(Controller(services, controller_interval_s).run_forever(), name="controller")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await http.aclose()

    check = tokens.checker(store)
    guard = Guard(POLICY, host_param="name", tokens=check, cookie=COOKIE, default=default_rule)
    app = FastAPI(title="livemig LMO", lifespan=lifespan, dependencies=[Depends(guard)], **NO_DOCS)
    app.state.guard = guard
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    mount_faults(app)
    app.add_exception_handler(LoginRequired, login_redirect(DASHBOARD))
    for module in (hosts, vms, migrations, netobjects, volumes, token_routes):
        app.include_router(module.router)

    async def host_info(name: str) -> HostInfo:
        services: Services = app.state.services
        return await services.host(name).run(hostd.info())

    app.include_router(login_router(check, prefix=DASHBOARD))
    # the same guard instance as the app's: FastAPI runs it once per request
    app.include_router(dashboard_router(store, host_info=host_info, authorize=guard, prefix=DASHBOARD))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
