"""The wave planner: how long an evacuation takes, before anything moves.

Three pieces, each small enough to check by hand:

- **One migration** (:func:`predict`): pre-copy as QEMU runs it. The first round sends the guest's
  payload (its RAM without zero pages) at the reserved share; each later round sends what the guest
  dirtied meanwhile, until a round fits in the downtime limit. Whether the convergence policy
  would give up comes from the same numbers it judges (``control/policy.py``): a guest that dirties
  memory about as fast as the share (``rate_margin``) never converges and is aborted after
  ``min_rounds`` rounds, unless auto-converge may throttle it; one dirtying at least half the share
  (each round then at most halves what is left) or needing more than the completion budget is
  marked as likely to need auto-converge.
- **Calibration** (:func:`calibrate`): what the model cannot know, learned from recent finished
  migrations: the time a migration spends outside pre-copy (preparing the target, cut-over, the
  guest checks, the controller's passes), the bandwidth pre-copy really reaches, and the fraction
  of RAM that travels. A fresh region uses defaults and says so (``basis`` 0).
- **The schedule** (:func:`schedule`): the controller's admission replayed in simulated time with
  the same :class:`~livemig.control.admission.Ledger`: migrations start in the order the evacuation
  creates them as soon as the limits and bandwidth budgets allow, each with the share it would get,
  and never more at once than the LMO's replicas drive (their capacities summed), nor ending
  faster than the LMO's own measured pace while as many run as when it was measured: in a wave
  of thousands, that, not the hosts, is often what sets the pace.

The wave's predicted time is when its last migration ends.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from livemig.control.admission import Ledger
from livemig.control.store import Reservation
from livemig.model.migration import ConcurrencyLimits, Migration, MigrationParams, Phase
from livemig.wire.lmo import LmoPace, PlanCalibration, PlannedMigration, Verdict

MIB = 1024 * 1024
#: a guest dirtying at least this fraction of its share converges too slowly without a throttle
SLOW_RATIO = 0.5
#: rounds beyond which pre-copy is considered not to converge (QEMU would go on; the policy not)
MAX_ROUNDS = 1000
DEFAULT_OVERHEAD_S = 2.0
DEFAULT_EFFICIENCY = 1.0
DEFAULT_PAYLOAD = 1.0


@dataclass(frozen=True)
class Prediction:
    duration_s: float
    precopy_s: float
    rounds: int
    verdict: Verdict
    reason: str


def predict(memory_mib: int, dirty_mib_s: float, share_mib_s: int, params: MigrationParams,
            calibration: PlanCalibration) -> Prediction:  # fmt: skip
    """One migration of a guest of ``memory_mib`` dirtying ``dirty_mib_s`` at a ``share_mib_s`` share:
    pre-copy in QEMU's seconds, its duration in the LMO's."""
    scale = max(calibration.time_scale, 1e-6)
    policy = params.policy
    auto_converge = params.resolved_policies().auto_converge.enabled
    bandwidth = max(share_mib_s * calibration.efficiency, 1e-6)
    payload = max(memory_mib * calibration.payload, 1.0)
    limit_s = params.downtime_limit_ms / 1000
    budget = policy.completion_timeout_s_per_gib * max(memory_mib / 1024, 0.25)
    if dirty_mib_s >= share_mib_s * policy.rate_margin:
        rounds = policy.min_rounds
        elapsed = payload / bandwidth + (rounds - 1) * min(dirty_mib_s * payload / bandwidth, memory_mib) / bandwidth
        if auto_converge:
            # QEMU throttles the vCPUs until the guest dirties less than the link carries; assume it
            # takes the guest to half the share, then pre-copy converges as for such a guest
            tail = _precopy(payload, memory_mib, share_mib_s * SLOW_RATIO, bandwidth, limit_s)
            return Prediction(calibration.overhead_s + (elapsed + tail[0]) / scale, elapsed + tail[0], rounds + tail[1],
                              "auto-converge", f"dirties {dirty_mib_s:.0f} MiB/s at a {share_mib_s} MiB/s share: "
                              "converges only with QEMU throttling its vCPUs")  # fmt: skip
        return Prediction(calibration.overhead_s + elapsed / scale, elapsed, rounds, "abort",
                          f"dirties {dirty_mib_s:.0f} MiB/s, at least {policy.rate_margin:.0%} of its "
                          f"{share_mib_s} MiB/s share: the policy aborts it after {rounds} rounds")  # fmt: skip
    precopy, rounds = _precopy(payload, memory_mib, dirty_mib_s, bandwidth, limit_s)
    duration = calibration.overhead_s + precopy / scale
    if rounds >= MAX_ROUNDS or precopy > budget:
        return Prediction(duration, precopy, rounds, "abort" if not auto_converge else "auto-converge",
                          f"pre-copy would take {precopy:.0f} s, over the {budget:.0f} s budget")  # fmt: skip
    if dirty_mib_s >= share_mib_s * SLOW_RATIO:
        return Prediction(duration, precopy, rounds, "auto-converge",
                          f"dirties {dirty_mib_s:.0f} MiB/s at a {share_mib_s} MiB/s share: {rounds} rounds; "
                          "auto-converge would shorten it")  # fmt: skip
    return Prediction(duration, precopy, rounds, "ok", f"{rounds} rounds at {share_mib_s} MiB/s")


def _precopy(payload_mib: float, memory_mib: float, dirty_mib_s: float, bandwidth: float,
             limit_s: float) -> tuple[float, int]:  # fmt: skip
    """Seconds and rounds of pre-copy, the last (paused) round included."""
    to_send, elapsed, rounds = payload_mib, 0.0, 0
    while rounds < MAX_ROUNDS:
        rounds += 1
        duration = to_send / bandwidth
        elapsed += duration
        to_send = min(dirty_mib_s * duration, memory_mib)
        if to_send / bandwidth <= limit_s:
            return elapsed + to_send / bandwidth, rounds
    return elapsed, rounds


def _span(m: Migration, start: Phase, end: frozenset[Phase]) -> float | None:
    first = next((e.at for e in m.timeline if e.phase is start), None)
    last = next((e.at for e in m.timeline if e.phase in end), None)
    return None if first is None or last is None else (last - first).total_seconds()


def calibrate(recent: Sequence[Migration], default_dirty_rate_mib_s: float) -> PlanCalibration:
    """Overhead, efficiency, payload and time scale from recent successful migrations.

    QEMU's own numbers (its total time, the bytes it moved, the zero pages it skipped) give the
    efficiency and the payload (medians). How QEMU's seconds relate to the LMO's while pre-copy
    runs comes from the timeline: pre-copy's span on the LMO's clock against QEMU's total time,
    fitted as a line when the
    migrations differ enough in length (the controller notices the end a little late, a constant),
    else their ratio; on real hosts about 1, in a simulated fleet its speed. The overhead is the
    rest of each migration's span (Validating to Succeeded), the median."""
    efficiencies: list[float] = []
    payloads: list[float] = []
    timed: list[tuple[float, float, float]] = []  # QEMU's total s, pre-copy's span, Validating..Succeeded
    for m in recent:
        if m.phase is not Phase.SUCCEEDED or not m.stats.total_ms or not m.reserved_mib_s:
            continue
        total = _span(m, Phase.VALIDATING, frozenset({Phase.SUCCEEDED}))
        precopy = _span(m, Phase.PRECOPY, frozenset({Phase.CUTTING_OVER}))
        if total is None or precopy is None or precopy <= 0:
            continue
        qemu_s = m.stats.total_ms / 1000
        timed.append((qemu_s, precopy, total))
        moved_mib = m.stats.transferred_bytes / MIB
        efficiencies.append(min(max(moved_mib / qemu_s / m.reserved_mib_s, 0.05), 1.0))
        payload = _payload(m, moved_mib, qemu_s)
        if payload is not None:
            payloads.append(min(max(payload, 0.05), 1.0))
    slope = _seconds_per_qemu_second(timed)
    overheads = [max(total - slope * qemu_s, 0.0) for qemu_s, _precopy, total in timed]
    return PlanCalibration(
        overhead_s=round(statistics.median(overheads), 3) if overheads else DEFAULT_OVERHEAD_S,
        efficiency=round(statistics.median(efficiencies), 3) if efficiencies else DEFAULT_EFFICIENCY,
        payload=round(statistics.median(payloads), 3) if payloads else DEFAULT_PAYLOAD,
        default_dirty_rate_mib_s=round(default_dirty_rate_mib_s, 2),
        time_scale=round(1 / slope, 3),
        basis=len(timed),
    )


