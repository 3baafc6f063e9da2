"""Volumes on blockd, through the LMO: create, list, inspect (with attachments), grow, delete, and
the transfers through which images are copied in and out (``control/transfers.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from livemig.control.services import ServicesDep
from livemig.errors import Conflict
from livemig.wire import blockd
from livemig.wire.blockd import VolumeCreate, VolumeResize, VolumeView
from livemig.wire.lmo import Transfer, TransferRenew, TransferRequest, VolumeDetail

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


@router.post("/volumes/{name}/resize")
async def resize_volume(name: str, body: VolumeResize, services: ServicesDep) -> VolumeView:
    """Grow a volume nothing has attached: a connected client would keep the size it negotiated."""
    block = services.block
    for attachment in await block.run(blockd.attachments(name)):
        raise Conflict(f"volume {name!r} is attached to {attachment.vm} on {attachment.host}: grow it while "
                       "nothing has it attached", volume=name)  # fmt: skip
    return await block.run(blockd.resize_volume(name, body.size_bytes))


@router.delete("/volumes/{name}", status_code=204)
async def delete_volume(name: str, services: ServicesDep) -> Response:
    await services.block.run(blockd.delete_volume(name))
    return Response(status_code=204)


@router.post("/volumes/{name}/transfers", status_code=201)
async def open_transfer(name: str, body: TransferRequest, services: ServicesDep) -> Transfer:
    return await services.transfers.open(name, body)


@router.get("/transfers/{transfer_id}")
async def get_transfer(transfer_id: str, services: ServicesDep) -> Transfer:
    return services.transfers.get(transfer_id)


@router.post("/transfers/{transfer_id}/renew")
async def renew_transfer(transfer_id: str, body: TransferRenew, services: ServicesDep) -> Transfer:
    return services.transfers.renew(transfer_id, body.ttl_s)


@router.delete("/transfers/{transfer_id}", status_code=204)
async def close_transfer(transfer_id: str, services: ServicesDep) -> Response:
    await services.transfers.close(transfer_id)
    return Response(status_code=204)
