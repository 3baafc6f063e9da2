"""The hostd boundary (LMO → hostd): its request and reply models, its routes, and the client.

hostd reports observed state (QEMU's runstate, the migration job QEMU runs) and takes idempotent
actions (start a VM, prepare a destination, migrate, cancel, resume). The LMO is its only caller.
The routes below are the whole contract; ``host/api.py`` serves exactly these.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from livemig import errors
from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import MigrationParams, MigrationPolicies, MigrationSample, MigrationStats
from livemig.model.vm import NbdExport, RunState, VmRole, VmSpec
from livemig.wire.base import AsyncHttp, AsyncService, Call, HttpReply, call

# ---------------------------------------------------------------------- models


class VmLaunch(BaseModel):
    """What hostd needs to start a VM: the spec plus this host's NBD export per volume device."""

    model_config = ConfigDict(extra="forbid")

    spec: VmSpec
    exports: dict[str, NbdExport] = Field(default_factory=dict)


class IncomingLaunch(VmLaunch):
    """``POST /vms/{name}/incoming``: a destination, told the migration's policies (multifd's
    channels and compression must match on both ends before QEMU listens)."""

    policies: MigrationPolicies = Field(default_factory=MigrationPolicies)
    tls_source: str | None = Field(default=None, description="accept the stream only over TLS and only from this "
                                   "host's QEMU certificate (tls-authz; None: a plain stream)")  # fmt: skip


class VmStatus(BaseModel):
    """What a hostd observes about one VM (QEMU's runstate, pid, console)."""

    name: str
    host: str
    state: RunState = Field(description="QEMU's runstate, or absent/unreachable as hostd sees it")
    pid: int | None = None
    role: VmRole = VmRole.RUNNING
    spec: VmSpec
    console_log: str | None = None
    resumed_at: float | None = Field(
        default=None, description="incoming VM: Unix time QEMU resumed the guest here (after a migration)"
    )
    guest_resets: list[str] = Field(
        default_factory=list, description="guest-initiated resets, shutdowns or panics QEMU reported on this host"
    )
    qemu_errors: list[str] = Field(
        default_factory=list, description="the last lines QEMU logged here (e.g. why it refused a migration stream)"
    )


class VnicHandoff(BaseModel):
    """One VNIC moving with the VM: its id and the destination host's vswitch."""

    model_config = ConfigDict(extra="forbid")

    vnic: str
    destination_vswitch: str
    flows_since: int = Field(default=0, ge=0, description="the source's flow version the destination has "
                             "(the bulk copy's); the pause sends only later changes (0: all)")  # fmt: skip


class MigrateRequest(BaseModel):
    """``POST /vms/{name}/migrate``: send the VM to the destination QEMU listening at ``uri``."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(pattern=r"^tcp:[^:]+:\d+$")
    params: MigrationParams = Field(default_factory=MigrationParams)
    handoffs: list[VnicHandoff] = Field(default_factory=list)
    tls_hostname: str | None = Field(default=None, description="encrypt the stream (QEMU's TLS); the destination's "
                                     "QEMU certificate must name this host (None: a plain stream)")  # fmt: skip


class IncomingReply(BaseModel):
    uri: str = Field(description="where the suspended destination QEMU listens (tcp:address:port)")


class CheckReply(BaseModel):
    ok: bool
    detail: str


class ConsoleLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: str = Field(max_length=200)


class ResumeReply(BaseModel):
    state: RunState


class DirtyRateReply(BaseModel):
    """How fast a guest dirties its memory, as QEMU measured it (``calc-dirty-rate``)."""

    vm: str
    host: str
    dirty_rate_mib_s: float = Field(ge=0)
    calc_time_s: float = Field(description="how long QEMU sampled")
    measured_at: datetime


class JobState(StrEnum):
    """Where the source's migration job stands (QEMU's final statuses, plus still running)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MigrationEvent(BaseModel):
    """One QMP ``MIGRATION`` event on the source: QEMU's status and when it changed."""

    at: datetime
    status: str


class SourceMigrationStatus(BaseModel):
    """What hostd reports about the migration it drives (the LMO polls this)."""

    vm: str
    uri: str
    state: JobState
    events: list[MigrationEvent] = Field(default_factory=list)
    samples: list[MigrationSample] = Field(default_factory=list)
    stats: MigrationStats | None = None
    error: str | None = None
    enforced_by: str | None = Field(default=None, description="the tc class holding the stream to its share")
    qemu_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="what the source QEMU reports it was set to (query-migrate-capabilities "
        "and -parameters, read back before migrate): the policies as QEMU has them",
    )
    qemu_ignored: dict[str, Any] = Field(
        default_factory=dict, description="settings QEMU accepted but did not take: {name: {asked, qemu}}"
    )
    encryption: str | None = Field(default=None, description="what protects the stream (None: plain)")


