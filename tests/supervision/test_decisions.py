"""The supervisor's decisions as pure functions: restart rules, intensity, backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.core import (
    Backoff,
    BackoffState,
    Crash,
    ExitReason,
    FakeClock,
    Killed,
    Normal,
    RestartIntensityExceeded,
    Shutdown,
    StartFailed,
    StartTimeout,
    add_restart,
    auto_shutdown_due,
    children_to_restart,
    intensity_exceeded,
    next_backoff,
    should_restart,
)

REASONS: list[tuple[str, ExitReason]] = [
    ("normal", Normal()),
    ("shutdown", Shutdown()),
    ("crash", Crash("ValueError", "x")),
    ("start_failed", StartFailed("x")),
    ("start_timeout", StartTimeout(1.0)),
    ("killed", Killed(9)),
    ("escalated", RestartIntensityExceeded("s", "c", 2, 5.0, "crash")),
]
# OTP: permanent always; transient on abnormal reasons only; temporary never.
EXPECTED = {
    "permanent": {name: True for name, _ in REASONS},
    "transient": {name: name not in ("normal", "shutdown") for name, _ in REASONS},
    "temporary": {name: False for name, _ in REASONS},
}


@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
@pytest.mark.parametrize(("name", "reason"), REASONS)
def test_restart_type_by_exit_reason_matrix(restart: str, name: str, reason: ExitReason) -> None:
    assert should_restart(restart, reason) is EXPECTED[restart][name]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("one_for_one", ["b"]),
        ("pool", ["b"]),
        ("one_for_all", ["a", "b", "c", "d"]),
        ("rest_for_one", ["b", "c", "d"]),
    ],
)
def test_which_children_each_strategy_restarts(strategy: str, expected: list[str]) -> None:
    assert children_to_restart(strategy, ["a", "b", "c", "d"], "b") == expected  # type: ignore[arg-type]


def test_intensity_one_in_five_seconds_allows_one_restart_as_otp() -> None:
    restarts = add_restart((), now=100.0, period=5.0)
    assert not intensity_exceeded(restarts, 1)
    restarts = add_restart(restarts, now=104.0, period=5.0)
    assert intensity_exceeded(restarts, 1)


def test_restarts_older_than_the_period_are_forgotten() -> None:
    restarts = add_restart((), now=100.0, period=5.0)
    restarts = add_restart(restarts, now=105.5, period=5.0)
    assert restarts == (105.5,)
    assert not intensity_exceeded(restarts, 1)


def test_a_restart_exactly_one_period_ago_still_counts() -> None:
    restarts = add_restart(add_restart((), 100.0, 5.0), 105.0, 5.0)
    assert restarts == (105.0, 100.0)


def test_intensity_zero_gives_up_at_the_first_restart() -> None:
    assert intensity_exceeded(add_restart((), 1.0, 5.0), 0)


def test_backoff_sequence_doubles_caps_and_resets_after_a_quiet_period() -> None:
    clock = FakeClock()
    backoff = Backoff(initial=0.5, max=3.0, multiplier=2.0, jitter=0.0, reset_after=30.0)
    state = BackoffState()
    delays = []
    for _ in range(5):
        delay, state = next_backoff(state, clock.now(), backoff, unit_random=0.9)
        delays.append(delay)
        clock.advance(1.0)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    clock.advance(30.0)
    delay, state = next_backoff(state, clock.now(), backoff, unit_random=0.3)
    assert delay == 0.5
    assert state.consecutive == 1


def test_zero_initial_backoff_restarts_at_once_like_otp() -> None:
    delay, _ = next_backoff(BackoffState(), 0.0, Backoff(initial=0.0), 0.99)
    assert delay == 0.0


@given(
    initial=st.floats(0.0, 5.0),
    multiplier=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 1.0),
    maximum=st.floats(5.0, 60.0),
    steps=st.integers(1, 30),
    rnd=st.floats(0.0, 0.999999),
)
def test_backoff_stays_within_jitter_of_the_capped_exponential(
    initial: float, multiplier: float, jitter: float, maximum: float, steps: int, rnd: float
) -> None:
    backoff = Backoff(
        initial=initial, max=maximum, multiplier=multiplier, jitter=jitter, reset_after=1e9
    )
    state = BackoffState()
    for n in range(steps):
        delay, state = next_backoff(state, float(n), backoff, rnd)
        base = min(maximum, initial * multiplier**n)
        assert 0.0 <= delay <= maximum
        assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


@pytest.mark.parametrize(
    ("mode", "exited", "alive", "due"),
    [
        ("never", True, 0, False),
        ("any_significant", True, 3, True),
        ("any_significant", False, 0, False),
        ("all_significant", True, 1, False),
        ("all_significant", True, 0, True),
    ],
)
def test_auto_shutdown_rules(mode: str, exited: bool, alive: int, due: bool) -> None:
    assert auto_shutdown_due(mode, exited, alive) is due  # type: ignore[arg-type]
