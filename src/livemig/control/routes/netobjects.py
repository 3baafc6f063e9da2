"""The virtual network's objects (VCNs, subnets, security lists, VNICs): every change is checked
against the whole topology, stored, and pushed to every vswitch."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import ValidationError

from livemig.control.network import KINDS
from livemig.control.services import ServicesDep
from livemig.errors import InvalidRequest
from livemig.wire.lmo import NetKind

router = APIRouter()


@router.put("/network/{kind}/{object_id}")
async def put_object(kind: NetKind, object_id: str, body: dict[str, Any], services: ServicesDep) -> dict[str, Any]:
    model = KINDS[kind.value]
    try:
        obj = model.model_validate({**body, "id": object_id} if "id" not in body else body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"{kind.value}: {first.get('msg')} at {where}") from None
    if getattr(obj, "id", object_id) != object_id:
        raise InvalidRequest(f"path names {object_id!r} but the body names {getattr(obj, 'id', None)!r}")
    services.network.put(kind.value, obj)
    await services.network.push_best_effort()
    return obj.model_dump()


@router.get("/network/{kind}")
async def list_objects(kind: NetKind, services: ServicesDep) -> list[dict[str, Any]]:
    return [o.model_dump() for o in services.network.objects(kind.value)]


@router.get("/network/{kind}/{object_id}")
async def get_object(kind: NetKind, object_id: str, services: ServicesDep) -> dict[str, Any]:
    return dict(services.network.get(kind.value, object_id).model_dump())


@router.delete("/network/{kind}/{object_id}", status_code=204)
async def delete_object(kind: NetKind, object_id: str, services: ServicesDep) -> Response:
    services.network.delete(kind.value, object_id)
    await services.network.push_best_effort()
    return Response(status_code=204)
