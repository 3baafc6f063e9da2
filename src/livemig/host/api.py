"""hostd's REST API (FastAPI). Observed state out, idempotent actions in.

The routes and their models are the boundary's, in ``livemig.wire.hostd``. They are one
:data:`router` whose handlers receive their host's agent through a dependency: a real hostd is
one app around one agent (:func:`create_app`), and the fleet simulator serves thousands of
simulated hosts from one app with the very same routes (:func:`create_fleet_app`), because an app
per host costs about a megabyte and tens of milliseconds to build. Who may call them:
:data:`POLICY` (only the LMO drives a hostd; any certificate of the region may ask its health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livemig.errors import HostUnreachable, InvalidRequest, LivemigError
from livemig.faults.api import FAULT_CHANGES, FAULT_READS, mount_faults
from livemig.host.agent import HostAgent
from livemig.host.metrics import host_registry
from livemig.model.host import HostInfo, HostRegistration
from livemig.security.access import ANY_SERVICE, NO_DOCS, Access, Guard, Policy, lmo_only, services
from livemig.security.pki import Role
from livemig.security.tls import INSECURE_STATE
from livemig.wire import lmo as wire_lmo
from livemig.wire.base import AsyncHttp, async_http
from livemig.wire.hostd import (
    CheckReply,
    ConsoleLine,
    DirtyRateReply,
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
#: after a change of the VMs it runs, hostd tells the LMO its capacity at most this often
REPORT_INTERVAL_S = 1.0

#: how an app finds the agent a request is for (one agent, or one of a simulated fleet)
AgentResolver = Callable[[Request], HostAgent]

_LMO = services(Role.LMO)
#: who may call each route: the LMO drives everything; health and metrics for any service of the region
POLICY: Policy = {
    ("GET", "/healthz"): Access(ANY_SERVICE),
    ("GET", "/metrics"): Access(ANY_SERVICE),
    **{
        route: _LMO
        for route in (
            ("GET", "/host"), ("POST", "/host/dirty-rates"), ("GET", "/vms"), ("POST", "/vms"), ("GET", "/vms/{name}"),
            ("DELETE", "/vms/{name}"), ("POST", "/vms/{name}/incoming"), ("POST", "/vms/{name}/migrate"),
            ("GET", "/vms/{name}/migration"), ("POST", "/vms/{name}/migration/flow-versions"),
            ("POST", "/vms/{name}/migration/cancel"), ("POST", "/vms/{name}/resume"), ("POST", "/vms/{name}/hold"),
            ("POST", "/vms/{name}/dirty-rate"), ("POST", "/vms/{name}/guest-check"),
            ("POST", "/vms/{name}/disk-check"), ("POST", "/vms/{name}/console"), ("GET", "/vms/{name}/console"),
        )
    },
    **{route: _LMO for route in (*FAULT_READS, *FAULT_CHANGES)},  # the LMO collects firings; chaos arms faults
}  # fmt: skip


def registration_of(agent: HostAgent, api_url: str) -> HostRegistration:
    """What hostd tells the LMO about itself: where to reach it and what it can hold now. Built
    from the agent's fields, not from ``HostInfo``, which also scans the firmware catalog: the
    fleet simulator builds one per capacity change of each of its thousands of hosts."""
    return HostRegistration(name=agent.name, api_url=api_url, migration_address=agent.migration_address,
                            migration_bandwidth_mib_s=agent.migration_bandwidth_mib_s,
                            vswitch_url=agent.ports.url, overlay=agent.overlay, memory_mib=agent.memory_mib,
                            memory_used_mib=agent.memory_used_mib, accel=agent.accel.name,
                            qemu_version=agent.runtime.version(), machines=agent.machines())  # fmt: skip


async def register_with_lmo(agent: HostAgent, lmo_url: str, api_url: str, interval_s: float = REPORT_INTERVAL_S,
                            http: AsyncHttp | None = None,
                            on_registered: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Tell the LMO where this host is and what it can hold (retried until it answers: it may
    start after us), then again whenever the memory its VMs use changes, at most every
    ``interval_s``: the LMO places VMs from what hosts report, never by asking every host.
    ``http``: a client to share (the fleet simulator runs thousands of these). A wake compares
    two numbers and builds a registration only when they changed."""
    async with contextlib.AsyncExitStack() as stack:
        client: AsyncHttp = http if http is not None else await stack.enter_async_context(async_http(timeout=5))
        lmo = AsyncLmoClient(lmo_url, client)
        reported: tuple[int, int] | None = None
        while True:
            current = (agent.memory_mib, agent.memory_used_mib)
            if current != reported:
                try:
                    await lmo.run(wire_lmo.register_host(registration_of(agent, api_url)))
                    if reported is None:
                        log.info("registered with LMO at %s", lmo_url)
                        if on_registered is not None:
                            on_registered()
                    reported = current
                except HostUnreachable:
                    pass
                except LivemigError as exc:
                    log.warning("LMO refused registration: %s", exc.message)
            if reported is None:
                await asyncio.sleep(0.5)
                continue
            agent.changed.clear()
            if (agent.memory_mib, agent.memory_used_mib) == reported:
                await agent.changed.wait()
            await asyncio.sleep(interval_s)


async def get_agent(request: Request) -> HostAgent:
    """FastAPI dependency: the agent this request is for."""
    resolve: AgentResolver = request.app.state.resolve_agent
    return resolve(request)


AgentDep = Annotated[HostAgent, Depends(get_agent)]
router = APIRouter()


@router.get("/healthz")
async def healthz(agent: AgentDep) -> dict[str, str]:
    return {"status": "ok", "host": agent.name}


