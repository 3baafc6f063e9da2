"""VMs: create (placed, then booted on a host), observe, delete; their console and guest check."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from livemig.control.network import vm_vnics
from livemig.control.placement import place_and_start
from livemig.control.services import Services, ServicesDep
from livemig.control.volumes import name_own_volumes, own_volumes
from livemig.errors import Conflict, LivemigError
from livemig.model.vm import VmSpec
from livemig.wire import hostd
from livemig.wire.hostd import ConsoleLine, VmStatus
from livemig.wire.lmo import GuestCheckReply, VmCreate, VmView

router = APIRouter()


@router.post("/vms", status_code=201)
async def create_vm(body: VmCreate, services: ServicesDep) -> VmView:
    store, network = services.store, services.network
    spec = body.spec
    boot_args = network.guest_boot_args(spec)  # also checks NIC MACs against their VNICs
    if boot_args and spec.firmware is None:  # a guest booted by firmware asks the vswitch's DHCP
        spec = spec.model_copy(update={"boot": spec.boot.model_copy(
            update={"append": " ".join(p for p in (spec.boot.append, boot_args) if p)})})  # fmt: skip
    spec = name_own_volumes(spec)
    created: list[str] = []

    async def start(target: str) -> VmStatus:
        try:
            if not created:
                created.extend(await services.volumes.create_own(spec))  # NVRAM, seed: hostd fills them
            if vm_vnics(spec):
                network.place(vm_vnics(spec), target)
                await network.push()
            exports = await services.volumes.ensure_attached(spec, target)
            return await services.host(target).run(hostd.create_vm(spec, exports))
        except LivemigError:
            with contextlib.suppress(LivemigError):
                await services.volumes.detach(spec.name, target)
            raise

    # the name and the room are claimed in the store before the slow boot
    try:
        target, observed = await place_and_start(services, spec, body.host, start)
    except LivemigError:
        with contextlib.suppress(LivemigError):
            await services.volumes.delete_volumes(created)
        raise
    await asyncio.to_thread(store.set_vm, spec.name, spec=observed.spec)  # the resolved spec (machine, boot files)
    return VmView(name=spec.name, host=target, spec=observed.spec, observed=observed)


async def _view(services: Services, spec: VmSpec, host: str) -> VmView:
    try:
        observed = await services.host(host).observe(spec.name)
        return VmView(name=spec.name, host=host, spec=spec, observed=observed,
                      error=None if observed else f"not found on {host}")  # fmt: skip
    except LivemigError as exc:
        return VmView(name=spec.name, host=host, spec=spec, error=exc.message)


@router.get("/vms")
async def list_vms(services: ServicesDep, host: str | None = None, observe: bool = True) -> list[VmView]:
    """Every VM (or those on ``host``), each as its host observes it (``observe=false``: as the
    LMO knows it, without asking the hosts)."""
    vms = services.store.vms(host)
    if not observe:
        return [VmView(name=spec.name, host=owner, spec=spec) for spec, owner in vms]
    return list(await asyncio.gather(*(_view(services, spec, owner) for spec, owner in vms)))


@router.get("/vms/{name}")
async def get_vm(name: str, services: ServicesDep) -> VmView:
    spec, host = services.store.vm(name)
    return await _view(services, spec, host)


@router.delete("/vms/{name}", status_code=204)
async def delete_vm(name: str, services: ServicesDep) -> Response:
    store = services.store
    spec, host = store.vm(name)
    if store.migrations(active_only=True, vm=name):
        raise Conflict(f"VM {name!r} is migrating; cancel the migration first")
    await services.host(host).run(hostd.destroy_vm(name))
    await services.volumes.detach(name, host)
    await services.volumes.delete_volumes(list(own_volumes(spec)))  # its NVRAM and seed go with it
    store.remove_vm(name)
    if vm_vnics(spec):
        services.network.place(vm_vnics(spec), "")
        await services.network.push_best_effort()
    return Response(status_code=204)


@router.get("/vms/{name}/console", response_class=PlainTextResponse)
async def console(name: str, services: ServicesDep, tail: int = 50) -> str:
    _spec, host = services.store.vm(name)
    return await services.host(host).run(hostd.console(name, tail))


@router.post("/vms/{name}/console", status_code=204)
async def console_input(name: str, body: ConsoleLine, services: ServicesDep) -> Response:
    _spec, host = services.store.vm(name)
    await services.host(host).run(hostd.console_input(name, body.line))
    return Response(status_code=204)


@router.post("/vms/{name}/guest-check")
async def guest_check(name: str, services: ServicesDep) -> GuestCheckReply:
    _spec, host = services.store.vm(name)
    reply = await services.host(host).run(hostd.guest_check(name))
    return GuestCheckReply(ok=reply.ok, detail=reply.detail, host=host)