# ---------------------------------------------------------------------- routes


def health() -> Call[dict[str, str]]:
    return call("GET", "/healthz", dict[str, str])


def info() -> Call[HostInfo]:
    return call("GET", "/host", HostInfo)


def list_vms() -> Call[list[VmStatus]]:
    return call("GET", "/vms", list[VmStatus])


def create_vm(spec: VmSpec, exports: dict[str, NbdExport] | None = None) -> Call[VmStatus]:
    return call("POST", "/vms", VmStatus, json=VmLaunch(spec=spec, exports=exports or {}))


def vm(name: str) -> Call[VmStatus]:
    return call("GET", f"/vms/{name}", VmStatus)


def destroy_vm(name: str) -> Call[None]:
    return call("DELETE", f"/vms/{name}")


def prepare_incoming(
    spec: VmSpec,
    exports: dict[str, NbdExport] | None = None,
    policies: MigrationPolicies | None = None,
    tls_source: str | None = None,
) -> Call[IncomingReply]:
    body = IncomingLaunch(spec=spec, exports=exports or {}, policies=policies or MigrationPolicies(),
                          tls_source=tls_source)  # fmt: skip
    return call("POST", f"/vms/{spec.name}/incoming", IncomingReply, json=body)


def migrate(
    name: str,
    uri: str,
    params: MigrationParams,
    handoffs: list[VnicHandoff] | None = None,
    tls_hostname: str | None = None,
) -> Call[SourceMigrationStatus]:
    body = MigrateRequest(uri=uri, params=params, handoffs=handoffs or [], tls_hostname=tls_hostname)
    return call("POST", f"/vms/{name}/migrate", SourceMigrationStatus, json=body)


def migration(name: str, since: int = 0) -> Call[SourceMigrationStatus]:
    return call("GET", f"/vms/{name}/migration", SourceMigrationStatus, params={"since": since} if since else None)


def advance_flow_versions(name: str, versions: dict[str, int]) -> Call[None]:
    return call("POST", f"/vms/{name}/migration/flow-versions", json=versions)


def cancel_migration(name: str) -> Call[None]:
    return call("POST", f"/vms/{name}/migration/cancel")


def resume(name: str) -> Call[ResumeReply]:
    return call("POST", f"/vms/{name}/resume", ResumeReply)


def hold_incoming(name: str) -> Call[VmStatus]:
    return call("POST", f"/vms/{name}/hold", VmStatus)


def dirty_rate(name: str, seconds: float = 1.0) -> Call[DirtyRateReply]:
    return call("POST", f"/vms/{name}/dirty-rate", DirtyRateReply, params={"seconds": seconds},
                timeout=seconds + 30.0)  # fmt: skip


def dirty_rates(names: list[str] | None = None, seconds: float = 1.0) -> Call[list[DirtyRateReply]]:
    return call("POST", "/host/dirty-rates", list[DirtyRateReply], params={"seconds": seconds},
                json=names, timeout=seconds + 60.0)  # fmt: skip


#: a guest check may wait for the guest to answer; give it longer than a plain call
CHECK_TIMEOUT_S = 90.0


def guest_check(name: str) -> Call[CheckReply]:
    return call("POST", f"/vms/{name}/guest-check", CheckReply, timeout=CHECK_TIMEOUT_S)


def disk_check(name: str) -> Call[CheckReply]:
    return call("POST", f"/vms/{name}/disk-check", CheckReply, timeout=CHECK_TIMEOUT_S)


def console(name: str, tail: int = 50) -> Call[str]:
    return Call("GET", f"/vms/{name}/console", _text, params={"tail": tail})


def console_input(name: str, line: str) -> Call[None]:
    return call("POST", f"/vms/{name}/console", json=ConsoleLine(line=line))


def _text(reply: HttpReply) -> str:
    return reply.text


# ---------------------------------------------------------------------- client


class HostdClient(AsyncService):
    """The LMO's client for one host's hostd; errors name the host."""

    kind = "hostd"

    def __init__(self, host: HostRegistration, http: AsyncHttp) -> None:
        super().__init__(f"host {host.name}", host.api_url, http)
        self.host = host
        self.fault_host = host.name

    async def observe(self, name: str) -> VmStatus | None:
        """The VM's observed status, or None if this host does not have it."""
        try:
            return await self.run(vm(name))
        except errors.NotFound:
            return None

    async def observe_migration(self, name: str) -> SourceMigrationStatus | None:
        """The VM's outgoing migration job, or None if this host runs none for it."""
        try:
            return await self.run(migration(name))
        except errors.NotFound:
            return None
