"""Hosts register themselves and report their capacity, go into maintenance and get evacuated
(one host, or a wave of many, planned before anything moves)."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter

from livemig.control.evacuation import evacuate, plan_wave, report
from livemig.control.services import ServicesDep
from livemig.errors import InvalidRequest, LivemigError
from livemig.model.host import HostRegistration
from livemig.wire import hostd
from livemig.wire.hostd import HostdClient
from livemig.wire.lmo import (
    Evacuation,
    EvacuationReport,
    EvacuationRequest,
    HostInventory,
    HostView,
    WavePlan,
    WaveRequest,
)

router = APIRouter()

#: how long registration waits for an older hostd to say what it holds
CAPACITY_QUERY_TIMEOUT_S = 3.0


@router.put("/hosts/{name}")
async def register_host(name: str, body: HostRegistration, services: ServicesDep) -> HostRegistration:
    """A hostd registers, and registers again whenever what it holds changes. A registration
    without capacity (an older hostd) is completed by asking the host once, if it answers."""
    if body.name != name:
        raise InvalidRequest(f"path names host {name!r} but the body names {body.name!r}")
    if body.memory_mib is None:
        try:
            ask = dataclasses.replace(hostd.info(), timeout=CAPACITY_QUERY_TIMEOUT_S)
            info = await HostdClient(body, services.http).run(ask)
            body = body.model_copy(update={"memory_mib": info.memory_mib, "memory_used_mib": info.memory_used_mib,
                                           "accel": info.accel, "qemu_version": info.qemu_version,
                                           "machines": info.machines})  # fmt: skip
        except LivemigError:
            pass  # placed on only when named, until it reports
    services.store.upsert_host(body)
    services.forget(name)
    return body


@router.get("/hosts")
async def hosts(services: ServicesDep, observe: bool = True) -> list[HostView]:
    """Every host with the LMO's inventory of it, and (``observe``, the default) what it reports."""
    inventory = {c.name: c for c in services.store.capacities()}

    def held(reg: HostRegistration) -> HostInventory | None:
        c = inventory.get(reg.name)
        return (
            None
            if c is None
            else HostInventory(
                memory_mib=c.memory_mib,
                placed_mib=c.placed_mib,
                reported_used_mib=c.reported_used_mib,
                free_mib=c.free_mib,
            )
        )

    async def view(reg: HostRegistration) -> HostView:
        if not observe:
            return HostView(registration=reg, inventory=held(reg))
        try:
            info = await services.host(reg.name).run(hostd.info())
            return HostView(registration=reg, info=info, inventory=held(reg))
        except LivemigError as exc:
            return HostView(registration=reg, error=exc.message, inventory=held(reg))

    return list(await asyncio.gather(*(view(reg) for reg in services.store.hosts())))


@router.put("/hosts/{name}/maintenance")
async def maintenance(name: str, on: bool, services: ServicesDep) -> HostRegistration:
    services.store.set_maintenance(name, on)
    services.forget(name)
    return services.store.host(name)


@router.post("/hosts/{name}/evacuate", status_code=201)
async def evacuate_host(name: str, body: EvacuationRequest, services: ServicesDep) -> Evacuation:
    return await evacuate(services, WaveRequest(hosts=[name], limits=body.limits, params=body.params))


@router.post("/evacuations", status_code=201)
async def start_wave(body: WaveRequest, services: ServicesDep) -> Evacuation:
    """Evacuate every host of ``body.hosts`` at once: all go into maintenance, every VM is placed
    on the other hosts, and the plan is kept beside the evacuation to compare with what happens."""
    return await evacuate(services, body)


@router.post("/evacuations/plan")
async def plan(body: WaveRequest, services: ServicesDep) -> WavePlan:
    """What evacuating ``body.hosts`` would do and how long it would take; nothing changes."""
    return await plan_wave(services, body)


@router.get("/evacuations/{evacuation_id}")
async def get_evacuation(evacuation_id: str, services: ServicesDep) -> EvacuationReport:
    return report(services, evacuation_id)
