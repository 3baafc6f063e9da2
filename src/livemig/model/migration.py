"""A Migration: its phase, its timeline, and the numbers QEMU reported.

Phases are data (a string enum) so the store, the API and the CLI all speak the same words, and
the timeline records every transition with a timestamp so every migration explains itself.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from livemig.faults.model import Firing

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Phase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    PREPARING_TARGET = "PreparingTarget"
    SYNCING_FLOWS = "SyncingFlows"
    PRECOPY = "PreCopy"
    SWITCHOVER = "Switchover"
    CUTTING_OVER = "CuttingOver"
    CLEANUP = "Cleanup"
    SUCCEEDED = "Succeeded"
    CANCELLING = "Cancelling"
    ABORTING = "Aborting"
    ROLLING_BACK = "RollingBack"
    CANCELLED = "Cancelled"
    ABORTED = "Aborted"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.CANCELLED, Phase.ABORTED, Phase.FAILED})


#: The happy path, in order (the dashboard draws it as steps; rollback phases branch off it).
FORWARD_PHASES: tuple[Phase, ...] = (
    Phase.PENDING,
    Phase.VALIDATING,
    Phase.PREPARING_TARGET,
    Phase.SYNCING_FLOWS,
    Phase.PRECOPY,
    Phase.SWITCHOVER,
    Phase.CUTTING_OVER,
    Phase.CLEANUP,
    Phase.SUCCEEDED,
)


class ConvergencePolicy(BaseModel):
    """When to give up on pre-copy (see ``livemig.control.policy.judge``)."""

    model_config = ConfigDict(extra="forbid")

    min_rounds: int = Field(default=2, ge=1, le=100, description="rounds before the dirty rate is trusted")
    max_rounds: int = Field(default=3, ge=1, le=1000, description="judge by this round at the latest")
    rate_margin: float = Field(default=0.9, gt=0, le=1.0,
                               description="abort when dirty rate >= margin x bandwidth")  # fmt: skip
    completion_timeout_s_per_gib: float = Field(default=120.0, gt=0)
    no_progress_timeout_s: float = Field(default=30.0, gt=0)


class AutoConverge(BaseModel):
    """QEMU's auto-converge: throttle the guest's vCPUs while pre-copy cannot keep up.

    QEMU starts throttling once the guest dirtied more than half of what a round sent, two
    rounds running, at ``initial_pct`` of the vCPUs' time, and adds ``increment_pct`` each later
    round up to ``max_pct``. The guest runs slower until the switchover, instead of the migration
    being aborted (see ``livemig.control.policy.judge``).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    initial_pct: int = Field(default=20, ge=1, le=99, description="QEMU cpu-throttle-initial")
    increment_pct: int = Field(default=10, ge=1, le=99, description="QEMU cpu-throttle-increment")
    max_pct: int = Field(default=99, ge=1, le=99, description="QEMU max-cpu-throttle")

    @model_validator(mode="after")
    def _initial_within_max(self) -> AutoConverge:
        if self.initial_pct > self.max_pct:
            raise ValueError(f"auto-converge: initial throttle {self.initial_pct}% exceeds its maximum "
                             f"{self.max_pct}%")  # fmt: skip
        return self


class Compression(StrEnum):
    """How pages are compressed on the wire: XBZRLE (deltas against a cache of pages sent before,
    on the one stream) or zstd (each multifd channel compresses its packets)."""

    NONE = "none"
    XBZRLE = "xbzrle"
    ZSTD = "zstd"


