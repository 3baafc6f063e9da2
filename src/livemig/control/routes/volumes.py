"""Volumes on blockd, through the LMO: create, list, inspect (with attachments), delete."""

from __future__ import annotations

from fastapi import APIRouter, Response

from livemig.control.services import ServicesDep
from livemig.wire import blockd
from livemig.wire.blockd import VolumeCreate, VolumeView
from livemig.wire.lmo import VolumeDetail

router = APIRouter()


@router.post("/volumes", status_code=201)
async def create_volume(body: VolumeCreate, services: ServicesDep) -> VolumeView:
    return await services.block.run(blockd.create_volume(body.name, body.size_bytes, body.preallocate))


@router.get("/volumes")
async def list_volumes(services: ServicesDep) -> list[VolumeView]:
    return await services.block.run(blockd.volumes())


@router.get("/volumes/{name}")
async def get_volume(name: str, services: ServicesDep) -> VolumeDetail:
    block = services.block
    return VolumeDetail(
        volume=await block.run(blockd.volume(name)), attachments=await block.run(blockd.attachments(name))
    )


@router.delete("/volumes/{name}", status_code=204)
async def delete_volume(name: str, services: ServicesDep) -> Response:
    await services.block.run(blockd.delete_volume(name))
    return Response(status_code=204)
