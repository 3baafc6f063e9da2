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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from livemig import errors
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import (
    TERMINAL_PHASES,
    ConcurrencyLimits,
    Migration,
    MigrationParams,
    MigrationPolicies,
    utcnow,
)
from livemig.model.vm import NbdExport, VmSpec
from livemig.wire.base import AsyncHttp, AsyncService, Call, Credentials, HttpReply, SyncService, call
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


class HostInventory(BaseModel):
    """A host's memory as the LMO accounts it: offered (reported by hostd), used by its VMs (as
    hostd last reported), placed or reserved there by the LMO, and free by the larger of the two."""

    memory_mib: int | None
    placed_mib: int
    reported_used_mib: int
    free_mib: int | None


class HostView(BaseModel):
    registration: HostRegistration
    info: HostInfo | None = None
    error: str | None = None
    inventory: HostInventory | None = None


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
    policies: MigrationPolicies | None = Field(
        default=None, description="the policies the migration would run with (the request's, else the VM's)"
    )

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


class WaveRequest(BaseModel):
    """Evacuate (or plan evacuating) every host of ``hosts`` at once, within ``limits``."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(min_length=1, max_length=100_000)
    limits: ConcurrencyLimits = Field(default_factory=_evacuation_limits)
    params: MigrationParams = Field(default_factory=MigrationParams)
    measure: bool = Field(default=False, description="ask hosts for the dirty rate of VMs whose rate is unknown "
                          "or older than max_rate_age_s before planning")  # fmt: skip
    max_rate_age_s: float = Field(default=3600.0, gt=0)


Verdict = Literal["ok", "auto-converge", "abort", "cannot-move"]


class PlannedMigration(BaseModel):
    """One VM of a wave as the planner sees it: where it goes, when it starts and how long it takes."""

    vm: str
    source: str
    destination: str | None = None
    memory_mib: int
    dirty_rate_mib_s: float = 0.0
    dirty_rate_source: str = Field(default="assumed", description="measured (hostd asked QEMU), migration "
                                   "(its last one), or assumed (the fleet's median)")  # fmt: skip
    share_mib_s: int | None = None
    start_s: float | None = None
    duration_s: float | None = None
    precopy_s: float | None = None
    rounds: int | None = None
    verdict: Verdict = "ok"
    reason: str = ""


class PlanCalibration(BaseModel):
    """What the planner learned from recent migrations (defaults when there are none)."""

    overhead_s: float = Field(description="per migration, outside pre-copy: preparing the target, cut-over, checks")
    efficiency: float = Field(description="bandwidth pre-copy achieved, as a fraction of the reserved share")
    payload: float = Field(description="fraction of a guest's RAM that travels (zero pages do not)")
    default_dirty_rate_mib_s: float = Field(description="assumed for VMs whose rate is unknown")
    time_scale: float = Field(default=1.0, description="QEMU's seconds per second of the LMO's clock while "
                              "pre-copy runs (about 1 on real hosts; a simulated fleet's speed)")  # fmt: skip
    basis: int = Field(description="finished migrations these were learned from")


class LmoPace(BaseModel):
    """How fast the LMO's replicas ended migrations while they had more to step than their passes
    could take (measured by a replica's controller over its last minute, kept in the store): the
    pace a wave cannot end faster than, while the replicas hold as many as they did then."""

    ended_per_s: float = Field(description="migrations ended per second, the replicas in lease together")
    held: int = Field(description="migrations they held meanwhile, together: the pace holds from there on")
    replica: str = Field(description="the replica that measured it (its pace, times the replicas driving now)")
    age_s: float = Field(description="seconds since it was measured")


class WavePlan(BaseModel):
    hosts: list[str]
    created_at: datetime = Field(default_factory=utcnow)
    limits: ConcurrencyLimits
    vms: int
    total_s: float = Field(description="predicted time from the start of the wave until its last migration ends")
    verdicts: dict[str, int] = Field(default_factory=dict)
    measured: int = Field(default=0, description="dirty rates measured for this plan")
    planning_ms: float = 0.0
    calibration: PlanCalibration
    driven_at_once: int | None = Field(
        default=None,
        description="the most migrations the LMO's replicas in lease "
        "drive at once (their capacities summed), a bound of the schedule",
    )
    lmo_pace: LmoPace | None = Field(
        default=None, description="the LMO's own measured pace, a bound of the schedule (None: not measured)"
    )
    hosts_bound_s: float | None = Field(
        default=None,
        description="how long the wave would take if the LMO ended migrations as fast as QEMU finishes them "
        "(its pace not bounding it): the least more replicas could bring it to. Only when the pace "
        "lengthened the plan",
    )
    items: list[PlannedMigration] = Field(default_factory=list)


class EvacuationItem(BaseModel):
    vm: str
    destination: str | None = None
    migration: str | None = None
    reason: str = ""


class Evacuation(BaseModel):
    id: str
    host: str
    hosts: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    limits: ConcurrencyLimits
    items: list[EvacuationItem] = Field(default_factory=list)
    plan: WavePlan | None = None


class ComparedMigration(BaseModel):
    vm: str
    predicted_s: float | None
    actual_s: float | None
    predicted: Verdict
    outcome: str


class WaveComparison(BaseModel):
    """The plan beside what happened."""

    predicted_s: float
    actual_s: float | None = Field(description="from the wave's start until its last migration ended")
    error: float | None = Field(description="(actual - predicted) / actual")
    verdicts_predicted: dict[str, int]
    outcomes: dict[str, int]
    items: list[ComparedMigration]


class EvacuationReport(BaseModel):
    evacuation: Evacuation
    migrations: list[Migration]
    done: bool
    comparison: WaveComparison | None = None


class PassView(BaseModel):
    at: datetime
    held: int
    stepped: int
    admitted: int
    queued: int
    seconds: float
    deferred: int = Field(default=0, description="due steps the pass budget left to later passes")
    acting: int = Field(default=0, description="steps that act rather than only observe (taken first)")
    read_s: float = Field(default=0.0, description="reading the leases, changed documents and VM specs")
    admit_s: float = Field(default=0.0, description="the admission round")
    step_s: float = Field(default=0.0, description="the steps, run concurrently")
    save_s: float = Field(default=0.0, description="saving the steps' results")


class ControllerStatus(BaseModel):
    """One LMO replica's controller: its share of the leases and its recent passes."""

    replica: str
    capacity: int
    concurrency: int
    interval_s: float
    held: int
    finished: int
    replicas: dict[str, float] = Field(description="replicas seen within a lease, with when (Unix time)")
    passes: list[PassView]


class TokenCreate(BaseModel):
    """``POST /tokens``: a bearer token for a user (``viewer``, ``operator`` or ``admin``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="who or what holds it")
    role: str = Field(description="viewer | operator | admin")


class TokenView(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(TokenView):
    """A new token: the only time the token itself is shown (the LMO keeps its SHA-256)."""

    token: str


# ---------------------------------------------------------------------- routes


def health() -> Call[dict[str, str]]:
    return call("GET", "/healthz", dict[str, str])


def register_host(registration: HostRegistration) -> Call[HostRegistration]:
    return call("PUT", f"/hosts/{registration.name}", HostRegistration, json=registration)


def hosts(observe: bool = True) -> Call[list[HostView]]:
    return call("GET", "/hosts", list[HostView], params=None if observe else {"observe": False})


def set_maintenance(host: str, on: bool) -> Call[HostRegistration]:
    return call("PUT", f"/hosts/{host}/maintenance", HostRegistration, params={"on": on})


def create_vm(spec: VmSpec, host: str | None = None) -> Call[VmView]:
    return call("POST", "/vms", VmView, json=VmCreate(spec=spec, host=host))


def vms(host: str | None = None, observe: bool = True) -> Call[list[VmView]]:
    params: dict[str, Any] = {} if observe else {"observe": False}
    if host is not None:
        params["host"] = host
    return call("GET", "/vms", list[VmView], params=params or None)


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


def create_volume(name: str, size_bytes: int, preallocate: bool = False) -> Call[VolumeView]:
    body = VolumeCreate(name=name, size_bytes=size_bytes, preallocate=preallocate)
    return call("POST", "/volumes", VolumeView, json=body)


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


def migrations(vm: str | None = None, active: bool = False, limit: int | None = None) -> Call[list[Migration]]:
    params: dict[str, Any] = {"active": active} if active else {}
    if vm is not None:
        params["vm"] = vm
    if limit is not None:
        params["limit"] = limit
    return call("GET", "/migrations", list[Migration], params=params or None)


def migration_counts() -> Call[dict[str, int]]:
    return call("GET", "/migrations/counts", dict[str, int])


def migration(migration_id: str) -> Call[Migration]:
    return call("GET", f"/migrations/{migration_id}", Migration)


def cancel_migration(migration_id: str) -> Call[Migration]:
    return call("POST", f"/migrations/{migration_id}/cancel", Migration)


def evacuate(host: str, request: EvacuationRequest) -> Call[Evacuation]:
    return call("POST", f"/hosts/{host}/evacuate", Evacuation, json=request)


def evacuation(evacuation_id: str) -> Call[EvacuationReport]:
    return call("GET", f"/evacuations/{evacuation_id}", EvacuationReport)


def create_token(name: str, role: str) -> Call[TokenCreated]:
    return call("POST", "/tokens", TokenCreated, json=TokenCreate(name=name, role=role))


def tokens() -> Call[list[TokenView]]:
    return call("GET", "/tokens", list[TokenView])


def revoke_token(token_id: str) -> Call[TokenView]:
    return call("DELETE", f"/tokens/{token_id}", TokenView)


def start_wave(request: WaveRequest) -> Call[Evacuation]:
    return call("POST", "/evacuations", Evacuation, json=request)


def plan_wave(request: WaveRequest) -> Call[WavePlan]:
    return call("POST", "/evacuations/plan", WavePlan, json=request, timeout=600.0)


def controller() -> Call[ControllerStatus]:
    return call("GET", "/controller", ControllerStatus)


def _text(reply: HttpReply) -> str:
    return reply.text


# ---------------------------------------------------------------------- clients


class LmoClient(SyncService):
    """The LMO from plain code: the CLI, the demo, the tests and the benchmarks."""

    def __init__(self, url: str, timeout: float = 120.0, credentials: Credentials | None = None) -> None:
        super().__init__("LMO", url, timeout, credentials)
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

    def create_volume(self, name: str, size_mib: int, preallocate: bool = False) -> VolumeView:
        return self.run(create_volume(name, size_mib * 1024 * 1024, preallocate))

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

    def start_wave(self, request: WaveRequest) -> Evacuation:
        return self.run(start_wave(request))

    def plan_wave(self, request: WaveRequest) -> WavePlan:
        return self.run(plan_wave(request))

    def controller(self) -> ControllerStatus:
        return self.run(controller())

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

    kind = "lmo"

    def __init__(self, url: str, http: AsyncHttp) -> None:
        super().__init__("LMO", url, http)
