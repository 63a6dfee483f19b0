"""The supervisor's decisions, as pure functions of their inputs.

Threads and processes only carry these out; every rule of restart, escalation,
backoff and auto-shutdown can be checked here without an actor or a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from supervisor.core._protocol import ExitReason, is_abnormal
from supervisor.core._spec import AutoShutdown, Backoff, Restart, Strategy

__all__ = [
    "BackoffState",
    "add_restart",
    "auto_shutdown_due",
    "children_to_restart",
    "intensity_exceeded",
    "next_backoff",
    "should_restart",
]


def should_restart(restart: Restart, reason: ExitReason) -> bool:
    """OTP: permanent always; transient unless normal/shutdown; temporary never."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return is_abnormal(reason)
    return False


def children_to_restart(strategy: Strategy, order: Sequence[str], failed: str) -> list[str]:
    """Ids (in start order) that are stopped and started again when `failed` must restart."""
    if strategy == "one_for_all":
        return list(order)
    if strategy == "rest_for_one":
        return list(order[order.index(failed) :])
    return [failed]  # one_for_one and pool


def add_restart(restarts: Sequence[float], now: float, period: float) -> tuple[float, ...]:
    """OTP's add_restart/3: keep the restarts within `period` of `now`, then add `now`.

    The restart being attempted counts, so with intensity 1 the second restart within
    the period is one too many.
    """
    threshold = now - period
    return (now, *(t for t in restarts if t >= threshold))


def intensity_exceeded(restarts: Sequence[float], intensity: int) -> bool:
    """More than `intensity` restarts in the window: the supervisor gives up."""
    return len(restarts) > intensity


@dataclass(frozen=True)
class BackoffState:
    """Restarts in a row so far (since the last quiet period) and when the last one was."""

    consecutive: int = 0
    last_restart: float | None = None


def next_backoff(
    state: BackoffState, now: float, backoff: Backoff, unit_random: float
) -> tuple[float, BackoffState]:
    """Delay before the next restart, and the state after it.

    delay = min(max, initial × multiplier^n) × (1 ± jitter), where n counts restarts in a
    row and drops back to 0 once `reset_after` seconds passed since the last restart.
    `unit_random` in [0, 1) makes the jitter; 0.5 gives none.
    """
    consecutive = state.consecutive
    if state.last_restart is not None and now - state.last_restart >= backoff.reset_after:
        consecutive = 0
    base = min(backoff.max, backoff.initial * backoff.multiplier**consecutive)
    delay = base * (1.0 + backoff.jitter * (2.0 * unit_random - 1.0))
    delay = min(backoff.max, max(0.0, delay))
    return delay, BackoffState(consecutive=consecutive + 1, last_restart=now)


def auto_shutdown_due(
    mode: AutoShutdown, significant_exited: bool, significant_still_alive: int
) -> bool:
    """Whether a significant child's exit (without restart) ends the supervisor."""
    if not significant_exited or mode == "never":
        return False
    if mode == "any_significant":
        return True
    return significant_still_alive == 0
