from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from livemig.control.policy import judge
from livemig.model import MigrationSample
from livemig.model.migration import ConvergencePolicy

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
