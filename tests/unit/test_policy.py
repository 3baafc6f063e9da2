from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from livemig.control.policy import judge
from livemig.model import MigrationSample
from livemig.model.migration import AutoConverge, Compression, ConvergencePolicy, MigrationPolicies

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MIB = 1024 * 1024


def sample(t: float, rounds: int, dirty_mib_s: float, remaining_mib: float) -> MigrationSample:
    return MigrationSample(
        at=T0 + timedelta(seconds=t),
        status="active",
        dirty_sync_count=rounds,
        dirty_pages_rate=int(dirty_mib_s * 256),
        remaining_bytes=int(remaining_mib * MIB),
        total_bytes=512 * MIB,
    )


def test_dirty_rate_above_bandwidth_aborts_with_the_numbers():
    samples = [sample(0.5, 1, 0, 400), sample(4, 2, 200, 150), sample(8, 3, 200, 150)]
    verdict = judge(samples[:2], ConvergencePolicy(), 32, 512, T0)
    assert verdict.abort
    assert verdict.reason == "dirty rate 200 MiB/s exceeds reserved bandwidth 32 MiB/s after 2 rounds"


def test_slow_dirtier_continues():
    samples = [sample(0.5, 1, 0, 400), sample(4, 2, 10, 60), sample(6, 3, 10, 20)]
    assert not judge(samples, ConvergencePolicy(), 32, 512, T0).abort


def test_first_round_is_never_judged():
    assert not judge([sample(1, 1, 500, 500)], ConvergencePolicy(), 32, 512, T0).abort


def test_completion_budget_per_gib():
    policy = ConvergencePolicy(completion_timeout_s_per_gib=10)
    assert judge([sample(6, 2, 1, 100)], policy, 32, 512, T0).abort  # 512 MiB -> 5 s budget
    assert not judge([sample(4, 2, 1, 100)], policy, 32, 512, T0).abort


def test_no_progress_timeout():
    policy = ConvergencePolicy(no_progress_timeout_s=5)
    samples = [sample(1, 2, 20, 50), sample(3, 3, 20, 60), sample(7, 4, 20, 70)]
    verdict = judge(samples, policy, 32, 512, T0)
    assert verdict.abort and "no progress for 6 s" in verdict.reason


@given(
    st.lists(st.tuples(st.floats(0, 1e4), st.integers(0, 50), st.floats(0, 1e4), st.floats(0, 1e5)), max_size=20),
    st.floats(1, 1e5),
)
def test_judge_never_crashes_and_aborts_only_with_a_reason(raw, bandwidth):
    samples = [sample(t, r, d, rem) for t, r, d, rem in sorted(raw)]
    verdict = judge(samples, ConvergencePolicy(), bandwidth, 512, T0)
    assert verdict.abort == bool(verdict.reason)


def throttled(t: float, rounds: int, dirty_mib_s: float, pct: int) -> MigrationSample:
    return sample(t, rounds, dirty_mib_s, 150).model_copy(update={"cpu_throttle_pct": pct})


AUTO = MigrationPolicies(auto_converge=AutoConverge(enabled=True, max_pct=90))


def test_auto_converge_throttles_where_the_plain_judgement_aborts():
    samples = [sample(0.5, 1, 0, 400), throttled(4, 2, 200, 0), throttled(8, 3, 160, 20)]
    assert judge(samples, ConvergencePolicy(), 32, 512, T0).abort
    verdict = judge(samples, ConvergencePolicy(), 32, 512, T0, AUTO)
    assert not verdict.abort
    assert verdict.throttled == ("dirty rate 160 MiB/s exceeds reserved bandwidth 32 MiB/s after 3 rounds: "
                                 "auto-converge throttles the vCPUs (20% now, up to 90%)")  # fmt: skip


def test_auto_converge_aborts_once_the_maximum_throttle_held_two_rounds_in_vain():
    samples = [throttled(4, 2, 200, 0), throttled(8, 5, 100, 90), throttled(9, 6, 90, 90)]
    assert not judge(samples, ConvergencePolicy(), 32, 512, T0, AUTO).abort  # one round at the maximum
    samples.append(throttled(10, 7, 80, 90))
    verdict = judge(samples, ConvergencePolicy(), 32, 512, T0, AUTO)
    assert verdict.abort and verdict.reason.endswith("with the vCPUs throttled to 90% for 2 rounds")


def test_compression_is_judged_by_the_pages_that_leave_not_the_wire():
    def at(t: float, pages_mib: float) -> MigrationSample:
        return sample(t, 3, 50, 100).model_copy(update={"pages_sent": int(pages_mib * 256)})

    samples = [at(5, 100), at(6, 180), at(7, 260)]  # 80 MiB/s of pages over a 32 MiB/s wire
    assert judge(samples, ConvergencePolicy(), 32, 512, T0).abort
    zstd = MigrationPolicies(multifd_channels=2, compression=Compression.ZSTD)
    assert not judge(samples, ConvergencePolicy(), 32, 512, T0, zstd).abort


def test_a_rising_throttle_is_progress_but_a_maximum_one_is_not():
    policy = ConvergencePolicy(no_progress_timeout_s=5)
    stuck = [throttled(2, 2, 20, 20).model_copy(update={"remaining_bytes": 100 * MIB}),
             throttled(9, 4, 20, 40).model_copy(update={"remaining_bytes": 120 * MIB})]  # fmt: skip
    assert not judge(stuck, policy, 32, 512, T0, AUTO).abort
    at_max = [*stuck, throttled(12, 6, 20, 90).model_copy(update={"remaining_bytes": 120 * MIB}),
              throttled(14, 8, 20, 90).model_copy(update={"remaining_bytes": 120 * MIB})]  # fmt: skip
    verdict = judge(at_max, policy, 32, 512, T0, AUTO)
    assert verdict.abort and "no progress for 12 s" in verdict.reason