def _payload(m: Migration, moved_mib: float, qemu_s: float) -> float | None:
    """The fraction of a guest's RAM its first round sends as data (not zero pages).

    QEMU's page counts say it directly: every page goes once in the first round, the zero ones as
    ``duplicate`` pages of a few bytes. Without them (a simulated QEMU), what moved less what the
    guest dirtied meanwhile, which at completion QEMU no longer reports (a rate of 0), so that
    guess counts re-sent pages as payload."""
    sample = m.last_sample
    if sample is None or not sample.total_bytes:
        return None
    if m.stats.duplicate_pages:
        pages = sample.total_bytes / (sample.page_size or 4096)
        return 1 - m.stats.duplicate_pages / pages
    return (moved_mib - sample.dirty_rate_mib_s * qemu_s) / (sample.total_bytes / MIB)


def _seconds_per_qemu_second(timed: Sequence[tuple[float, float, float]]) -> float:
    """The LMO's seconds per QEMU second during pre-copy: a least-squares line through (QEMU's
    time, pre-copy's span) when QEMU's times spread, else the median ratio; 1 without data."""
    if not timed:
        return 1.0
    qemu = [t[0] for t in timed]
    span = [t[1] for t in timed]
    if len(timed) >= 3 and statistics.pstdev(qemu) > 0.1 * statistics.mean(qemu):
        slope = statistics.covariance(qemu, span) / statistics.variance(qemu)
        if slope > 0:
            return slope
    return statistics.median(s / q for q, s in zip(qemu, span, strict=True))


@dataclass
class _Queued:
    """What the Ledger needs to decide about a planned migration (a Migration's shape)."""

    id: str
    source: str
    destination: str
    params: MigrationParams


