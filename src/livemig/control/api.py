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
from dataclasses import asdict
from datetime import UTC, datetime

import httpx
from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livemig.control import tokens
from livemig.control.access import DASHBOARD, POLICY, default_rule
from livemig.control.controller import REPLICA_CAPACITY, STEP_CONCURRENCY, Controller
from livemig.control.metrics import bandwidth_registry
from livemig.control.routes import hosts, migrations, netobjects, vms, volumes
from livemig.control.routes import tokens as token_routes
from livemig.control.runner import ControllerThread
from livemig.control.services import Services
from livemig.control.store import Store
from livemig.control.transfers import sweep_forever
from livemig.control.web import dashboard_router
from livemig.control.web.login import COOKIE, login_redirect, login_router
from livemig.faults.api import mount_faults
from livemig.model.host import HostInfo
from livemig.model.migration import Migration
from livemig.security.access import NO_DOCS, Guard, LoginRequired
from livemig.security.tls import INSECURE_STATE
from livemig.wire import hostd
from livemig.wire.base import AsyncHttp, async_http
from livemig.wire.lmo import ControllerStatus, PassView
from livemig.wire.server import install_error_handlers
from livemig.wire.timing import ServerTimingMiddleware


def create_app(
    store: Store,
    *,
    controller_interval_s: float = 0.1,
    transport: httpx.AsyncBaseTransport | None = None,
    blockd_url: str | None = None,
    insecure: bool = False,
    migration_tls: bool | None = None,
    replica: str | None = None,
    capacity: int = REPLICA_CAPACITY,
    concurrency: int = STEP_CONCURRENCY,
) -> FastAPI:
    """The LMO app; ``transport`` replaces the network to hosts in fast tests (the fake fleet).

    ``insecure`` (a lab's ``--insecure``): plain HTTP, every caller allowed everything.
    ``migration_tls``: ask hosts to encrypt migration streams (default: unless insecure).
    ``capacity`` bounds the migrations this replica drives at once, ``concurrency`` how many a
    pass steps at the same time. ``capacity`` 0 makes an API replica: it runs no controller (and
    takes no part of the leases), so its requests never wait for a pass's turn at the interpreter
    while other replicas on the same store drive the migrations (docs/fleet.md)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = async_http(transport=transport, pooled=True)  # thousands of host calls a second
        services = Services.build(store, http, blockd_url)
        services.migration_tls = not insecure if migration_tls is None else migration_tls
        app.state.services = services

        def make(client: AsyncHttp) -> Controller:
            own = Services.build(store, client, blockd_url, services.registrations)
            own.migration_tls = services.migration_tls
            return Controller(own, controller_interval_s, replica=replica, capacity=capacity,
                              concurrency=concurrency)  # fmt: skip

        # abandoned volume transfers (a client killed mid-copy) are detached on the API's loop
        sweeper = asyncio.create_task(sweep_forever(services.transfers), name="transfer-sweeper")
        if capacity == 0:  # an API replica: other replicas drive what it accepts
            app.state.controller = None
            yield
            background = [sweeper]
        elif transport is None:  # its own thread and loop (runner.py says why)
            thread = ControllerThread(make)
            app.state.controller = thread.start()
            yield
            thread.stop()
            background = [sweeper]
        else:  # fake hosts in-process live on this loop: the controller must too
            app.state.controller = controller = make(http)
            task = asyncio.create_task(controller.run_forever(), name="controller")
            yield
            background = [task, sweeper]
        for running in background:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        await http.aclose()

    check = tokens.checker(store)
    guard = Guard(POLICY, host_param="name", tokens=check, cookie=COOKIE, default=default_rule)
    app = FastAPI(title="livemig LMO", lifespan=lifespan, dependencies=[Depends(guard)], **NO_DOCS)
    app.state.guard = guard
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    app.add_middleware(ServerTimingMiddleware)  # every answer says where its time went (wire/timing.py)
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

    @app.get("/controller")
    async def controller_status() -> ControllerStatus:
        """This replica's controller: its share of the leases and its recent passes."""
        controller: Controller | None = app.state.controller
        if controller is None:
            return ControllerStatus(replica=replica or "api", capacity=0, concurrency=concurrency,
                                    interval_s=controller_interval_s, held=0, finished=0,
                                    replicas=store.replicas(), passes=[])  # fmt: skip
        return ControllerStatus(
            replica=controller.replica, capacity=controller.capacity, concurrency=controller.concurrency,
            interval_s=controller.interval_s, held=len(controller.held), finished=controller.finished,
            replicas=store.replicas(),
            passes=[PassView(**{**asdict(p), "at": datetime.fromtimestamp(p.at, UTC)})
                    for p in controller.recent_passes()],
        )  # fmt: skip

    def held() -> list[Migration]:
        controller: Controller | None = getattr(app.state, "controller", None)
        return controller.held if controller is not None else []

    bandwidth = bandwidth_registry(held, store.budgets)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The process's series (the controller's, ended migrations': ``control/metrics.py``) and the
        bandwidth of the migrations this replica drives now."""
        return Response(generate_latest() + generate_latest(bandwidth), media_type=CONTENT_TYPE_LATEST)

    return app