@router.get("/host")
async def host(agent: AgentDep) -> HostInfo:
    return agent.info()


@router.post("/host/dirty-rates")
async def dirty_rates(agent: AgentDep, names: list[str] | None = None, seconds: float = 1.0) -> list[DirtyRateReply]:
    """The dirty rates of this host's VMs (``names``: only those), measured at the same time."""
    return await agent.dirty_rates(names, seconds)


@router.get("/vms")
async def list_vms(agent: AgentDep) -> list[VmStatus]:
    return [await agent.status(name) for name in sorted(agent.vms)]


@router.post("/vms", status_code=201)
async def create_vm(launch: VmLaunch, agent: AgentDep) -> VmStatus:
    vm = await agent.create(launch.spec, exports=launch.exports)
    return await agent.status(vm.spec.name)


@router.get("/vms/{name}")
async def get_vm(name: str, agent: AgentDep) -> VmStatus:
    return await agent.status(name)


@router.delete("/vms/{name}", status_code=204)
async def delete_vm(name: str, agent: AgentDep) -> Response:
    await agent.destroy(name)
    return Response(status_code=204)


@router.post("/vms/{name}/incoming")
async def incoming(name: str, launch: IncomingLaunch, agent: AgentDep) -> IncomingReply:
    if launch.spec.name != name:
        raise InvalidRequest(f"path names VM {name!r} but the spec names {launch.spec.name!r}")
    uri = await agent.prepare_incoming(launch.spec, launch.exports, launch.policies, launch.tls_source)
    return IncomingReply(uri=uri)


@router.post("/vms/{name}/migrate", status_code=202)
async def migrate(name: str, body: MigrateRequest, agent: AgentDep) -> SourceMigrationStatus:
    return await agent.migrate(name, body.uri, body.params, body.handoffs, body.tls_hostname)


@router.get("/vms/{name}/migration")
async def migration(name: str, agent: AgentDep, since: int = 0) -> SourceMigrationStatus:
    return agent.migration_status(name, since)


@router.post("/vms/{name}/migration/flow-versions", status_code=204)
async def flow_versions(name: str, body: dict[str, int], agent: AgentDep) -> Response:
    """The LMO copied flow deltas during pre-copy: the pause need only send what came after."""
    agent.advance_flow_versions(name, body)
    return Response(status_code=204)


@router.post("/vms/{name}/migration/cancel", status_code=204)
async def cancel(name: str, agent: AgentDep) -> Response:
    await agent.cancel_migration(name)
    return Response(status_code=204)


@router.post("/vms/{name}/resume")
async def resume(name: str, agent: AgentDep) -> ResumeReply:
    return ResumeReply(state=await agent.resume(name))


@router.post("/vms/{name}/hold")
async def hold(name: str, agent: AgentDep) -> VmStatus:
    """An incoming VM: never run the guest by itself (see ``HostAgent.hold_incoming``)."""
    return await agent.hold_incoming(name)


@router.post("/vms/{name}/dirty-rate")
async def dirty_rate(name: str, agent: AgentDep, seconds: float = 1.0) -> DirtyRateReply:
    """How fast the guest dirties its memory now (QEMU's calc-dirty-rate over ``seconds``)."""
    return await agent.dirty_rate(name, seconds)


@router.post("/vms/{name}/guest-check")
async def guest_check(name: str, agent: AgentDep) -> CheckReply:
    ok, detail = await agent.guest_check(name)
    return CheckReply(ok=ok, detail=detail)


@router.post("/vms/{name}/disk-check")
async def disk_check(name: str, agent: AgentDep) -> CheckReply:
    ok, detail = await agent.disk_check(name)
    return CheckReply(ok=ok, detail=detail)


@router.post("/vms/{name}/console", status_code=204)
async def console_input(name: str, body: ConsoleLine, agent: AgentDep) -> Response:
    await agent.guest_command(name, body.line)
    return Response(status_code=204)


@router.get("/vms/{name}/console", response_class=PlainTextResponse)
async def console_output(name: str, agent: AgentDep, tail: int = 50) -> str:
    log_path = agent.get(name).paths.console_log
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return "\n".join(lines[-max(1, min(tail, 10000)) :]) + "\n"


@router.get("/metrics")
async def metrics(agent: AgentDep) -> Response:
    """The process's series (Python's own) and this host's (``host/metrics.py``)."""
    return Response(generate_latest() + generate_latest(host_registry(agent)), media_type=CONTENT_TYPE_LATEST)


def create_app(
    agent: HostAgent, lmo_url: str | None = None, api_url: str | None = None, *, insecure: bool = False
) -> FastAPI:
    """One hostd: the routes around ``agent``; with ``lmo_url``, it registers and reports there.
    ``insecure`` (a lab's ``--insecure``) serves plain HTTP to anyone."""

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
    app.state.resolve_agent = lambda _request: agent
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    mount_faults(app)
    app.include_router(router)
    return app


def create_fleet_app(resolve: AgentResolver, prefix: str = "", *, insecure: bool = False) -> FastAPI:
    """hostd's routes for many agents at once (the fleet simulator): ``resolve`` picks the agent
    of each request, e.g. by a ``{host}`` path parameter in ``prefix``. One guard serves every
    simulated host: hostd's rules name no host."""
    guard = Guard(POLICY, default=lmo_only)  # under a prefix every route is the LMO's (health too)
    app = FastAPI(title="livemig hostd", dependencies=[Depends(guard)], **NO_DOCS)
    app.state.resolve_agent = resolve
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    app.include_router(router, prefix=prefix)
    return app