class MigrationPolicies(BaseModel):
    """What peers (Nova, KubeVirt) let users choose for a guest that pre-copy struggles with.

    Set per VM (``VmSpec.migration``) or per migration (``MigrationParams.policies``, which wins);
    the LMO resolves them when a migration is created, so its record says what QEMU was told.
    """

    model_config = ConfigDict(extra="forbid")

    auto_converge: AutoConverge = Field(default_factory=AutoConverge)
    multifd_channels: int = Field(default=0, ge=0, le=64,
                                  description="parallel streams (QEMU multifd); 0: QEMU's one stream")  # fmt: skip
    compression: Compression = Compression.NONE
    xbzrle_cache_mib: int = Field(default=64, ge=1, le=65536, description="XBZRLE's cache of sent pages")
    zstd_level: int = Field(default=1, ge=0, le=20, description="multifd-zstd-level")

    @model_validator(mode="after")
    def _compression_fits_the_streams(self) -> MigrationPolicies:
        if self.compression is Compression.ZSTD and self.multifd_channels == 0:
            raise ValueError("zstd compression runs on multifd channels: set multifd_channels >= 1")
        if self.compression is Compression.XBZRLE and self.multifd_channels > 0:
            raise ValueError("XBZRLE works on QEMU's single stream only: use zstd with multifd, "
                             "or multifd_channels 0")  # fmt: skip
        return self

    @property
    def multifd(self) -> bool:
        return self.multifd_channels > 0

    def describe(self) -> str:
        """One line for the timeline and the pre-flight report."""
        ac = self.auto_converge
        parts = [f"auto-converge {ac.initial_pct}%+{ac.increment_pct}% up to {ac.max_pct}%" if ac.enabled
                 else "no auto-converge",
                 f"multifd {self.multifd_channels} channels" if self.multifd else "one stream"]  # fmt: skip
        if self.compression is Compression.XBZRLE:
            parts.append(f"XBZRLE cache {self.xbzrle_cache_mib} MiB")
        elif self.compression is Compression.ZSTD:
            parts.append(f"zstd level {self.zstd_level}")
        else:
            parts.append("no compression")
        return ", ".join(parts)


class ConcurrencyLimits(BaseModel):
    """How many migrations may run at once (evacuations set these; 0 means no limit)."""

    model_config = ConfigDict(extra="forbid")

    per_host_outbound: int = Field(default=0, ge=0, le=1000)
    per_host_inbound: int = Field(default=0, ge=0, le=1000)
    region_total: int = Field(default=0, ge=0, le=10000)


class MigrationParams(BaseModel):
    """Knobs for QEMU's migration engine; the defaults are livemig's tuned settings.

    Why these defaults: on a loopback or dedicated migration network bandwidth is plentiful, so a
    high ``max_bandwidth`` finishes pre-copy quickly and a low ``downtime_limit`` keeps the pause in
    the tens of milliseconds. QEMU's own defaults are 300 ms and 128 MiB/s (see bench/pause.py).
    """

    model_config = ConfigDict(extra="forbid")

    downtime_limit_ms: int = Field(default=20, ge=1, le=60_000)
    max_bandwidth_mib_s: int = Field(default=2048, ge=1, le=1_000_000)
    pause_before_switchover: bool = Field(
        default=True,
        description="stop at QEMU's pre-switchover for hostd's hooks (only taken when a VNIC is handed over there)",
    )
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    policy: ConvergencePolicy = Field(default_factory=ConvergencePolicy)
    min_bandwidth_mib_s: int = Field(default=32, ge=1, le=1_000_000,
                                     description="admission: start only when this much is free both ways")  # fmt: skip
    limits: ConcurrencyLimits = Field(default_factory=ConcurrencyLimits)
    policies: MigrationPolicies | None = Field(
        default=None, description="auto-converge, multifd, compression; None: the VM's own (VmSpec.migration)"
    )

    def resolved_policies(self) -> MigrationPolicies:
        """The policies QEMU is told (the LMO resolves None from the VM spec when it creates one)."""
        return self.policies or MigrationPolicies()


class MigrationSample(BaseModel):
    """One ``query-migrate`` reading on the source, with the time it was taken."""

    at: datetime
    status: str
    total_bytes: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    mbps: float = 0.0
    dirty_sync_count: int = 0
    expected_downtime_ms: int | None = None
    pages_sent: int = Field(
        default=0,
        description="RAM pages sent so far, whole or as XBZRLE deltas "
        "(with compression, more than the bytes on the wire say)",
    )
    cpu_throttle_pct: int = Field(default=0, description="auto-converge's current throttle of the vCPUs")

    @property
    def dirty_rate_mib_s(self) -> float:
        return self.dirty_pages_rate * self.page_size / (1024 * 1024)


# The pre-copy history a Migration keeps: enough points for a chart, small enough that a
# 10-minute pre-copy (6,000 readings at hostd's 0.1 s) stays a few tens of KiB in the store, which
# rewrites the record on every controller pass.
SAMPLE_CAP = 240


