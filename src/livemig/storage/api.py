"""blockd's admin REST API (FastAPI): volumes, attachments, fencing, health and metrics.

The request and reply models are the boundary's, in ``livemig.wire.blockd``.

Every refusal is a ``LivemigError`` turned into a JSON body with the right status by
``install_error_handlers``: bad input 422, unknown name 404, a clash with current state 409.
Who may call: :data:`POLICY` (only the LMO manages volumes and fences attachments).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, Query, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from livemig.faults.api import FAULT_CHANGES, FAULT_READS, mount_faults
from livemig.faults.registry import REGISTRY
from livemig.security.access import ANY_SERVICE, NO_DOCS, Access, Guard, Policy, lmo_only, services
from livemig.security.pki import Role
from livemig.security.tls import INSECURE_STATE
from livemig.storage.blockd import Blockd
from livemig.storage.fencing import Attachment
from livemig.storage.metrics import BlockdCollector
from livemig.storage.volumes import Volume
from livemig.wire.blockd import (
    AttachmentView,
    AttachReply,
    AttachRequest,
    Health,
    VolumeCreate,
    VolumeResize,
    VolumeView,
)
from livemig.wire.server import install_error_handlers

_LMO = services(Role.LMO)
#: who may call each route: the LMO manages volumes and attachments and fences them; any
#: certificate of the region may ask health and metrics
POLICY: Policy = {
    ("GET", "/healthz"): Access(ANY_SERVICE),
    ("GET", "/metrics"): Access(ANY_SERVICE),
    **{
        route: _LMO
        for route in (
            ("POST", "/volumes"), ("GET", "/volumes"), ("GET", "/volumes/{name}"), ("POST", "/volumes/{name}/resize"),
            ("DELETE", "/volumes/{name}"), ("POST", "/volumes/{name}/attachments"),
            ("GET", "/volumes/{name}/attachments"), ("GET", "/attachments/{attachment_id}"),
            ("DELETE", "/attachments/{attachment_id}"), ("POST", "/attachments/{attachment_id}/fence"),
        )
    },
    **{route: _LMO for route in (*FAULT_READS, *FAULT_CHANGES)},  # the LMO collects firings; chaos arms faults
}  # fmt: skip


async def _point(name: str, attachment: Attachment | None = None, vm: str = "", host: str = "") -> None:
    """``blockd.attach|fence|detach`` (before acting) and their ``.after`` (acted, not yet answered)."""
    if REGISTRY.armed:
        if attachment is not None:
            vm, host = attachment.vm, attachment.host
        await REGISTRY.fire(name, vm=vm or None, host=host or None)


def create_app(blockd: Blockd, *, insecure: bool = False) -> FastAPI:
    """The admin API. Every route is ``async``: blockd's state lives in the event loop that also
    runs the NBD server, and FastAPI would run plain ``def`` routes in worker threads.
    ``insecure`` (a lab's ``--insecure``): plain HTTP for anyone."""
    app = FastAPI(title="livemig blockd", dependencies=[Depends(Guard(POLICY, default=lmo_only))], **NO_DOCS)
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    mount_faults(app)
    registry = CollectorRegistry()
    registry.register(BlockdCollector(blockd))
    started = time.time()

    def volume_view(volume: Volume) -> VolumeView:
        return VolumeView(
            name=volume.name,
            size_bytes=volume.size_bytes,
            allocated_bytes=blockd.volumes.allocated_bytes(volume.name),
            created_at=volume.created_at,
            attachments=len(blockd.fences.of_volume(volume.name)),
            writer=blockd.fences.writer_of(volume.name),
        )

    def attachment_view(a: Attachment) -> dict[str, Any]:
        c = a.counters
        return {
            "id": a.id,
            "volume": a.volume,
            "vm": a.vm,
            "host": a.host,
            "generation": a.generation,
            "created_at": a.created_at,
            "is_writer": blockd.fences.is_writer(a),
            "fenced": a.fenced,
            "fence_reason": a.fence_reason,
            "detached": a.detached,
            "connections": blockd.connections_of(a.id),
            "reads": c.reads,
            "writes": c.writes,
            "rejected_writes": c.rejected_writes,
            "flushes": c.flushes,
            "bytes_read": c.bytes_read,
            "bytes_written": c.bytes_written,
        }

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health(status="ok", uptime_s=round(time.time() - started, 3), volumes=len(blockd.volumes.list()),
                      nbd=f"{blockd.nbd_host}:{blockd.nbd_port}", fencing=blockd.fences.enabled,
                      nbd_tls=blockd.server is not None and blockd.server.tls is not None)  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/volumes", status_code=201)
    async def create_volume(body: VolumeCreate) -> VolumeView:
        return volume_view(blockd.create_volume(body.name, body.size_bytes, body.preallocate))

    @app.get("/volumes")
    async def list_volumes() -> list[VolumeView]:
        return [volume_view(v) for v in blockd.volumes.list()]

    @app.get("/volumes/{name}")
    async def get_volume(name: str) -> VolumeView:
        return volume_view(blockd.volumes.get(name))

    @app.post("/volumes/{name}/resize")
    async def resize_volume(name: str, body: VolumeResize) -> VolumeView:
        return volume_view(blockd.resize_volume(name, body.size_bytes))

    @app.delete("/volumes/{name}", status_code=204)
    async def delete_volume(name: str) -> Response:
        blockd.delete_volume(name)
        return Response(status_code=204)

    @app.post("/volumes/{name}/attachments", status_code=201)
    async def attach(name: str, body: AttachRequest) -> AttachReply:
        await _point("blockd.attach", vm=body.vm, host=body.host)
        result = blockd.attach(name, body.vm, body.host)
        await _point("blockd.attach.after", result.attachment)
        return AttachReply(
            **attachment_view(result.attachment),
            export_name=result.export_name,
            secret=result.secret,
            nbd_uri=result.nbd_uri,
        )

    @app.get("/volumes/{name}/attachments")
    async def list_attachments(name: str, include_detached: bool = Query(False)) -> list[AttachmentView]:
        blockd.volumes.get(name)
        found = blockd.fences.of_volume(name, include_detached=include_detached)
        return [AttachmentView(**attachment_view(a)) for a in found]

    @app.get("/attachments/{attachment_id}")
    async def get_attachment(attachment_id: str) -> AttachmentView:
        return AttachmentView(**attachment_view(blockd.fences.get(attachment_id)))

    @app.delete("/attachments/{attachment_id}", status_code=204)
    async def detach(attachment_id: str) -> Response:
        await _point("blockd.detach", blockd.fences.get(attachment_id))
        attachment = await blockd.detach(attachment_id)
        await _point("blockd.detach.after", attachment)
        return Response(status_code=204)

    @app.post("/attachments/{attachment_id}/fence")
    async def fence(attachment_id: str) -> AttachmentView:
        await _point("blockd.fence", blockd.fences.get(attachment_id))
        attachment = await blockd.fence(attachment_id)
        await _point("blockd.fence.after", attachment)
        return AttachmentView(**attachment_view(attachment))

    return app
