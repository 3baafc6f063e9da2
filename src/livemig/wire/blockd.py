"""The blockd boundary (LMO → blockd admin API): volumes, attachments, fencing.

An attachment is one host's right to a volume: its own NBD export name with a secret, and a
generation that fencing compares (the newest attachment that writes wins; older ones are refused).
The routes below are the whole admin contract; ``storage/api.py`` serves exactly these.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from livemig import errors
from livemig.model.vm import NbdExport
from livemig.wire.base import AsyncHttp, AsyncService, Call, Credentials, SyncService, call

#: the NBD port when an attachment's URI names none (the IANA-assigned one)
NBD_DEFAULT_PORT = 10809

# ---------------------------------------------------------------------- models


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    size_bytes: int = Field(gt=0)
    preallocate: bool = Field(default=False, description="reserve every block now (thick): a guest's writes "
                              "can then never meet a full disk")  # fmt: skip


class VolumeResize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size_bytes: int = Field(gt=0)


class AttachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str = Field(min_length=1, max_length=128)
    host: str = Field(min_length=1, max_length=128)


class VolumeView(BaseModel):
    name: str
    size_bytes: int
    allocated_bytes: int
    created_at: float
    attachments: int
    writer: str | None


class AttachmentView(BaseModel):
    id: str
    volume: str
    vm: str
    host: str
    generation: int
    created_at: float
    is_writer: bool
    fenced: bool
    fence_reason: str | None
    detached: bool
    connections: int
    reads: int
    writes: int
    rejected_writes: int
    flushes: int
    bytes_read: int
    bytes_written: int


class AttachReply(AttachmentView):
    """A new attachment: the only time its secret is shown (blockd keeps a hash)."""

    export_name: str
    secret: str
    nbd_uri: str

    def export(self) -> NbdExport:
        """Where QEMU's NBD client connects for this attachment."""
        where = urlsplit(self.nbd_uri)
        host = where.hostname or "127.0.0.1"
        # nbds://: forced TLS; QEMU checks blockd's certificate names the address it dials
        return NbdExport(host=host, port=where.port or NBD_DEFAULT_PORT, export=self.export_name,
                         attachment=self.id, tls_hostname=host if where.scheme == "nbds" else None)  # fmt: skip


class Health(BaseModel):
    status: str
    uptime_s: float
    volumes: int
    nbd: str
    fencing: bool
    nbd_tls: bool = Field(default=False, description="NBD is forced-TLS (clients with a certificate of the region)")


# ---------------------------------------------------------------------- routes


def health() -> Call[Health]:
    return call("GET", "/healthz", Health)


def create_volume(name: str, size_bytes: int, preallocate: bool = False) -> Call[VolumeView]:
    body = VolumeCreate(name=name, size_bytes=size_bytes, preallocate=preallocate)
    return call("POST", "/volumes", VolumeView, json=body)


def volumes() -> Call[list[VolumeView]]:
    return call("GET", "/volumes", list[VolumeView])


def volume(name: str) -> Call[VolumeView]:
    return call("GET", f"/volumes/{name}", VolumeView)


def resize_volume(name: str, size_bytes: int) -> Call[VolumeView]:
    return call("POST", f"/volumes/{name}/resize", VolumeView, json=VolumeResize(size_bytes=size_bytes))


def delete_volume(name: str) -> Call[None]:
    return call("DELETE", f"/volumes/{name}")


def attach(volume: str, vm: str, host: str) -> Call[AttachReply]:
    return call("POST", f"/volumes/{volume}/attachments", AttachReply, json=AttachRequest(vm=vm, host=host))


def attachments(volume: str, include_detached: bool = False) -> Call[list[AttachmentView]]:
    params = {"include_detached": "true"} if include_detached else None
    return call("GET", f"/volumes/{volume}/attachments", list[AttachmentView], params=params)


def attachment(attachment_id: str) -> Call[AttachmentView]:
    return call("GET", f"/attachments/{attachment_id}", AttachmentView)


def detach(attachment_id: str) -> Call[None]:
    return call("DELETE", f"/attachments/{attachment_id}")


def fence(attachment_id: str) -> Call[AttachmentView]:
    return call("POST", f"/attachments/{attachment_id}/fence", AttachmentView)


# ---------------------------------------------------------------------- clients


class BlockdClient(AsyncService):
    """The LMO's client for blockd."""

    kind = "blockd"

    def __init__(self, url: str, http: AsyncHttp) -> None:
        super().__init__("blockd", url, http)

    async def detach_if_attached(self, attachment_id: str) -> None:
        """Detaching is idempotent: an attachment that is already gone is fine."""
        with contextlib.suppress(errors.NotFound):
            await self.run(detach(attachment_id))


class BlockingBlockdClient(SyncService):
    """blockd from plain code (tests, benchmarks)."""

    def __init__(self, url: str, timeout: float = 30.0, credentials: Credentials | None = None) -> None:
        super().__init__("blockd", url, timeout, credentials)
