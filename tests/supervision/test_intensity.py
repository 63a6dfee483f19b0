"""Restart intensity and escalation, backoff timing on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

from supervisor.core import (
    ActorStart,
    Backoff,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildRestarted,
    ChildSpec,
    ChildStarted,
    FakeClock,
    RestartIntensityExceeded,
    RestartIntensityExceededEvent,
    StartFailed,
    Supervisor,
    SupervisorFlags,
    SupervisorStopped,
    exit_code_for,
    whereis,
)
from tests.supervision.children import Script, actor, wait_until
from tests.supervision.conftest import Tree

FAST = Backoff(initial=0.0, jitter=0.0)


def test_more_restarts_than_intensity_stops_everything_in_reverse_and_escalates(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor("a", script), actor("b", script), actor("c", script)],
        SupervisorFlags(intensity=2, period=60, backoff=FAST),
    )
    for n in range(2):
        whereis("root/b").tell("crash")
        tree.wait(ChildReadyEvent, "b", count=n + 2)
    whereis("root/b").tell("crash")
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, RestartIntensityExceeded)
    assert (reason.child, reason.restarts, reason.supervisor) == ("b", 3, "root")
    assert "crash: ValueError: asked to crash" in reason.last_reason
    assert exit_code_for(reason) == 1
    assert len(tree.of(RestartIntensityExceededEvent)) == 1
    # After b's third exit: c then a are stopped, and the supervisor reports its end.
    assert [e.child_id for e in tree.of(ChildExitedEvent)][-3:] == ["b", "c", "a"]
    assert isinstance(tree.of(SupervisorStopped)[-1].reason, RestartIntensityExceeded)


def test_escalation_goes_through_two_levels_of_supervisors(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    inner = ChildSpec(
        "inner",
        ActorStart(Supervisor, (SupervisorFlags(intensity=0, backoff=FAST), [actor("w", script)])),
    )
    tree = make_tree(
        [actor("a", script), inner], SupervisorFlags(intensity=1, period=60, backoff=FAST)
    )
    whereis("root/inner/w").tell("crash")
    # inner gives up at once (intensity 0); root restarts inner (its first restart)...
    tree.wait(ChildReadyEvent, "inner", count=2)
    first = tree.of(ChildExitedEvent, "inner")[0].reason
    assert isinstance(first, RestartIntensityExceeded)
    assert first.supervisor == "root/inner"
    # ...a second escalation from inner is one too many for root (intensity 1).
    whereis("root/inner/w").tell("crash")
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, RestartIntensityExceeded)
    assert (reason.supervisor, reason.child) == ("root", "inner")
    assert "restart_intensity_exceeded in root/inner" in reason.last_reason
    assert [e.supervisor for e in tree.of(RestartIntensityExceededEvent)] == [
        "root/inner",
        "root/inner",
        "root",
    ]


def test_crashes_further_apart_than_the_period_never_escalate(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    clock = FakeClock()
    tree = make_tree(
        [actor("w", script)], SupervisorFlags(intensity=1, period=5, backoff=FAST), clock=clock
    )
    for n in range(4):
        whereis("root/w").tell("crash")
        tree.wait(ChildRestarted, "w", count=n + 1)
        assert wait_until(clock.pending)  # the restart timer is armed
        clock.advance(0.0)
        tree.wait(ChildReadyEvent, "w", count=n + 2)
        clock.advance(6.0)
    assert tree.root.exit_reason is None
    assert tree.children()["w"].restarts == 4


def test_restarts_wait_for_the_backoff_delay_on_the_injected_clock(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    clock = FakeClock()
    backoff = Backoff(initial=1.0, max=8.0, multiplier=2.0, jitter=0.0, reset_after=100.0)
    tree = make_tree(
        [actor("w", script)],
        SupervisorFlags(intensity=10, period=1000, backoff=backoff),
        clock=clock,
    )
    delays = []
    for n in range(4):
        whereis("root/w").tell("crash")
        restarted = tree.wait(ChildRestarted, "w", count=n + 1)[-1]
        assert wait_until(clock.pending)  # the restart timer is armed
        delays.append(restarted.delay)
        starts = len(tree.of(ChildStarted, "w"))
        clock.advance(restarted.delay - 0.01)
        assert whereis("root/w") is None  # not restarted before its delay
        assert len(tree.of(ChildStarted, "w")) == starts
        clock.advance(0.01)
        tree.wait(ChildReadyEvent, "w", count=n + 2)
    assert delays == [1.0, 2.0, 4.0, 8.0]
    clock.advance(100.0)  # a quiet period resets the backoff
    whereis("root/w").tell("crash")
    assert tree.wait(ChildRestarted, "w", count=5)[-1].delay == 1.0


def test_a_failing_restart_counts_towards_intensity(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.starts[("w", 1)] = "fail"
    script.starts[("w", 2)] = "fail"
    tree = make_tree([actor("w", script)], SupervisorFlags(intensity=2, period=60, backoff=FAST))
    whereis("root/w").tell("crash")
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, RestartIntensityExceeded)
    exits = [e.reason for e in tree.of(ChildExitedEvent, "w")]
    assert [type(r) for r in exits[1:]] == [StartFailed, StartFailed]
