"""Convergence judgement: decide early whether pre-copy can finish, from QEMU's own numbers.

Why predict instead of waiting for a timeout: pre-copy sends memory at bandwidth B while the guest
dirties it at rate D. Each round sends what the previous round left dirty, so the remaining data
shrinks by about D/B per round. If D >= B it never shrinks: the migration cannot converge under
any downtime limit, and every second spent on it steals the reserved bandwidth from others. So
after a few rounds (enough for QEMU's dirty-rate estimate to settle) we abort with the numbers.
If D < B we can also predict the time left (remaining / (B - D)) and abort when even that exceeds
the completion budget. A no-progress timer catches what the model misses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from livemig.model.migration import ConvergencePolicy, MigrationSample

MIB = 1024 * 1024


@dataclass(frozen=True)
class Verdict:
    abort: bool
    reason: str = ""


def judge(
    samples: list[MigrationSample],
    policy: ConvergencePolicy,
    bandwidth_mib_s: float,
    memory_mib: int,
    started: datetime,
) -> Verdict:
    """Continue or abort, from the ``query-migrate`` samples seen so far (oldest first)."""
    active = [s for s in samples if s.status == "active"]
    if not active:
        return Verdict(False)
    last = active[-1]
    elapsed = (last.at - started).total_seconds()
    budget = policy.completion_timeout_s_per_gib * max(memory_mib / 1024, 0.25)
    if elapsed > budget:
        return Verdict(True, f"pre-copy not complete after {elapsed:.0f} s (budget {budget:.0f} s for "
                             f"{memory_mib} MiB); {last.remaining_bytes / MIB:.0f} MiB still dirty")  # fmt: skip
    rounds = last.dirty_sync_count
    dirty = last.dirty_rate_mib_s
    if rounds >= policy.min_rounds and dirty > 0:
        if dirty >= bandwidth_mib_s * policy.rate_margin:
            return Verdict(True, f"dirty rate {dirty:.0f} MiB/s exceeds reserved bandwidth "
                                 f"{bandwidth_mib_s:.0f} MiB/s after {rounds} rounds")  # fmt: skip
        predicted = last.remaining_bytes / MIB / max(bandwidth_mib_s - dirty, 1e-6)
        if elapsed + predicted > budget and rounds >= policy.max_rounds:
            return Verdict(True, f"predicted {predicted:.0f} s more (dirty {dirty:.0f} MiB/s, bandwidth "
                                 f"{bandwidth_mib_s:.0f} MiB/s) exceeds the {budget:.0f} s budget")  # fmt: skip
    best = min(active, key=lambda s: s.remaining_bytes)
    stalled = (last.at - best.at).total_seconds()
    if rounds >= policy.min_rounds and stalled > policy.no_progress_timeout_s:
        return Verdict(True, f"no progress for {stalled:.0f} s: remaining stuck at "
                             f"{best.remaining_bytes / MIB:.0f} MiB")  # fmt: skip
    return Verdict(False)
