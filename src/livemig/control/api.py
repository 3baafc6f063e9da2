"""The LMO's REST API. Requests are validated synchronously (clear 4xx, nothing started);
accepted migrations are then driven by the controller in the background."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livemig.control.blockclient import BlockClient
from livemig.control.controller import CANCELLABLE, Controller, transition
from livemig.control.evacuation import Evacuation, EvacuationRequest, evacuate
from livemig.control.hostclient import HostClient
from livemig.control.network import KINDS, NetworkService, vm_vnics
from livemig.control.preflight import PreflightReport, preflight
from livemig.control.store import Store
from livemig.control.volumes import VolumeOps
from livemig.control.web import dashboard_router
from livemig.errors import CapacityError, Conflict, HostUnreachable, InvalidRequest, LivemigError, NotFound
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import Migration, MigrationRequest, Phase
from livemig.model.vm import VmSpec, VmStatus
from livemig.webutil import install_error_handlers

log = logging.getLogger(__name__)


class VmCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: VmSpec
    host: str | None = Field(default=None, description="place on this host; default: most free memory")


class VmView(BaseModel):
    name: str
    host: str
    spec: VmSpec
    observed: VmStatus | None = None
    error: str | None = None


class HostView(BaseModel):
    registration: HostRegistration
    info: HostInfo | None = None
    error: str | None = None


class EvacuationReport(BaseModel):
    evacuation: Evacuation
    migrations: list[Migration]
    done: bool


class NetKind(enum.StrEnum):
    vcns = "vcns"
    subnets = "subnets"
    vnics = "vnics"
    security_lists = "security-lists"


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    size_bytes: int = Field(gt=0, le=1 << 50)


class ConsoleLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: str = Field(max_length=200)


def create_app(
    store: Store,
    *,
    controller_interval_s: float = 0.1,
    transport: httpx.AsyncBaseTransport | None = None,
    blockd_url: str | None = None,
) -> FastAPI:
    """The LMO app; ``transport`` replaces the network to hosts in fast tests (fake hostd)."""
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=3.0), transport=transport)
        block = BlockClient(blockd_url, client) if blockd_url else None
        state["client"], state["volumes"] = client, VolumeOps(store, block)
        state["network"] = NetworkService(store, client)
        controller = Controller(store, client, controller_interval_s, volumes=VolumeOps(store, block))
        task = asyncio.create_task(controller.run_forever(), name="controller")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()

    app = FastAPI(title="livemig LMO", lifespan=lifespan)
    install_error_handlers(app)

    def volume_ops() -> VolumeOps:
        ops = state["volumes"]
        assert isinstance(ops, VolumeOps)
        return ops

    def network() -> NetworkService:
        service = state["network"]
        assert isinstance(service, NetworkService)
        return service

    async def push_network() -> None:
        try:
            await network().push()
        except LivemigError as exc:  # an unreachable vswitch gets the mapping on the next push
            log.warning("mapping push incomplete: %s", exc.message)

    def block_client() -> BlockClient:
        block = volume_ops().block
        if block is None:
            raise InvalidRequest("the LMO runs without blockd (start it with --blockd URL)")
        return block

    def host_client(name: str) -> HostClient:
        client = state["client"]
        assert isinstance(client, httpx.AsyncClient)
        return HostClient(store.host(name), client)

    async def host_view(reg: HostRegistration) -> HostView:
        try:
            return HostView(registration=reg, info=await host_client(reg.name).info())
        except LivemigError as exc:
            return HostView(registration=reg, error=exc.message)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.put("/hosts/{name}")
    async def register_host(name: str, body: HostRegistration) -> HostRegistration:
        if body.name != name:
            raise InvalidRequest(f"path names host {name!r} but the body names {body.name!r}")
        store.upsert_host(body)
        return body

    @app.get("/hosts")
    async def hosts() -> list[HostView]:
        return list(await asyncio.gather(*(host_view(reg) for reg in store.hosts())))

    @app.post("/vms", status_code=201)
    async def create_vm(body: VmCreate) -> VmView:
        spec = body.spec
        with contextlib.suppress(NotFound):
            store.vm(spec.name)
            raise Conflict(f"VM name {spec.name!r} is already taken", vm=spec.name)
        views = [v for v in await hosts() if v.info is not None and not v.registration.maintenance]
        if body.host is not None:
            if store.host(body.host).maintenance:  # 404 for an unknown host
                raise Conflict(f"host {body.host} is in maintenance: no new VMs")
            views = [v for v in views if v.registration.name == body.host]
            if not views:
                raise HostUnreachable(f"host {body.host} does not answer")
        fitting = [v for v in views if v.info and v.info.memory_free_mib >= spec.memory_mib]
        if not fitting:
            best = max((v.info.memory_free_mib for v in views if v.info), default=0)
            raise CapacityError(f"no host can hold {spec.memory_mib} MiB (most free: {best} MiB)")
        target = max(fitting, key=lambda v: v.info.memory_free_mib if v.info else 0).registration.name
        boot_args = network().guest_boot_args(spec)  # also checks NIC MACs against their VNICs
        if boot_args:
            spec = spec.model_copy(update={"boot": spec.boot.model_copy(
                update={"append": " ".join(p for p in (spec.boot.append, boot_args) if p)})})  # fmt: skip
        store.add_vm(spec, target)  # claims the name before the slow boot
        try:
            if vm_vnics(spec):
                network().place(vm_vnics(spec), target)
                await network().push()
            exports = await volume_ops().ensure_attached(spec, target)
            observed = await host_client(target).create_vm(spec, exports)
        except LivemigError:
            with contextlib.suppress(LivemigError):
                await volume_ops().detach(spec.name, target)
            store.remove_vm(spec.name)
            raise
        store.set_vm(spec.name, spec=observed.spec)  # the resolved spec (machine, boot files)
        return VmView(name=spec.name, host=target, spec=observed.spec, observed=observed)

    async def vm_view(spec: VmSpec, host: str) -> VmView:
        try:
            observed = await host_client(host).vm(spec.name)
            return VmView(name=spec.name, host=host, spec=spec, observed=observed,
                          error=None if observed else f"not found on {host}")  # fmt: skip
        except LivemigError as exc:
            return VmView(name=spec.name, host=host, spec=spec, error=exc.message)

    @app.get("/vms")
    async def list_vms() -> list[VmView]:
        return list(await asyncio.gather(*(vm_view(spec, host) for spec, host in store.vms())))

    @app.get("/vms/{name}")
    async def get_vm(name: str) -> VmView:
        spec, host = store.vm(name)
        return await vm_view(spec, host)

    @app.delete("/vms/{name}", status_code=204)
    async def delete_vm(name: str) -> Response:
        _spec, host = store.vm(name)
        if store.migrations(active_only=True, vm=name):
            raise Conflict(f"VM {name!r} is migrating; cancel the migration first")
        await host_client(host).destroy_vm(name)
        await volume_ops().detach(name, host)
        spec, _ = store.vm(name)
        store.remove_vm(name)
        if vm_vnics(spec):
            network().place(vm_vnics(spec), "")
            await push_network()
        return Response(status_code=204)

    @app.put("/network/{kind}/{object_id}")
    async def put_netobject(kind: NetKind, object_id: str, body: dict[str, Any]) -> dict[str, Any]:
        model = KINDS[kind.value]
        try:
            obj = model.model_validate({**body, "id": object_id} if "id" not in body else body)
        except ValidationError as exc:
            raise InvalidRequest(f"{kind.value}: {exc.errors()[0].get('msg')} at "
                                 f"{'.'.join(str(p) for p in exc.errors()[0].get('loc', ()))}") from None  # fmt: skip
        if getattr(obj, "id", object_id) != object_id:
            raise InvalidRequest(f"path names {object_id!r} but the body names {obj.id!r}")  # type: ignore[attr-defined]
        network().put(kind.value, obj)
        await push_network()
        return obj.model_dump()

    @app.get("/network/{kind}")
    async def list_netobjects(kind: NetKind) -> list[dict[str, Any]]:
        return [o.model_dump() for o in network().objects(kind.value)]

    @app.get("/network/{kind}/{object_id}")
    async def get_netobject(kind: NetKind, object_id: str) -> dict[str, Any]:
        return dict(network().get(kind.value, object_id).model_dump())

    @app.delete("/network/{kind}/{object_id}", status_code=204)
    async def delete_netobject(kind: NetKind, object_id: str) -> Response:
        network().delete(kind.value, object_id)
        await push_network()
        return Response(status_code=204)

    @app.post("/volumes", status_code=201)
    async def create_volume(body: VolumeCreate) -> dict[str, object]:
        return await block_client().create_volume(body.name, body.size_bytes)

    @app.get("/volumes")
    async def list_volumes() -> list[dict[str, object]]:
        return await block_client().volumes()

    @app.get("/volumes/{name}")
    async def get_volume(name: str) -> dict[str, object]:
        return {**await block_client().volume(name), "attachments": await block_client().attachments(name)}

    @app.delete("/volumes/{name}", status_code=204)
    async def delete_volume(name: str) -> Response:
        await block_client().delete_volume(name)
        return Response(status_code=204)

    @app.get("/vms/{name}/console", response_class=PlainTextResponse)
    async def console(name: str, tail: int = 50) -> str:
        _spec, host = store.vm(name)
        return await host_client(host).console(name, tail)

    @app.post("/vms/{name}/console", status_code=204)
    async def console_input(name: str, body: ConsoleLine) -> Response:
        _spec, host = store.vm(name)
        await host_client(host).console_input(name, body.line)
        return Response(status_code=204)

    @app.post("/vms/{name}/guest-check")
    async def guest_check(name: str) -> dict[str, object]:
        _spec, host = store.vm(name)
        ok, detail = await host_client(host).guest_check(name)
        return {"ok": ok, "detail": detail, "host": host}

    def all_hosts() -> dict[str, HostClient]:
        return {reg.name: host_client(reg.name) for reg in store.hosts()}

    @app.post("/migrations/preflight")
    async def dry_run(body: MigrationRequest) -> PreflightReport:
        return await preflight(store, all_hosts(), body.vm, body.destination, volume_ops().block)

    @app.post("/migrations", status_code=201)
    async def create_migration(body: MigrationRequest) -> Migration:
        report = await preflight(store, all_hosts(), body.vm, body.destination, volume_ops().block)
        report.raise_first_failure()
        source = report.source
        migration = Migration(id=f"m-{uuid.uuid4().hex[:10]}", vm=body.vm, source=source,
                              destination=body.destination, params=body.params,
                              verify_guest=body.verify_guest)  # fmt: skip
        transition(migration, Phase.PENDING, f"requested: {body.vm} {source} -> {body.destination}")
        store.add_migration(migration)
        return migration

    @app.get("/migrations")
    async def list_migrations(vm: str | None = None, active: bool = False) -> list[Migration]:
        return store.migrations(active_only=active, vm=vm)

    @app.get("/migrations/{migration_id}")
    async def get_migration(migration_id: str) -> Migration:
        return store.migration(migration_id)

    @app.post("/migrations/{migration_id}/cancel", status_code=202)
    async def cancel_migration(migration_id: str) -> Migration:
        migration = store.migration(migration_id)
        if migration.terminal:
            raise Conflict(f"migration {migration_id} already ended ({migration.phase.value})")
        if migration.phase not in CANCELLABLE:
            raise Conflict(f"migration {migration_id} is past the point of no return ({migration.phase.value})")
        store.request_cancel(migration_id)
        return store.migration(migration_id)

    @app.post("/hosts/{name}/evacuate", status_code=201)
    async def evacuate_host(name: str, body: EvacuationRequest) -> Evacuation:
        return await evacuate(store, all_hosts(), name, body)

    @app.get("/evacuations/{evacuation_id}")
    async def get_evacuation(evacuation_id: str) -> EvacuationReport:
        evacuation = Evacuation.model_validate_json(store.evacuation(evacuation_id))
        migrations = [store.migration(i.migration) for i in evacuation.items if i.migration]
        return EvacuationReport(evacuation=evacuation, migrations=migrations,
                                done=all(m.terminal for m in migrations))  # fmt: skip

    @app.put("/hosts/{name}/maintenance")
    async def maintenance(name: str, on: bool) -> HostRegistration:
        store.set_maintenance(name, on)
        return store.host(name)

    app.include_router(dashboard_router(store, host_info=lambda name: host_client(name).info()))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
