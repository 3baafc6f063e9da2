"""The LMO's client for blockd: volumes, and attachments that become QEMU NBD exports."""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

import httpx

from livemig import errors
from livemig.control.hostclient import raise_for_reply
from livemig.model.vm import NbdExport


class BlockClient:
    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self._client = client

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = await self._client.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.HostUnreachable(f"blockd at {self.url} did not answer: {exc!r}") from exc
        raise_for_reply(reply, "blockd")
        return reply

    async def create_volume(self, name: str, size_bytes: int) -> dict[str, Any]:
        return dict((await self._call("POST", "/volumes", json={"name": name, "size_bytes": size_bytes})).json())

    async def volumes(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/volumes")).json())

    async def volume(self, name: str) -> dict[str, Any]:
        return dict((await self._call("GET", f"/volumes/{name}")).json())

    async def delete_volume(self, name: str) -> None:
        await self._call("DELETE", f"/volumes/{name}")

    async def attachments(self, volume: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/volumes/{volume}/attachments")).json())

    async def attach(self, volume: str, vm: str, host: str) -> NbdExport:
        body = (await self._call("POST", f"/volumes/{volume}/attachments", json={"vm": vm, "host": host})).json()
        where = urlsplit(body["nbd_uri"])
        return NbdExport(host=where.hostname or "127.0.0.1", port=where.port or 10809,
                         export=body["export_name"], attachment=body["id"])  # fmt: skip

    async def detach(self, attachment: str) -> None:
        with contextlib.suppress(errors.NotFound):  # already gone: detaching is idempotent
            await self._call("DELETE", f"/attachments/{attachment}")

    async def fence(self, attachment: str) -> dict[str, Any]:
        return dict((await self._call("POST", f"/attachments/{attachment}/fence")).json())
