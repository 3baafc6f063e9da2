"""The LMO boundary (CLI, dashboard, tests → LMO; hostd → LMO to register): models, routes, clients.

The LMO is the only writer of desired state: VMs and where they run, migrations and their phases,
evacuations, the virtual network, volumes (through blockd). The routes below are its whole REST
contract; ``control/api.py`` serves exactly these. :class:`LmoClient` is the typed client the CLI,
the demo, the tests and the benchmarks use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from livemig import errors
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import TERMINAL_PHASES, ConcurrencyLimits, Migration, MigrationParams, utcnow
from livemig.model.vm import NbdExport, VmSpec
from livemig.wire.base import AsyncService, Call, SyncService, call
from livemig.wire.blockd import AttachmentView, VolumeCreate, VolumeResize, VolumeView
from livemig.wire.hostd import CheckReply, ConsoleLine, VmStatus

# ---------------------------------------------------------------------- models


class VmCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: VmSpec
    host: str | None = Field(default=None, description="place on this host; default: most free memory")


class VmView(BaseModel):
    """A VM as the LMO knows it (spec, owner) and as its host observes it (or why it could not)."""

    name: str
    host: str
    spec: VmSpec
    observed: VmStatus | None = None
    error: str | None = None


class HostView(BaseModel):
    registration: HostRegistration
    info: HostInfo | None = None
    error: str | None = None


class GuestCheckReply(CheckReply):
    host: str


class VolumeDetail(BaseModel):
    volume: VolumeView
    attachments: list[AttachmentView]


class TransferMode(StrEnum):
    """What a transfer is for: writing an image into a volume, or reading one out of it."""

    WRITE = "write"
    READ = "read"


class TransferRequest(BaseModel):
    """``POST /volumes/{name}/transfers``: a short-lived NBD attachment for copying an image."""

    model_config = ConfigDict(extra="forbid")

    mode: TransferMode
    ttl_s: float = Field(default=60.0, ge=5, le=3600, description="detached this long after the last renewal")


class TransferRenew(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(default=60.0, ge=5, le=3600)


class Transfer(BaseModel):
    """An open transfer: where to connect (its own attachment's export) and until when it lives."""

    id: str
    volume: str
    mode: TransferMode
    size_bytes: int
    allocated_bytes: int = Field(description="bytes the volume occupied on blockd when the transfer opened")
    export: NbdExport
    expires_at: float = Field(description="Unix time; renew before, or the LMO detaches it")


class NetKind(StrEnum):
    """The virtual network's object kinds, in the order they depend on each other."""

    VCNS = "vcns"
    SUBNETS = "subnets"
    SECURITY_LISTS = "security-lists"
    VNICS = "vnics"


class MigrationRequest(BaseModel):
    """``POST /migrations``: move ``vm`` to ``destination``."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(min_length=1)
    destination: str = Field(min_length=1)
    params: MigrationParams = Field(default_factory=MigrationParams)
    verify_guest: bool = Field(default=True, description="run the guest workload's memory check on the destination")


class Check(BaseModel):
    """One pre-flight check and, when it fails, the error class a real request raises."""

    name: str
    ok: bool
    detail: str
    error: str | None = None


class PreflightReport(BaseModel):
    vm: str
    source: str
    destination: str
    ok: bool
    checks: list[Check]

    def raise_first_failure(self) -> None:
        classes: dict[str, type[errors.LivemigError]] = {
            c.__name__: c for c in (errors.Conflict, errors.CapacityError, errors.InvalidRequest,
                                    errors.HostUnreachable)
        }  # fmt: skip
        for check in self.checks:
            if not check.ok:
                raise classes.get(check.error or "", errors.Conflict)(f"{check.name}: {check.detail}")


def _evacuation_limits() -> ConcurrencyLimits:
    return ConcurrencyLimits(per_host_outbound=2, per_host_inbound=1, region_total=4)


class EvacuationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: ConcurrencyLimits = Field(default_factory=_evacuation_limits)
    params: MigrationParams = Field(default_factory=MigrationParams)


class EvacuationItem(BaseModel):
    vm: str
    destination: str | None = None
    migration: str | None = None
    reason: str = ""


class Evacuation(BaseModel):
    id: str
    host: str
    created_at: datetime = Field(default_factory=utcnow)
    limits: ConcurrencyLimits
    items: list[EvacuationItem] = Field(default_factory=list)


class EvacuationReport(BaseModel):
    evacuation: Evacuation
    migrations: list[Migration]
    done: bool


# ---------------------------------------------------------------------- routes


def health() -> Call[dict[str, str]]:
    return call("GET", "/healthz", dict[str, str])


def register_host(registration: HostRegistration) -> Call[HostRegistration]:
    return call("PUT", f"/hosts/{registration.name}", HostRegistration, json=registration)


def hosts() -> Call[list[HostView]]:
    return call("GET", "/hosts", list[HostView])


def set_maintenance(host: str, on: bool) -> Call[HostRegistration]:
    return call("PUT", f"/hosts/{host}/maintenance", HostRegistration, params={"on": on})


def create_vm(spec: VmSpec, host: str | None = None) -> Call[VmView]:
    return call("POST", "/vms", VmView, json=VmCreate(spec=spec, host=host))


def vms() -> Call[list[VmView]]:
    return call("GET", "/vms", list[VmView])


def vm(name: str) -> Call[VmView]:
    return call("GET", f"/vms/{name}", VmView)


def delete_vm(name: str) -> Call[None]:
    return call("DELETE", f"/vms/{name}")


def console(name: str, tail: int = 50) -> Call[str]:
    return Call("GET", f"/vms/{name}/console", _text, params={"tail": tail})


def console_input(name: str, line: str) -> Call[None]:
    return call("POST", f"/vms/{name}/console", json=ConsoleLine(line=line))


def guest_check(name: str) -> Call[GuestCheckReply]:
    return call("POST", f"/vms/{name}/guest-check", GuestCheckReply)


def put_network_object(kind: NetKind, body: dict[str, Any]) -> Call[dict[str, Any]]:
    return call("PUT", f"/network/{kind.value}/{body.get('id', '')}", dict[str, Any], json=body)


def network_objects(kind: NetKind) -> Call[list[dict[str, Any]]]:
    return call("GET", f"/network/{kind.value}", list[dict[str, Any]])


def delete_network_object(kind: NetKind, object_id: str) -> Call[None]:
    return call("DELETE", f"/network/{kind.value}/{object_id}")


def create_volume(name: str, size_bytes: int) -> Call[VolumeView]:
    return call("POST", "/volumes", VolumeView, json=VolumeCreate(name=name, size_bytes=size_bytes))


def volumes() -> Call[list[VolumeView]]:
    return call("GET", "/volumes", list[VolumeView])


def volume(name: str) -> Call[VolumeDetail]:
    return call("GET", f"/volumes/{name}", VolumeDetail)


def delete_volume(name: str) -> Call[None]:
    return call("DELETE", f"/volumes/{name}")


def resize_volume(name: str, size_bytes: int) -> Call[VolumeView]:
    return call("POST", f"/volumes/{name}/resize", VolumeView, json=VolumeResize(size_bytes=size_bytes))


def open_transfer(volume: str, mode: TransferMode, ttl_s: float = 60.0) -> Call[Transfer]:
    return call("POST", f"/volumes/{volume}/transfers", Transfer, json=TransferRequest(mode=mode, ttl_s=ttl_s))


def transfer(transfer_id: str) -> Call[Transfer]:
    return call("GET", f"/transfers/{transfer_id}", Transfer)


def renew_transfer(transfer_id: str, ttl_s: float = 60.0) -> Call[Transfer]:
    return call("POST", f"/transfers/{transfer_id}/renew", Transfer, json=TransferRenew(ttl_s=ttl_s))


def close_transfer(transfer_id: str) -> Call[None]:
    return call("DELETE", f"/transfers/{transfer_id}")


def preflight(request: MigrationRequest) -> Call[PreflightReport]:
    """The checks ``POST /migrations`` would run for the same request, and nothing started."""
    return call("POST", "/migrations/preflight", PreflightReport, json=request)


def create_migration(request: MigrationRequest) -> Call[Migration]:
    return call("POST", "/migrations", Migration, json=request)


def migrations(vm: str | None = None, active: bool = False) -> Call[list[Migration]]:
    params: dict[str, Any] = {"active": active} if active else {}
    if vm is not None:
        params["vm"] = vm
    return call("GET", "/migrations", list[Migration], params=params or None)


def migration(migration_id: str) -> Call[Migration]:
    return call("GET", f"/migrations/{migration_id}", Migration)


def cancel_migration(migration_id: str) -> Call[Migration]:
    return call("POST", f"/migrations/{migration_id}/cancel", Migration)


def evacuate(host: str, request: EvacuationRequest) -> Call[Evacuation]:
    return call("POST", f"/hosts/{host}/evacuate", Evacuation, json=request)


def evacuation(evacuation_id: str) -> Call[EvacuationReport]:
    return call("GET", f"/evacuations/{evacuation_id}", EvacuationReport)


def _text(reply: httpx.Response) -> str:
    return reply.text


# ---------------------------------------------------------------------- clients


class LmoClient(SyncService):
    """The LMO from plain code: the CLI, the demo, the tests and the benchmarks."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        super().__init__("LMO", url, timeout)
        self.url = self.base_url

    def hosts(self) -> list[HostView]:
        return self.run(hosts())

    def create_vm(self, spec: VmSpec, host: str | None = None) -> VmView:
        return self.run(create_vm(spec, host))

    def vms(self) -> list[VmView]:
        return self.run(vms())

    def vm(self, name: str) -> VmView:
        return self.run(vm(name))

    def delete_vm(self, name: str) -> None:
        self.run(delete_vm(name))

    def console(self, name: str, tail: int = 50) -> str:
        return self.run(console(name, tail))

    def console_input(self, name: str, line: str) -> None:
        self.run(console_input(name, line))

    def guest_check(self, name: str) -> GuestCheckReply:
        return self.run(guest_check(name))

    def create_volume(self, name: str, size_mib: int) -> VolumeView:
        return self.run(create_volume(name, size_mib * 1024 * 1024))

    def volume(self, name: str) -> VolumeDetail:
        return self.run(volume(name))

    def delete_volume(self, name: str) -> None:
        self.run(delete_volume(name))

    def put_network_object(self, kind: NetKind | str, body: dict[str, Any]) -> dict[str, Any]:
        return self.run(put_network_object(NetKind(kind), body))

    def migrate(self, vm: str, destination: str, params: MigrationParams | None = None,
                verify_guest: bool = True) -> Migration:  # fmt: skip
        request = MigrationRequest(vm=vm, destination=destination, params=params or MigrationParams(),
                                   verify_guest=verify_guest)  # fmt: skip
        return self.run(create_migration(request))

    def preflight(self, vm: str, destination: str, params: MigrationParams | None = None) -> PreflightReport:
        return self.run(preflight(MigrationRequest(vm=vm, destination=destination, params=params or MigrationParams())))

    def migration(self, migration_id: str) -> Migration:
        return self.run(migration(migration_id))

    def migrations(self, vm: str | None = None, active: bool = False) -> list[Migration]:
        return self.run(migrations(vm, active))

    def cancel(self, migration_id: str) -> Migration:
        return self.run(cancel_migration(migration_id))

    def evacuate(self, host: str, limits: ConcurrencyLimits | None = None) -> Evacuation:
        request = EvacuationRequest() if limits is None else EvacuationRequest(limits=limits)
        return self.run(evacuate(host, request))

    def evacuation(self, evacuation_id: str) -> EvacuationReport:
        return self.run(evacuation(evacuation_id))

    def wait_for_console(self, name: str, needle: str, timeout: float = 60.0) -> str:
        """Wait until the VM's console shows ``needle`` (e.g. the workload's first heartbeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console(name, tail=200)
            if needle in text:
                return text
            time.sleep(0.2)
        raise errors.LivemigError(f"VM {name}: {needle!r} did not appear on the console within {timeout:.0f}s")

    def wait(self, migration_id: str, timeout: float = 600.0,
             on_update: Callable[[Migration], None] | None = None, poll_s: float = 0.2) -> Migration:  # fmt: skip
        """Poll until the migration reaches a terminal phase."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.migration(migration_id)
            if on_update is not None:
                on_update(current)
            if current.phase in TERMINAL_PHASES:
                return current
            if time.monotonic() > deadline:
                raise errors.LivemigError(f"migration {migration_id} still {current.phase.value} after {timeout:.0f}s")
            time.sleep(poll_s)


class AsyncLmoClient(AsyncService):
    """The LMO from an event loop (hostd registering itself)."""

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        super().__init__("LMO", url, http)
