"""hostd's REST API (FastAPI). Observed state out, idempotent actions in.

The routes and their models are the boundary's, in ``livemig.wire.hostd``. Who may call them:
:data:`POLICY` (only the LMO drives a hostd; any certificate of the region may ask its health)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from livemig.errors import HostUnreachable, InvalidRequest, LivemigError
from livemig.faults.api import FAULT_CHANGES, FAULT_READS, mount_faults
from livemig.host.agent import HostAgent
from livemig.model.host import HostInfo, HostRegistration
from livemig.security.access import ANY_SERVICE, NO_DOCS, Access, Guard, Policy, lmo_only, services
from livemig.security.pki import Role
from livemig.security.tls import INSECURE_STATE
from livemig.wire import lmo as wire_lmo
from livemig.wire.base import async_http
from livemig.wire.hostd import (
    CheckReply,
    ConsoleLine,
    IncomingLaunch,
    IncomingReply,
    MigrateRequest,
    ResumeReply,
    SourceMigrationStatus,
    VmLaunch,
    VmStatus,
)
from livemig.wire.lmo import AsyncLmoClient
from livemig.wire.server import install_error_handlers

log = logging.getLogger(__name__)
VMS_GAUGE = Gauge("livemig_host_vms", "VMs managed by this hostd", ["host"])


_LMO = services(Role.LMO)
#: who may call each route: the LMO drives everything; health and metrics for any service of the region
POLICY: Policy = {
    ("GET", "/healthz"): Access(ANY_SERVICE),
    ("GET", "/metrics"): Access(ANY_SERVICE),
    **{
        route: _LMO
        for route in (
            ("GET", "/host"), ("GET", "/vms"), ("POST", "/vms"), ("GET", "/vms/{name}"), ("DELETE", "/vms/{name}"),
            ("POST", "/vms/{name}/incoming"), ("POST", "/vms/{name}/migrate"), ("GET", "/vms/{name}/migration"),
            ("POST", "/vms/{name}/migration/flow-versions"), ("POST", "/vms/{name}/migration/cancel"),
            ("POST", "/vms/{name}/resume"), ("POST", "/vms/{name}/guest-check"), ("POST", "/vms/{name}/disk-check"),
            ("POST", "/vms/{name}/console"), ("GET", "/vms/{name}/console"),
        )
    },
    **{route: _LMO for route in (*FAULT_READS, *FAULT_CHANGES)},  # the LMO collects firings; chaos arms faults
}  # fmt: skip


async def register_with_lmo(agent: HostAgent, lmo_url: str, api_url: str) -> None:
    """Tell the LMO where this host is; retried until it answers (it may start after us)."""
    registration = HostRegistration(name=agent.name, api_url=api_url, migration_address=agent.migration_address,
                                    migration_bandwidth_mib_s=agent.migration_bandwidth_mib_s,
                                    vswitch_url=agent.ports.url, overlay=agent.overlay)  # fmt: skip
    async with async_http(timeout=5) as http:
        lmo = AsyncLmoClient(lmo_url, http)
        for _attempt in range(600):
            try:
                await lmo.run(wire_lmo.register_host(registration))
                log.info("registered with LMO at %s", lmo_url)
                return
            except HostUnreachable:
                pass
            except LivemigError as exc:
                log.warning("LMO refused registration: %s", exc.message)
            await asyncio.sleep(0.5)


def create_app(
    agent: HostAgent, lmo_url: str | None = None, api_url: str | None = None, *, insecure: bool = False
) -> FastAPI:
    """hostd's app; ``insecure`` (a lab's ``--insecure``) serves plain HTTP to anyone."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await agent.adopt()
        registration = None
        if lmo_url and api_url:
            registration = asyncio.create_task(register_with_lmo(agent, lmo_url, api_url))
        yield
        if registration is not None:
            registration.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registration
        await agent.close()

    guard = Guard(POLICY, host=agent.name, default=lmo_only)
    app = FastAPI(title=f"livemig hostd {agent.name}", lifespan=lifespan, dependencies=[Depends(guard)], **NO_DOCS)
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    mount_faults(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "host": agent.name}

    @app.get("/host")
    async def host() -> HostInfo:
        return agent.info()

    @app.get("/vms")
    async def list_vms() -> list[VmStatus]:
        return [await agent.status(name) for name in sorted(agent.vms)]

    @app.post("/vms", status_code=201)
    async def create_vm(launch: VmLaunch) -> VmStatus:
        vm = await agent.create(launch.spec, exports=launch.exports)
        return await agent.status(vm.spec.name)

    @app.get("/vms/{name}")
    async def get_vm(name: str) -> VmStatus:
        return await agent.status(name)

    @app.delete("/vms/{name}", status_code=204)
    async def delete_vm(name: str) -> Response:
        await agent.destroy(name)
        return Response(status_code=204)

    @app.post("/vms/{name}/incoming")
    async def incoming(name: str, launch: IncomingLaunch) -> IncomingReply:
        if launch.spec.name != name:
            raise InvalidRequest(f"path names VM {name!r} but the spec names {launch.spec.name!r}")
        uri = await agent.prepare_incoming(launch.spec, launch.exports, launch.policies, launch.tls_source)
        return IncomingReply(uri=uri)

    @app.post("/vms/{name}/migrate", status_code=202)
    async def migrate(name: str, body: MigrateRequest) -> SourceMigrationStatus:
        return await agent.migrate(name, body.uri, body.params, body.handoffs, body.tls_hostname)

    @app.get("/vms/{name}/migration")
    async def migration(name: str, since: int = 0) -> SourceMigrationStatus:
        return agent.migration_status(name, since)

    @app.post("/vms/{name}/migration/flow-versions", status_code=204)
    async def flow_versions(name: str, body: dict[str, int]) -> Response:
        """The LMO copied flow deltas during pre-copy: the pause need only send what came after."""
        agent.advance_flow_versions(name, body)
        return Response(status_code=204)

    @app.post("/vms/{name}/migration/cancel", status_code=204)
    async def cancel(name: str) -> Response:
        await agent.cancel_migration(name)
        return Response(status_code=204)

    @app.post("/vms/{name}/resume")
    async def resume(name: str) -> ResumeReply:
        return ResumeReply(state=await agent.resume(name))

    @app.post("/vms/{name}/guest-check")
    async def guest_check(name: str) -> CheckReply:
        ok, detail = await agent.guest_check(name)
        return CheckReply(ok=ok, detail=detail)

    @app.post("/vms/{name}/disk-check")
    async def disk_check(name: str) -> CheckReply:
        ok, detail = await agent.disk_check(name)
        return CheckReply(ok=ok, detail=detail)

    @app.post("/vms/{name}/console", status_code=204)
    async def console_input(name: str, body: ConsoleLine) -> Response:
        await agent.guest_command(name, body.line)
        return Response(status_code=204)

    @app.get("/vms/{name}/console", response_class=PlainTextResponse)
    async def console_output(name: str, tail: int = 50) -> str:
        log_path = agent.get(name).paths.console_log
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        return "\n".join(lines[-max(1, min(tail, 10000)) :]) + "\n"

    @app.get("/metrics")
    async def metrics() -> Response:
        VMS_GAUGE.labels(agent.name).set(len(agent.vms))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
