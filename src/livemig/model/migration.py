"""A Migration: its phase, its timeline, and the numbers QEMU reported.

Phases are data (a string enum) so the store, the API and the CLI all speak the same words, and
the timeline records every transition with a timestamp so every migration explains itself.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    auto_converge: bool = Field(default=False, description="let QEMU throttle the guest's vCPUs")


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
    pause_before_switchover: bool = True
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    policy: ConvergencePolicy = Field(default_factory=ConvergencePolicy)
    min_bandwidth_mib_s: int = Field(default=32, ge=1, le=1_000_000,
                                     description="admission: start only when this much is free both ways")  # fmt: skip
    limits: ConcurrencyLimits = Field(default_factory=ConcurrencyLimits)


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
    guest_pause_ms: float | None = Field(
        default=None,
        description="source STOP to destination RESUME: the pause the guest saw (QEMU's downtime ends "
        "when the source has sent everything, before the destination has loaded and started)",
    )
    bandwidth_enforced_by: str | None = Field(
        default=None, description="the tc class that held the stream to its share (namespace hosts)"
    )
    shaped_bytes: int | None = Field(default=None, description="bytes that tc class passed")
    error: str | None = None


class TimelineEntry(BaseModel):
    at: datetime
    phase: Phase
    message: str = ""
    by: str = Field(default="", description="the LMO replica that took this step")
    data: dict[str, Any] = Field(default_factory=dict)


class ConditionType(StrEnum):
    """The facts a migration records besides its phase (see ``Condition``)."""

    BANDWIDTH_RESERVED = "BandwidthReserved"  # admission: the share is reserved, or why it waits
    TARGET_PREPARED = "TargetPrepared"  # the destination QEMU listens (the URI)
    FLOWS_SYNCED = "FlowsSynced"  # which source flow versions the destination holds
    MIGRATION_STARTED = "MigrationStarted"  # the source QEMU was told to migrate
    BANDWIDTH_ENFORCED = "BandwidthEnforced"  # what holds the stream to its share (QEMU, a tc class)


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
