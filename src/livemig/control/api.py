"""The LMO's REST API: requests are validated synchronously (a clear 4xx, nothing started);
accepted migrations are then driven by the controller in the background.

The routes live in ``routes/``, one module per resource; what they share (the store, the clients
to hosts, blockd and vswitches) is one ``Services`` object built here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livemig.control.controller import Controller
from livemig.control.routes import hosts, migrations, netobjects, vms, volumes
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.control.transfers import sweep_forever
from livemig.control.web import dashboard_router
from livemig.model.host import HostInfo
from livemig.wire import hostd
from livemig.wire.base import async_http
from livemig.wire.server import install_error_handlers


def create_app(
    store: Store,
    *,
    controller_interval_s: float = 0.1,
    transport: httpx.AsyncBaseTransport | None = None,
    blockd_url: str | None = None,
) -> FastAPI:
    """The LMO app; ``transport`` replaces the network to hosts in fast tests (the fake fleet)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = async_http(transport=transport)
        services = Services.build(store, http, blockd_url)
        app.state.services = services
        task = asyncio.create_task(Controller(services, controller_interval_s).run_forever(), name="controller")
        sweeper = asyncio.create_task(sweep_forever(services.transfers), name="transfer-sweeper")
        yield
        for background in (task, sweeper):
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        await http.aclose()

    app = FastAPI(title="livemig LMO", lifespan=lifespan)
    install_error_handlers(app)
    for module in (hosts, vms, migrations, netobjects, volumes):
        app.include_router(module.router)

    async def host_info(name: str) -> HostInfo:
        services: Services = app.state.services
        return await services.host(name).run(hostd.info())

    app.include_router(dashboard_router(store, host_info=host_info))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
