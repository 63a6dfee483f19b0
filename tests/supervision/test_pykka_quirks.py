"""Pykka's quirks must not leak into supervision (see supervisor/core/_actor.py)."""

from __future__ import annotations

from collections.abc import Callable

import pykka
import pytest

from supervisor.core import (
    Backoff,
    ChildExitedEvent,
    ChildReadyEvent,
    Crash,
    StartFailed,
    SupervisorFlags,
    whereis,
)
from tests.supervision.children import Script, actor
from tests.supervision.conftest import Tree

FAST = SupervisorFlags(intensity=5, backoff=Backoff(initial=0.0))
SLOW_RESTART = SupervisorFlags(intensity=5, backoff=Backoff(initial=30, max=60))  # stays down


def test_a_failing_ask_crashes_the_actor_and_the_caller_gets_the_error(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([actor("a", script)], FAST)
    ref = whereis("root/a")
    with pytest.raises(ValueError, match="asked to crash"):
        ref.ask("crash", timeout=5)
    reason = tree.wait(ChildExitedEvent, "a")[0].reason
    assert isinstance(reason, Crash)
    assert reason.error_type == "ValueError"
    tree.wait(ChildReadyEvent, "a", count=2)
    assert not ref.is_alive()
    assert whereis("root/a").ask("ping", timeout=5) == "pong"


def test_a_failing_start_up_is_reported_and_cleans_up(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.starts[("a", 1)] = "fail"
    tree = make_tree([actor("a", script)], FAST)
    whereis("root/a").tell("crash")
    reason = tree.wait(ChildExitedEvent, "a", count=2)[1].reason
    assert isinstance(reason, StartFailed)
    assert "RuntimeError: refusing to start" in reason.cause
    assert [r for c, r in script.seen("cleanup_done") if isinstance(r, StartFailed)]


def test_a_base_exception_in_one_actor_does_not_stop_the_others(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([actor("a", script), actor("b", script)], FAST)
    b = whereis("root/b")
    whereis("root/a").tell("base")  # KeyboardInterrupt inside a's handler
    reason = tree.wait(ChildExitedEvent, "a")[0].reason
    assert isinstance(reason, Crash)
    assert reason.error_type == "KeyboardInterrupt"
    assert b.ask("ping", timeout=5) == "pong"  # pykka alone would have stopped b too
    assert tree.of(ChildExitedEvent, "b") == []


def test_a_base_exception_in_start_up_is_a_start_failure_of_that_actor_alone(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.starts[("b", 1)] = "base"  # SystemExit in on_start of b's restart
    tree = make_tree([actor("a", script), actor("b", script)], FAST)
    whereis("root/b").tell("crash")
    reason = tree.wait(ChildExitedEvent, "b", count=2)[1].reason
    assert isinstance(reason, StartFailed)
    assert "SystemExit" in reason.cause
    assert whereis("root/a").ask("ping", timeout=5) == "pong"


def test_the_exit_notice_comes_only_after_cleanup_finished(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    # pykka sets actor_stopped before on_stop ends; our notice waits for on_exit.
    script.stop_behaviour["a"] = "slow:0.3"
    tree = make_tree([actor("a", script)])
    cleaned_at_notice: list[bool] = []
    tree.root.bus.subscribe(
        lambda e: (
            cleaned_at_notice.append(bool(script.seen("cleanup_done")))
            if isinstance(e, ChildExitedEvent)
            else None
        )
    )
    tree.root.stop("operator")
    tree.root.wait_exit(10)
    assert cleaned_at_notice == [True]


def test_pykkas_own_stop_is_still_an_orderly_exit(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor("a", script)], SupervisorFlags(intensity=3, backoff=Backoff(initial=0.0))
    )
    whereis("root/a").stop()
    reason = tree.wait(ChildExitedEvent, "a")[0].reason
    assert reason.describe() == "shutdown (pykka stop)"
    tree.wait(ChildReadyEvent, "a", count=2)  # permanent: restarted
    assert pykka.ActorRegistry.get_by_urn(whereis("root/a").actor_urn) is not None


def test_supervision_events_are_counted_as_prometheus_metrics(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    from prometheus_client import CollectorRegistry

    from supervisor.core import SupervisionMetrics

    registry = CollectorRegistry()
    tree = make_tree([actor("a", script)], FAST)
    SupervisionMetrics(tree.root.bus, registry, prefix="sgl_node")
    whereis("root/a").tell("crash")
    tree.wait(ChildReadyEvent, "a", count=2)
    labels = {"supervisor": "root", "child": "a"}
    assert (
        registry.get_sample_value("sgl_node_child_exits_total", {**labels, "reason": "crash"}) == 1
    )
    assert registry.get_sample_value("sgl_node_child_restarts_total", labels) == 1
    assert registry.get_sample_value("sgl_node_child_starts_total", labels) == 1
    assert registry.get_sample_value("sgl_node_child_up", labels) == 1


def test_messages_left_in_the_inbox_at_exit_are_handed_to_on_undelivered(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    # pykka drops queued tells silently when an actor stops; an actor that owes answers
    # (the EngineActor owes every request one) gets each of them once.
    tree = make_tree([actor("a", script)], SLOW_RESTART)
    ref = whereis("root/a")
    ref.tell("hang")  # holds the actor's thread while the next messages queue up
    ref.tell("crash")
    ref.tell("ping")
    ref.tell("later")
    script.release.set()
    tree.wait(ChildExitedEvent, "a")
    assert [m for _, m in script.seen("undelivered")] == ["ping", "later"]
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("too late")  # after the exit a tell fails at the sender


def test_an_ask_queued_when_the_actor_exits_fails_at_once_not_at_its_timeout(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    # pykka's own loop fails such asks; ours must too, or a sibling asking the actor
    # during its start-up blocks for the whole ask timeout (and misses its own stop).
    tree = make_tree([actor("a", script)], SLOW_RESTART)
    ref = whereis("root/a")
    ref.tell("hang")
    ref.tell("crash")
    pending = ref.ask("ping", block=False)
    script.release.set()
    tree.wait(ChildExitedEvent, "a")
    # failing only at its timeout would raise pykka's Timeout, not ActorDeadError
    with pytest.raises(pykka.ActorDeadError, match="exited: crash"):
        pending.get(timeout=30)
