"""Convergence judgement: decide early whether pre-copy can finish, from QEMU's own numbers.

Why predict instead of waiting for a timeout: pre-copy sends memory at bandwidth B while the guest
dirties it at rate D. Each round sends what the previous round left dirty, so the remaining data
shrinks by about D/B per round. If D >= B it never shrinks: the migration cannot converge under
any downtime limit, and every second spent on it steals the reserved bandwidth from others. So
after a few rounds (enough for QEMU's dirty-rate estimate to settle) we abort with the numbers.
If D < B we can also predict the time left (remaining / (B - D)) and abort when even that exceeds
the completion budget. A no-progress timer catches what the model misses.

The migration's policies change the model. With compression, B is the rate at which pages leave
(what QEMU counts as pages sent), which exceeds the wire's bandwidth by the compression ratio.
With auto-converge, D >= B is not the end: QEMU throttles the vCPUs a step per round, which lowers
D, so the migration continues until the throttle has stood at its maximum for
``THROTTLE_MAX_ROUNDS`` rounds without the dirty rate falling below B; while it still rises, a
remaining that does not shrink is no stall (QEMU raises the throttle every other round, and a guest
that paces its writes keeps its working set dirty until the throttle bites). The completion
budget still holds: allow for the ramp when choosing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from livemig.model.migration import Compression, ConvergencePolicy, MigrationPolicies, MigrationSample

MIB = 1024 * 1024
#: rounds the throttle may stay at its maximum before a migration still outrun is aborted
THROTTLE_MAX_ROUNDS = 2
#: how far back the page rate of a compressed stream is measured
PAGE_RATE_WINDOW_S = 3.0


@dataclass(frozen=True)
class Verdict:
    abort: bool
    reason: str = ""
    throttled: str = ""  # why the guest is throttled instead of aborted ("" when not)


def page_rate_mib_s(samples: list[MigrationSample]) -> float | None:
    """MiB/s of guest pages sent over the last few seconds (None without two readings)."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    first = next((s for s in samples if (last.at - s.at).total_seconds() <= PAGE_RATE_WINDOW_S), last)
    seconds = (last.at - first.at).total_seconds()
    if seconds <= 0 or last.pages_sent <= first.pages_sent:
        return None
    return (last.pages_sent - first.pages_sent) * last.page_size / MIB / seconds


def judge(
    samples: list[MigrationSample],
    policy: ConvergencePolicy,
    bandwidth_mib_s: float,
    memory_mib: int,
    started: datetime,
    policies: MigrationPolicies | None = None,
) -> Verdict:
    """Continue or abort, from the ``query-migrate`` samples seen so far (oldest first)."""
    policies = policies or MigrationPolicies()
    active = [s for s in samples if s.status == "active"]
    if not active:
        return Verdict(False)
    last = active[-1]
    elapsed = (last.at - started).total_seconds()
    budget = policy.completion_timeout_s_per_gib * max(memory_mib / 1024, 0.25)
    if elapsed > budget:
        return Verdict(True, f"pre-copy not complete after {elapsed:.0f} s (budget {budget:.0f} s for "
                             f"{memory_mib} MiB); {last.remaining_bytes / MIB:.0f} MiB still dirty")  # fmt: skip
    capacity, by = float(bandwidth_mib_s), f"reserved bandwidth {bandwidth_mib_s:.0f} MiB/s"
    if policies.compression is not Compression.NONE:
        pages = page_rate_mib_s(active)
        if pages is not None and pages > capacity:
            capacity, by = pages, f"{pages:.0f} MiB/s of pages sent ({policies.compression.value}, " \
                                  f"{bandwidth_mib_s:.0f} MiB/s reserved)"  # fmt: skip
    ac = policies.auto_converge
    rounds = last.dirty_sync_count
    dirty = last.dirty_rate_mib_s
    throttle_rising = ac.enabled and _rounds_at_max(active, ac.max_pct) < THROTTLE_MAX_ROUNDS
    if rounds >= policy.min_rounds and dirty > 0:
        if dirty >= capacity * policy.rate_margin:
            outrun = f"dirty rate {dirty:.0f} MiB/s exceeds {by} after {rounds} rounds"
            if throttle_rising:
                return Verdict(False, throttled=f"{outrun}: auto-converge throttles the vCPUs "
                                                f"({last.cpu_throttle_pct}% now, up to {ac.max_pct}%)")  # fmt: skip
            if ac.enabled:
                return Verdict(True, f"{outrun}, with the vCPUs throttled to {last.cpu_throttle_pct}% "
                                     f"for {THROTTLE_MAX_ROUNDS} rounds")  # fmt: skip
            return Verdict(True, outrun)
        predicted = last.remaining_bytes / MIB / max(capacity - dirty, 1e-6)
        if elapsed + predicted > budget and rounds >= policy.max_rounds and not throttle_rising:
            return Verdict(True, f"predicted {predicted:.0f} s more (dirty {dirty:.0f} MiB/s, {by}) "
                                 f"exceeds the {budget:.0f} s budget")  # fmt: skip
    best = min(active, key=lambda s: s.remaining_bytes)
    stalled = (last.at - best.at).total_seconds()
    # while auto-converge still raises the throttle, a stuck remaining is expected (a paced guest
    # keeps its working set dirty until the throttle bites): each step is the progress
    if rounds >= policy.min_rounds and stalled > policy.no_progress_timeout_s and not throttle_rising:
        return Verdict(True, f"no progress for {stalled:.0f} s: remaining stuck at "
                             f"{best.remaining_bytes / MIB:.0f} MiB")  # fmt: skip
    return Verdict(False)


def _rounds_at_max(samples: list[MigrationSample], max_pct: int) -> int:
    """How many rounds the throttle has stood at its maximum (0: not there yet)."""
    at_max = next((s for s in samples if s.cpu_throttle_pct >= max_pct), None)
    return 0 if at_max is None else samples[-1].dirty_sync_count - at_max.dirty_sync_count