def schedule(items: list[PlannedMigration], params: MigrationParams, limits: ConcurrencyLimits,
             budgets: Mapping[str, int], calibration: PlanCalibration,
             running: Sequence[Reservation] = (), driven_at_once: int = 0,
             pace: LmoPace | None = None) -> float:  # fmt: skip
    """Fill in each movable item's share, start, duration and verdict by replaying admission in
    simulated time, as the controller admits: oldest first, each when its limits and hosts'
    budgets allow and fewer than ``driven_at_once`` run (0: no such bound; ``running``: shares
    already held, kept throughout); returns when the last ends.

    ``pace``: while at least as many run as when the LMO measured its pace, migrations end no
    faster than it (each at its predicted time or the LMO's next turn, whichever is later): what
    QEMU would finish sooner waits for the controller, and holds its share meanwhile.

    Why it stays fast for ten thousand VMs: when a migration ends, only the queued ones leaving its
    source or entering its destination can newly fit (the others' hosts did not change), unless the
    region's limit was what held them all; only those are tried again."""
    ledger = Ledger(running, budgets)
    params = params.model_copy(update={"limits": limits})
    queued: dict[int, _Queued] = {}
    by_host: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.destination is not None:
            queued[index] = _Queued(f"plan-{index}", item.source, item.destination, params)
            by_host.setdefault(item.source, []).append(index)
            by_host.setdefault(item.destination, []).append(index)
    ends: list[tuple[float, str]] = []
    now, last_end = 0.0, 0.0
    started: dict[str, int] = {}  # a running planned migration's item
    turn, paced = 0.0, set()  # when the LMO can end the next migration; those given a turn
    gap = 1 / pace.ended_per_s if pace is not None and pace.ended_per_s > 0 else 0.0

    def region_full() -> bool:
        """No migration anywhere can start: the region's limit, or the LMO's replicas, are full."""
        return any(bound and len(ledger.held) >= bound for bound in (limits.region_total, driven_at_once))

    count = len(items)
    untried = 0  # queued items from here on were not tried since the region (or the LMO) filled up

    def try_admit(candidates: Iterable[int], scanning: bool) -> None:
        """Admit ``candidates`` in order while the region has room; ``scanning``: they run on
        through every untried item, which the region's filling up leaves untried again."""
        nonlocal untried
        for index in candidates:
            if region_full():
                if scanning:
                    untried = index
                return
            q = queued.get(index)
            if q is None:
                continue
            decision = ledger.admit(q)
            if decision.reserved_mib_s is None:
                continue
            item, share = items[index], decision.reserved_mib_s
            p = predict(item.memory_mib, item.dirty_rate_mib_s, share, params, calibration)
            item.share_mib_s, item.start_s, item.duration_s = share, round(now, 3), round(p.duration_s, 3)
            item.precopy_s, item.rounds, item.verdict, item.reason = (
                round(p.precopy_s, 3),
                p.rounds,
                p.verdict,
                p.reason,
            )
            ledger.add(Reservation(q.id, q.source, q.destination, share))
            heapq.heappush(ends, (now + p.duration_s, q.id))
            started[q.id] = index
            del queued[index]
        if scanning:
            untried = count

    def lmo_paced(at: float, ended: str) -> float | None:
        """When the LMO ends this migration, if later than ``at`` (QEMU's end); None: at ``at``."""
        nonlocal turn
        if not gap or ended in paced or pace is None or len(ledger.held) < pace.held:
            return None
        paced.add(ended)
        when, turn = max(at, turn), max(at, turn) + gap
        return when if when > at else None

    try_admit(range(count), scanning=True)
    while ends:
        was_full = region_full()
        now = ends[0][0]
        freed: set[str] = set()
        while ends and ends[0][0] <= now:  # those ending together, then admission once
            _, ended = heapq.heappop(ends)
            later = lmo_paced(now, ended)
            if later is not None:
                heapq.heappush(ends, (later, ended))
                continue
            reservation = ledger.held[ended]
            freed.update((reservation.source, reservation.destination))
            ledger.remove(ended)
            if ended in started:
                item = items[started.pop(ended)]
                item.duration_s = round(now - (item.start_s or 0.0), 3)
                last_end = max(last_end, now)
        if not queued or not freed:
            continue
        # what the freed hosts' limits held back, then (when the region's limit held them all) the
        # rest not tried since, oldest first: tried before and refused, an item waits for its hosts
        near = sorted({i for host in freed for i in by_host.get(host, ()) if i in queued})
        if was_full:
            try_admit(heapq.merge(near, range(untried, count)), scanning=True)
        else:
            try_admit(near, scanning=False)
    for index in queued:  # nothing running and nothing fits: never admitted
        items[index].verdict, items[index].reason = "cannot-move", "never admitted: no bandwidth share fits its policy"
    return round(last_end, 3)


def median_rate(rates: Sequence[float]) -> float:
    return statistics.median(rates) if rates else 0.0


def relative_error(predicted: float, actual: float) -> float:
    return math.inf if actual <= 0 else (actual - predicted) / actual
