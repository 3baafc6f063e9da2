"""The LMO's client for one hostd: typed calls, hostd's JSON errors re-raised as our own."""

from __future__ import annotations

from typing import Any

import httpx

from livemig import errors
from livemig.host.source import SourceMigrationStatus
from livemig.host.vnics import VnicHandoff
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import MigrationParams
from livemig.model.vm import NbdExport, VmLaunch, VmSpec, VmStatus

_ERRORS: dict[str, type[errors.LivemigError]] = {
    cls.__name__: cls
    for cls in (errors.InvalidRequest, errors.NotFound, errors.Conflict, errors.CapacityError,
                errors.HostUnreachable, errors.QemuError, errors.MigrationError, errors.GuestError)
}  # fmt: skip


def raise_for_reply(reply: httpx.Response, who: str) -> None:
    if reply.status_code < 400:
        return
    try:
        body = reply.json()
        cls = _ERRORS.get(body.get("error", ""), errors.LivemigError)
        message = body.get("message", reply.text)
    except ValueError:
        cls, message = errors.LivemigError, reply.text
    raise cls(f"{who}: {message}")


class HostClient:
    def __init__(self, host: HostRegistration, client: httpx.AsyncClient) -> None:
        self.host = host
        self._client = client

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = await self._client.request(method, self.host.api_url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.HostUnreachable(f"host {self.host.name} did not answer: {exc!r}",
                                         host=self.host.name) from exc  # fmt: skip
        raise_for_reply(reply, f"host {self.host.name}")
        return reply

    async def info(self) -> HostInfo:
        return HostInfo.model_validate((await self._call("GET", "/host")).json())

    async def create_vm(self, spec: VmSpec, exports: dict[str, NbdExport] | None = None) -> VmStatus:
        launch = VmLaunch(spec=spec, exports=exports or {})
        return VmStatus.model_validate((await self._call("POST", "/vms", json=launch.model_dump())).json())

    async def vm(self, name: str) -> VmStatus | None:
        """The VM's observed status, or None if this host does not have it."""
        try:
            return VmStatus.model_validate((await self._call("GET", f"/vms/{name}")).json())
        except errors.NotFound:
            return None

    async def destroy_vm(self, name: str) -> None:
        await self._call("DELETE", f"/vms/{name}")

    async def prepare_incoming(self, spec: VmSpec, exports: dict[str, NbdExport] | None = None) -> str:
        launch = VmLaunch(spec=spec, exports=exports or {})
        reply = await self._call("POST", f"/vms/{spec.name}/incoming", json=launch.model_dump())
        return str(reply.json()["uri"])

    async def migrate(
        self, name: str, uri: str, params: MigrationParams, handoffs: list[VnicHandoff] | None = None
    ) -> SourceMigrationStatus:
        body = {"uri": uri, "params": params.model_dump(), "handoffs": [h.model_dump() for h in handoffs or []]}
        reply = await self._call("POST", f"/vms/{name}/migrate", json=body)
        return SourceMigrationStatus.model_validate(reply.json())

    async def migration(self, name: str) -> SourceMigrationStatus | None:
        try:
            return SourceMigrationStatus.model_validate((await self._call("GET", f"/vms/{name}/migration")).json())
        except errors.NotFound:
            return None

    async def advance_flow_versions(self, name: str, versions: dict[str, int]) -> None:
        await self._call("POST", f"/vms/{name}/migration/flow-versions", json=versions)

    async def cancel_migration(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/migration/cancel")

    async def resume(self, name: str) -> str:
        return str((await self._call("POST", f"/vms/{name}/resume")).json()["state"])

    async def guest_check(self, name: str) -> tuple[bool, str]:
        body = (await self._call("POST", f"/vms/{name}/guest-check", timeout=90)).json()
        return bool(body["ok"]), str(body["detail"])

    async def disk_check(self, name: str) -> tuple[bool, str]:
        body = (await self._call("POST", f"/vms/{name}/disk-check", timeout=90)).json()
        return bool(body["ok"]), str(body["detail"])

    async def console(self, name: str, tail: int = 50) -> str:
        return (await self._call("GET", f"/vms/{name}/console", params={"tail": tail})).text

    async def console_input(self, name: str, line: str) -> None:
        await self._call("POST", f"/vms/{name}/console", json={"line": line})