def merge_samples(
    held: list[MigrationSample], new: list[MigrationSample], cap: int = SAMPLE_CAP
) -> list[MigrationSample]:
    """``held`` plus the readings of ``new`` taken after its last one, at most ``cap`` of them.

    Why not just the latest ``cap``: a chart drawn after the fact needs the whole pre-copy, so
    the history is thinned instead, evenly over time. A reading closer than the current spacing
    (the held span over half the cap) to the one before the newest replaces the newest, so the
    tail is always the latest reading; a reading that starts a new round is never replaced, so the
    chart keeps its round boundaries; when the cap is reached anyway every other reading goes.
    """
    out = list(held)
    for sample in sorted(new, key=lambda s: s.at):
        if out and sample.at <= out[-1].at:
            continue
        if len(out) >= 2 and not _starts_round(out[-2], out[-1]):
            spacing = (out[-1].at - out[0].at).total_seconds() / max(1, cap // 2)
            if (sample.at - out[-2].at).total_seconds() < spacing:
                out[-1] = sample
                continue
        out.append(sample)
        if len(out) > cap:
            out = _thin(out, cap)
    return out


def _starts_round(before: MigrationSample, sample: MigrationSample) -> bool:
    return sample.dirty_sync_count != before.dirty_sync_count or sample.status != before.status


def _thin(samples: list[MigrationSample], cap: int) -> list[MigrationSample]:
    """Every other reading, keeping the first, the last and each round's first; if rounds alone
    overflow the cap (a long auto-converge), every other reading regardless."""
    kept = [s for i, s in enumerate(samples)
            if i % 2 == 0 or i == len(samples) - 1 or _starts_round(samples[i - 1], s)]  # fmt: skip
    if len(kept) > cap:
        kept = [*samples[: len(samples) - 1 : 2], samples[-1]]
    return kept


class MigrationStats(BaseModel):
    """The final numbers QEMU reported for a completed (or failed) migration."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a bug, not a silent drop

    status: str = ""
    pause_ms: int | None = Field(default=None, description="downtime QEMU reported")
    total_ms: int | None = None
    setup_ms: int | None = None
    transferred_bytes: int = 0
    rounds: int = Field(default=0, description="dirty-sync-count: pre-copy rounds")
    mbps: float = 0.0
    duplicate_pages: int = 0
    normal_pages: int = 0
    switchover_hook_ms: float | None = Field(
        default=None, description="time between pre-switchover event and migrate-continue"
    )
    stopped_at: float | None = Field(default=None, description="Unix time QEMU stopped the source guest")
    completed_at: float | None = Field(
        default=None, description="Unix time the source QEMU said completed (it had sent everything)"
    )
    guest_pause_ms: float | None = Field(
        default=None,
        description="source STOP to destination RESUME: the pause the guest saw (QEMU's downtime ends "
        "when the source has sent everything, before the destination has loaded and started)",
    )
    bandwidth_enforced_by: str | None = Field(
        default=None, description="the tc class that held the stream to its share (namespace hosts)"
    )
    shaped_bytes: int | None = Field(default=None, description="bytes that tc class passed")
    cpu_throttle_pct: int | None = Field(default=None, description="the most auto-converge throttled the vCPUs")
    xbzrle_pages: int | None = Field(default=None, description="pages XBZRLE sent as deltas")
    error: str | None = None


class TimelineEntry(BaseModel):
    at: datetime
    phase: Phase
    message: str = ""
    by: str = Field(default="", description="the LMO replica that took this step")
    data: dict[str, Any] = Field(default_factory=dict)
    note: bool = Field(default=False, description="said within a phase (a round's throttle), not a transition")
    fault: Firing | None = Field(default=None, description="a fault point that fired (chaos), not a phase change")


class ConditionType(StrEnum):
    """The facts a migration records besides its phase (see ``Condition``)."""

    BANDWIDTH_RESERVED = "BandwidthReserved"  # admission: the share is reserved, or why it waits
    TARGET_PREPARED = "TargetPrepared"  # the destination QEMU listens (the URI)
    FLOWS_SYNCED = "FlowsSynced"  # which source flow versions the destination holds
    MIGRATION_STARTED = "MigrationStarted"  # the source QEMU was told to migrate
    BANDWIDTH_ENFORCED = "BandwidthEnforced"  # what holds the stream to its share (QEMU, a tc class)
    STREAM_ENCRYPTED = "StreamEncrypted"  # QEMU's TLS on the migration stream, who may send it (or plain)
    DESTINATION_HELD = "DestinationHeld"  # the destination QEMU may not start the guest by itself (and why)


class Condition(BaseModel):
    """A fact independent of phase, e.g. TargetPrepared=True, with when it last changed."""

    type: ConditionType
    status: bool
    at: datetime
    reason: str = ""


class Migration(BaseModel):
    id: str
    vm: str
    source: str
    destination: str
    phase: Phase = Phase.PENDING
    params: MigrationParams = Field(default_factory=MigrationParams)
    verify_guest: bool = True
    reason: str = Field(default="", description="why the migration ended where it did")
    timeline: list[TimelineEntry] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    stats: MigrationStats = Field(default_factory=MigrationStats)
    last_sample: MigrationSample | None = None
    samples: list[MigrationSample] = Field(
        default_factory=list,
        description=f"pre-copy history for charts: at most {SAMPLE_CAP} samples, thinned evenly over time, "
        "every round's first sample kept while there is room",
    )
    incoming_uri: str | None = None
    guest_check: str | None = Field(default=None, description="'ok', 'fail: ...' or None if not run")
    disk_check: str | None = Field(default=None, description="'ok', 'fail: ...' or None if not run")
    cancel_requested: bool = False
    reserved_mib_s: int | None = Field(default=None, description="bandwidth share admitted (QEMU max-bandwidth)")
    evacuation: str | None = None
    rollback_to: Phase | None = Field(default=None, description="terminal phase a rollback ends in")
    flow_versions: dict[str, int] = Field(
        default_factory=dict, description="per VNIC, the source's flow version the destination holds (bulk copy)"
    )
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def transition(self, phase: Phase, message: str = "", at: datetime | None = None, **data: Any) -> None:
        """Move to ``phase`` and say why in the timeline (every phase change goes through here)."""
        self.phase = phase
        self.timeline.append(TimelineEntry(at=at or utcnow(), phase=phase, message=message, data=data))
        log.info("migration %s (%s): %s %s", self.id, self.vm, phase.value, message)

    def note(self, message: str, **data: Any) -> None:
        """Say something in the timeline without a phase change (e.g. a pre-copy round's throttle)."""
        self.timeline.append(TimelineEntry(at=utcnow(), phase=self.phase, message=message, data=data, note=True))
        log.info("migration %s (%s): %s %s", self.id, self.vm, self.phase.value, message)

    def phase_started(self, phase: Phase) -> datetime | None:
        """When the migration first entered ``phase`` (notes within a phase do not move it)."""
        return next((e.at for e in self.timeline if e.phase is phase), None)

    def record_firing(self, firing: Firing, by: str = "") -> bool:
        """Put a fault point's firing in the timeline, in time order and under the phase the
        migration was in when it fired (once: False if it is there already)."""
        if any(e.fault is not None and e.fault.id == firing.id for e in self.timeline):
            return False
        where = firing.service + (f" on {firing.host}" if firing.host and firing.service != "lmo" else "")
        index = len(self.timeline)
        while index > 0 and self.timeline[index - 1].at > firing.at:
            index -= 1
        before = [e.phase for e in self.timeline[:index] if e.fault is None and not e.note]
        phase = before[-1] if before else next((e.phase for e in self.timeline if e.fault is None), self.phase)
        message = f"fault {firing.point}={firing.action} fired in {where}"
        self.timeline.insert(index, TimelineEntry(at=firing.at, phase=phase, fault=firing, by=by, message=message))
        return True

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type is type_), None)

    def record_samples(self, new: list[MigrationSample]) -> None:
        """Add the samples newer than the ones held (hostd reports overlapping windows) and keep
        the history within ``SAMPLE_CAP``; ``last_sample`` stays the newest reading."""
        self.samples = merge_samples(self.samples, new)
        if self.samples:
            self.last_sample = self.samples[-1]

    def set_condition(self, type_: ConditionType, status: bool, reason: str = "") -> None:
        for condition in self.conditions:
            if condition.type == type_:
                if condition.status != status or condition.reason != reason:
                    condition.status, condition.reason, condition.at = status, reason, utcnow()
                return
        self.conditions.append(Condition(type=type_, status=status, at=utcnow(), reason=reason))
