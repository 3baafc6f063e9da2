"""The source side of one migration, run inside hostd.

Why in hostd and not in the LMO: the pause-before-switchover hook runs while the guest is paused,
and QEMU counts the hook in the downtime it reports. So the reaction to the ``pre-switchover``
event must be local: a QMP event listener on the source host issues ``migrate-continue``
immediately (and, later, the final flow-state delta), never a poll loop or a round trip to the LMO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from livemig.errors import LivemigError, QemuError
from livemig.faults.points import fault_point
from livemig.faults.registry import REGISTRY
from livemig.host.qmp import event_time
from livemig.host.runtime import Qmp
from livemig.host.shaping import ShapedMigration
from livemig.model.migration import Compression, MigrationParams, MigrationPolicies, MigrationSample, MigrationStats
from livemig.wire.hostd import JobState, MigrationEvent, SourceMigrationStatus, VnicHandoff

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.1
FINAL_STATUSES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
#: QEMU's migration statuses before the source was told to continue: a failed job cancels these
BEFORE_CONTINUE = frozenset({"setup", "active", "pre-switchover", "wait-unplug"})
#: how long a failed job waits for QEMU to reach a final status (after its cancel, or after it was
#: already told to continue)
SETTLE_S = 30.0
#: how long a source told to continue may still say ``pre-switchover``: QEMU answers
#: ``migrate-continue`` at once and its migration thread leaves the state when it next runs
#: (on busy cores, many milliseconds later)
CONTINUE_GRACE_S = 1.0
SwitchoverHook = Callable[[], Awaitable[None]]
#: fault points that exist only when QEMU stops at pre-switchover for hostd
PAUSE_POINTS = ("hostd.switchover", "hostd.src.event.MIGRATION.pre-switchover", "hostd.src.qmp.migrate-continue",
                "hostd.src.qmp.migrate-continue.reply")  # fmt: skip
#: the capabilities and parameters a migration's record shows as QEMU reports them
REPORTED_CAPABILITIES = ("pause-before-switchover", "auto-converge", "multifd", "xbzrle")
REPORTED_PARAMETERS = ("downtime-limit", "max-bandwidth", "cpu-throttle-initial", "cpu-throttle-increment",
                       "max-cpu-throttle", "multifd-channels", "multifd-compression", "multifd-zstd-level",
                       "xbzrle-cache-size")  # fmt: skip


def sample_from(reply: dict[str, Any]) -> MigrationSample:
    """Turn a ``query-migrate`` reply into a typed sample."""
    ram = reply.get("ram", {})
    return MigrationSample(
        at=datetime.now(UTC),
        status=reply.get("status", "none"),
        total_bytes=ram.get("total", 0),
        transferred_bytes=ram.get("transferred", 0),
        remaining_bytes=ram.get("remaining", 0),
        dirty_pages_rate=ram.get("dirty-pages-rate", 0),
        page_size=ram.get("page-size", 4096) or 4096,
        mbps=float(ram.get("mbps", 0.0)),
        dirty_sync_count=ram.get("dirty-sync-count", 0),
        expected_downtime_ms=reply.get("expected-downtime"),
        pages_sent=ram.get("normal", 0) + reply.get("xbzrle-cache", {}).get("pages", 0),
        cpu_throttle_pct=reply.get("cpu-throttle-percentage", 0),
    )


def policy_capabilities(policies: MigrationPolicies, *, source: bool) -> list[dict[str, Any]]:
    """QEMU's capabilities for the policies. Every one is set, on or off, so a QEMU that migrated
    before with other policies forgets them. The destination needs multifd only (auto-converge and
    XBZRLE act on the sending side; XBZRLE pages decode anywhere)."""
    capabilities = [{"capability": "multifd", "state": policies.multifd}]
    if source:
        capabilities += [
            {"capability": "auto-converge", "state": policies.auto_converge.enabled},
            {"capability": "xbzrle", "state": policies.compression is Compression.XBZRLE},
        ]
    return capabilities


def policy_parameters(policies: MigrationPolicies) -> dict[str, Any]:
    """QEMU's migration parameters for the policies (both ends: multifd's must match)."""
    ac = policies.auto_converge
    parameters: dict[str, Any] = {
        "cpu-throttle-initial": ac.initial_pct,
        "cpu-throttle-increment": ac.increment_pct,
        "max-cpu-throttle": ac.max_pct,
        "multifd-compression": "zstd" if policies.compression is Compression.ZSTD else "none",
        "multifd-zstd-level": policies.zstd_level,
    }
    if policies.multifd:
        parameters["multifd-channels"] = policies.multifd_channels
    if policies.compression is Compression.XBZRLE:  # QEMU refuses a cache larger than the guest's RAM
        parameters["xbzrle-cache-size"] = policies.xbzrle_cache_mib * 1024 * 1024
    return parameters


def stats_from(reply: dict[str, Any], hook_ms: float | None, stopped_at: float | None = None) -> MigrationStats:
    ram = reply.get("ram", {})
    return MigrationStats(
        status=reply.get("status", ""),
        pause_ms=reply.get("downtime"),
        total_ms=reply.get("total-time"),
        setup_ms=reply.get("setup-time"),
        transferred_bytes=ram.get("transferred", 0),
        rounds=ram.get("dirty-sync-count", 0),
        mbps=float(ram.get("mbps", 0.0)),
        duplicate_pages=ram.get("duplicate", 0),
        normal_pages=ram.get("normal", 0),
        switchover_hook_ms=hook_ms,
        stopped_at=stopped_at,
        xbzrle_pages=reply["xbzrle-cache"].get("pages") if "xbzrle-cache" in reply else None,
        error=reply.get("error-desc"),
    )


class SourceMigration:
    """Drives ``migrate`` on the source QEMU and records events, samples and final stats."""

    def __init__(
        self,
        vm: str,
        qmp: Qmp,
        uri: str,
        params: MigrationParams,
        switchover_hooks: list[SwitchoverHook] | None = None,
        after_failed_switchover: SwitchoverHook | None = None,
        shaped: ShapedMigration | None = None,
        handoffs: list[VnicHandoff] | None = None,
        host: str | None = None,
        on_end: Callable[[JobState], None] | None = None,
    ) -> None:
        self.vm = vm
        self.on_end = on_end  # told once how the job ended (hostd's metrics)
        self.host = host
        self.qmp = qmp
        self.uri = uri
        self.params = params
        self.switchover_hooks = switchover_hooks or []
        self.after_failed_switchover = after_failed_switchover
        self.hooks_ran = False
        self.continue_sent = False  # migrate-continue was written to QEMU (its answer may be lost)
        self.state = JobState.RUNNING
        self.events: list[MigrationEvent] = []
        self.samples: deque[MigrationSample] = deque(maxlen=3000)
        self.stats: MigrationStats | None = None
        self.error: str | None = None
        self.hook_ms: float | None = None
        self.stopped_at: float | None = None  # wall clock of QEMU's STOP event (the pause began)
        self.task: asyncio.Task[None] | None = None
        self.shaped = shaped  # the tc class holding this stream to its share (namespace hosts)
        self.handoffs = list(handoffs or [])  # VNICs handed over inside the pause (agent.py)
        self.qemu_settings: dict[str, Any] = {}
        self.qemu_ignored: dict[str, Any] = {}  # what QEMU accepted but did not take (asked vs its answer)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"migrate-{self.vm}")

    @property
    def pauses_before_switchover(self) -> bool:
        """Whether QEMU stops at ``pre-switchover`` for hostd: only when a hook has work there.

        Why not always: the stop costs an event and a ``migrate-continue`` round trip inside the
        guest's pause (a few ms here, most of the gap between QEMU's and livemig's pause); a VM
        with no VNIC to hand over gains nothing from it. A fault armed at a point of the pause
        (``hostd.switchover``, the ``pre-switchover`` event, ``migrate-continue``) keeps it, so a
        chaos run can still hold a source there."""
        return self.params.pause_before_switchover and (bool(self.switchover_hooks) or self._faults_need_pause())

    def _faults_need_pause(self) -> bool:
        if not REGISTRY.armed:
            return False
        scope = REGISTRY.scope(self.vm, self.host)
        return any(REGISTRY.matches(point, scope) for point in PAUSE_POINTS)

    async def configure(self) -> None:
        """Set capabilities and parameters; separate so errors reach the API caller directly."""
        policies = self.params.resolved_policies()
        capabilities = [
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": self.pauses_before_switchover},
            *policy_capabilities(policies, source=True),
        ]
        parameters = {
            "downtime-limit": self.params.downtime_limit_ms,
            "max-bandwidth": self.params.max_bandwidth_mib_s * 1024 * 1024,
            **policy_parameters(policies),
        }
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
        await self.qmp.execute("migrate-set-parameters", parameters)
        self.qemu_settings = await self._read_back()
        asked = {**{str(c["capability"]): c["state"] for c in capabilities}, **parameters}
        self.qemu_ignored = {key: {"asked": value, "qemu": self.qemu_settings[key]} for key, value in asked.items()
                             if key in self.qemu_settings and self.qemu_settings[key] != value}  # fmt: skip
        if self.qemu_ignored:  # e.g. QEMU 7.2 accepts multifd-zstd-level and keeps 1
            log.warning("migration of %s: QEMU did not take %s", self.vm, self.qemu_ignored)

    async def _read_back(self) -> dict[str, Any]:
        """The migration settings as the source QEMU reports them, for the record: the timeline
        then shows QEMU's word for each policy, not only what was asked."""
        capabilities = await self.qmp.execute("query-migrate-capabilities")
        parameters: dict[str, Any] = await self.qmp.execute("query-migrate-parameters")
        caps = {
            str(c["capability"]): bool(c["state"]) for c in capabilities if c["capability"] in REPORTED_CAPABILITIES
        }
        return {**caps, **{k: v for k, v in parameters.items() if k in REPORTED_PARAMETERS}}

    async def _run(self) -> None:
        sampler: asyncio.Task[None] | None = None
        state = JobState.FAILED
        try:
            with self.qmp.listener("MIGRATION", "STOP") as listener:
                await self.qmp.execute("migrate", {"uri": self.uri})
                sampler = asyncio.create_task(self._sample_loop())
                async for message in listener:
                    event: dict[str, Any] = dict(message)
                    seconds = event_time(event)
                    if REGISTRY.armed:
                        await self._event_point(event)
                    if event.get("event") == "STOP":
                        self.stopped_at = seconds  # the network hand-off tells late frames by it
                        continue
                    status = str(event["data"]["status"])
                    self.events.append(MigrationEvent(at=datetime.fromtimestamp(seconds, UTC), status=status))
                    if status == "pre-switchover":
                        await self._switchover()
                    if status in FINAL_STATUSES:
                        break
            reply = await self._final_reply()
            self.stats = stats_from(reply, self.hook_ms, self.stopped_at)
            done = next((e for e in self.events if e.status == JobState.COMPLETED.value), None)
            throttle = max((s.cpu_throttle_pct for s in self.samples), default=0)
            self.stats.cpu_throttle_pct = throttle if self.params.resolved_policies().auto_converge.enabled else None
            self.stats.completed_at = done.at.timestamp() if done is not None else None
            if self.shaped is not None:
                self.stats.bandwidth_enforced_by = self.shaped.describe()
                self.stats.shaped_bytes = await asyncio.to_thread(self.shaped.bytes_sent)
            self.samples.append(sample_from(reply))
            final = str(reply.get("status", "failed"))
            state = JobState(final) if final in FINAL_STATUSES else JobState.FAILED
            self.error = reply.get("error-desc")
        except LivemigError as exc:
            self.error = exc.message
            log.warning("migration of %s failed in hostd: %s", self.vm, exc.message)
            state = await self._settle()
        except Exception as exc:  # a bug must still end the job, never leave it "running"
            self.error = f"internal error: {exc!r}"
            log.exception("migration of %s crashed", self.vm)
            state = await self._settle()
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            if self.shaped is not None:
                await asyncio.to_thread(self.shaped.release)
        if state is not JobState.COMPLETED and self.hooks_ran and self.after_failed_switchover is not None:
            # the source runs on: undo what the hooks handed off (also when the job failed in hostd)
            try:
                await self.after_failed_switchover()
            except LivemigError as exc:
                log.warning("migration of %s: taking the network back failed: %s", self.vm, exc.message)
        self._end(state)

    def _end(self, state: JobState) -> None:
        """The job ended in ``state``: said once (in the log and to ``on_end``)."""
        if self.state is not JobState.RUNNING:
            return
        self.state = state
        pause = f", QEMU downtime {self.stats.pause_ms} ms" if self.stats is not None and self.stats.pause_ms else ""
        error = f": {self.error}" if self.error and state is not JobState.COMPLETED else ""
        log.info("migration of %s to %s ended %s%s%s", self.vm, self.uri, state.value, pause, error)
        if self.on_end is not None:
            self.on_end(state)

    async def _event_point(self, event: dict[str, Any]) -> None:
        """``hostd.src.event.STOP`` / ``hostd.src.event.MIGRATION.<status>``: before hostd handles it."""
        name = str(event.get("event"))
        if name == "MIGRATION":
            name = f"MIGRATION.{event.get('data', {}).get('status')}"
        await REGISTRY.fire(f"hostd.src.event.{name}", vm=self.vm, host=self.host)

    async def _settle(self) -> JobState:
        """The job failed in hostd (a QMP answer lost, an event not handled): QEMU's migration may
        still run, and nobody would answer its pause. Cancel it if the source was not yet told to
        continue; otherwise let it finish. The job ends in what QEMU says, never in hostd's guess:
        a migration QEMU completed is ``completed`` even if hostd lost the answer to its continue."""
        try:
            status = await self._qemu_status()
            if status == "pre-switchover" and self.continue_sent:
                status = await self._status_after_continue()
            if status in BEFORE_CONTINUE:
                log.warning("migration of %s: cancelling QEMU's migration (%s)", self.vm, status)
                await self.qmp.execute("migrate_cancel")
            deadline = asyncio.get_running_loop().time() + SETTLE_S
            while status not in {s.value for s in FINAL_STATUSES} and status != "none":
                if asyncio.get_running_loop().time() > deadline:
                    return JobState.FAILED
                await asyncio.sleep(0.05)
                status = await self._qemu_status()
        except (LivemigError, OSError) as exc:
            log.warning("migration of %s: QEMU's status unknown after the failure: %s", self.vm, exc)
            return JobState.FAILED
        if status == JobState.COMPLETED and self.events:  # this job's migration (not an earlier one's)
            log.warning("migration of %s: QEMU completed it despite hostd's failure", self.vm)
            reply = await self._final_reply()
            self.stats = stats_from(reply, self.hook_ms, self.stopped_at)
            return JobState.COMPLETED
        return JobState.FAILED

    async def _qemu_status(self) -> str:
        """QEMU's migration status (``none`` when it runs no migration)."""
        return str((await self.qmp.execute("query-migrate")).get("status", "none"))

    async def _status_after_continue(self) -> str:
        """QEMU's status once a continue it was sent had time to take effect: a source still
        paused after :data:`CONTINUE_GRACE_S` never got it (and is cancelled); one that moved on
        must be let finish, or the destination's load fails half-way (the chaos matrix's
        ``switchover/qemu-src/error`` row caught a cancel sent in that moment)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONTINUE_GRACE_S
        status = "pre-switchover"
        while status == "pre-switchover" and loop.time() < deadline:
            await asyncio.sleep(0.02)
            status = await self._qemu_status()
        return status

    async def _final_reply(self) -> dict[str, Any]:
        """``query-migrate`` once QEMU has filled in its final numbers.

        QEMU emits the ``completed`` event slightly before it computes total-time and downtime
        (migration_calculate_complete runs after the state change), so an immediate query can
        read zeros. Re-query briefly until they appear.
        """
        reply: dict[str, Any] = await self.qmp.execute("query-migrate")
        for _ in range(50):
            if reply.get("status") != "completed" or reply.get("total-time"):
                break
            await asyncio.sleep(0.01)
            reply = await self.qmp.execute("query-migrate")
        return reply

    async def _switchover(self) -> None:
        """Inside the pause: run the hooks (fast!), then let QEMU send the final state.

        A failing hook cancels instead: at pre-switchover QEMU can still resume the source, so
        the guest never notices; continuing would hand it to a destination we know is not ready.
        """
        started = time.perf_counter()
        try:
            await fault_point("hostd.switchover", vm=self.vm, host=self.host)
            self.hooks_ran = bool(self.switchover_hooks)
            for hook in self.switchover_hooks:
                await hook()
        except BaseException:
            await self.qmp.execute("migrate_cancel")
            raise
        hooked = time.perf_counter()
        self.continue_sent = True
        await self.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        self.hook_ms = (time.perf_counter() - started) * 1000
        log.info("migration of %s: switchover hooks %.1f ms, migrate-continue %.1f ms", self.vm,
                 (hooked - started) * 1000, self.hook_ms - (hooked - started) * 1000)  # fmt: skip

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.samples.append(sample_from(await self.qmp.execute("query-migrate")))
            except QemuError:
                return
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def cancel(self) -> None:
        if self.state is JobState.RUNNING:
            await self.qmp.execute("migrate_cancel")

    def abandon(self, reason: str) -> None:
        """End the job without QEMU (it is gone): failed, with ``reason``."""
        self.error = reason
        log.warning("migration of %s abandoned: %s", self.vm, reason)
        self._end(JobState.FAILED)
        if self.task is not None:
            self.task.cancel()

    def status(self, since_samples: int = 0) -> SourceMigrationStatus:
        samples = list(self.samples)
        if since_samples > 0:
            chosen = samples[since_samples:]
        else:  # compact history: the first sample of every round, then the latest few
            firsts = {s.dirty_sync_count: s for s in reversed(samples)}
            recent = samples[-20:]
            chosen = sorted({id(s): s for s in [*firsts.values(), *recent]}.values(), key=lambda s: s.at)
        return SourceMigrationStatus(
            vm=self.vm,
            uri=self.uri,
            state=self.state,
            events=list(self.events),
            samples=chosen,
            stats=self.stats,
            error=self.error,
            enforced_by=self.shaped.describe() if self.shaped is not None else None,
            qemu_settings=dict(self.qemu_settings),
            qemu_ignored=dict(self.qemu_ignored),
        )
