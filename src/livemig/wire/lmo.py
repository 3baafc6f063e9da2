"""A synchronous client for the LMO's REST API (CLI, demo, tests and benchmarks use it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from livemig.control.hostclient import raise_for_reply
from livemig.errors import HostUnreachable, LivemigError
from livemig.model.migration import TERMINAL_PHASES, Migration, MigrationParams, MigrationRequest, Phase
from livemig.model.vm import VmSpec


class LmoClient:
    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LmoClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise HostUnreachable(f"the LMO at {self.url} did not answer: {exc!r}") from exc
        raise_for_reply(reply, "LMO")
        if reply.status_code == 204 or not reply.content:
            return None
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return reply.text

    # ------------------------------------------------------------------ VMs and hosts
    def hosts(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/hosts"))

    def create_vm(self, spec: VmSpec, host: str | None = None) -> dict[str, Any]:
        return dict(self.call("POST", "/vms", json={"spec": spec.model_dump(), "host": host}))

    def vms(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/vms"))

    def vm(self, name: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/vms/{name}"))

    def delete_vm(self, name: str) -> None:
        self.call("DELETE", f"/vms/{name}")

    def console(self, name: str, tail: int = 50) -> str:
        return str(self.call("GET", f"/vms/{name}/console", params={"tail": tail}))

    def console_input(self, name: str, line: str) -> None:
        self.call("POST", f"/vms/{name}/console", json={"line": line})

    def guest_check(self, name: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/vms/{name}/guest-check"))

    def wait_for_console(self, name: str, needle: str, timeout: float = 60.0) -> str:
        """Wait until the VM's console shows ``needle`` (e.g. the workload's first heartbeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console(name, tail=200)
            if needle in text:
                return text
            time.sleep(0.2)
        raise LivemigError(f"VM {name}: {needle!r} did not appear on the console within {timeout:.0f}s")

    # ------------------------------------------------------------------ migrations
    def migrate(self, vm: str, destination: str, params: MigrationParams | None = None,
                verify_guest: bool = True) -> Migration:  # fmt: skip
        request = MigrationRequest(vm=vm, destination=destination, params=params or MigrationParams(),
                                   verify_guest=verify_guest)  # fmt: skip
        return Migration.model_validate(self.call("POST", "/migrations", json=request.model_dump()))

    def preflight(self, vm: str, destination: str) -> dict[str, Any]:
        return dict(self.call("POST", "/migrations/preflight", json={"vm": vm, "destination": destination}))

    def migration(self, migration_id: str) -> Migration:
        return Migration.model_validate(self.call("GET", f"/migrations/{migration_id}"))

    def migrations(self) -> list[Migration]:
        return [Migration.model_validate(m) for m in self.call("GET", "/migrations")]

    def cancel(self, migration_id: str) -> Migration:
        return Migration.model_validate(self.call("POST", f"/migrations/{migration_id}/cancel"))

    def evacuate(self, host: str, limits: dict[str, int] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {} if limits is None else {"limits": limits}
        return dict(self.call("POST", f"/hosts/{host}/evacuate", json=body))

    def evacuation(self, evacuation_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/evacuations/{evacuation_id}"))

    def wait(self, migration_id: str, timeout: float = 600.0,
             on_update: Callable[[Migration], None] | None = None, poll_s: float = 0.2) -> Migration:  # fmt: skip
        """Poll until the migration reaches a terminal phase."""
        deadline = time.monotonic() + timeout
        while True:
            migration = self.migration(migration_id)
            if on_update is not None:
                on_update(migration)
            if migration.phase in TERMINAL_PHASES:
                return migration
            if time.monotonic() > deadline:
                raise LivemigError(f"migration {migration_id} still {migration.phase.value} after {timeout:.0f}s")
            time.sleep(poll_s)


def is_success(migration: Migration) -> bool:
    return migration.phase is Phase.SUCCEEDED
