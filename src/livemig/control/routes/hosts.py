"""Hosts register themselves, report their capacity, go into maintenance and get evacuated."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from livemig.control.evacuation import evacuate
from livemig.control.services import ServicesDep
from livemig.errors import InvalidRequest, LivemigError
from livemig.model.host import HostRegistration
from livemig.wire import hostd
from livemig.wire.lmo import Evacuation, EvacuationReport, EvacuationRequest, HostView

router = APIRouter()


@router.put("/hosts/{name}")
async def register_host(name: str, body: HostRegistration, services: ServicesDep) -> HostRegistration:
    if body.name != name:
        raise InvalidRequest(f"path names host {name!r} but the body names {body.name!r}")
    services.store.upsert_host(body)
    return body


@router.get("/hosts")
async def hosts(services: ServicesDep) -> list[HostView]:
    async def view(reg: HostRegistration) -> HostView:
        try:
            return HostView(registration=reg, info=await services.host(reg.name).run(hostd.info()))
        except LivemigError as exc:
            return HostView(registration=reg, error=exc.message)

    return list(await asyncio.gather(*(view(reg) for reg in services.store.hosts())))


@router.put("/hosts/{name}/maintenance")
async def maintenance(name: str, on: bool, services: ServicesDep) -> HostRegistration:
    services.store.set_maintenance(name, on)
    return services.store.host(name)


@router.post("/hosts/{name}/evacuate", status_code=201)
async def evacuate_host(name: str, body: EvacuationRequest, services: ServicesDep) -> Evacuation:
    return await evacuate(services, name, body)


@router.get("/evacuations/{evacuation_id}")
async def get_evacuation(evacuation_id: str, services: ServicesDep) -> EvacuationReport:
    store = services.store
    evacuation = Evacuation.model_validate_json(store.evacuation(evacuation_id))
    migrations = [store.migration(i.migration) for i in evacuation.items if i.migration]
    return EvacuationReport(evacuation=evacuation, migrations=migrations, done=all(m.terminal for m in migrations))
