"""Start in order with a readiness handshake; roll back failed starts; stop in reverse."""

from __future__ import annotations

import sys
from collections.abc import Callable

from supervisor.core import (
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    ChildStarted,
    Killed,
    ProcessStart,
    ReadyOnLine,
    Shutdown,
    StartFailed,
    StartTimeout,
    SupervisorStopped,
    whereis,
)
from tests.supervision.children import Script, actor
from tests.supervision.conftest import Tree


def test_the_next_child_starts_only_when_the_previous_one_is_ready(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.default_start["a"] = "deferred"
    tree = make_tree([actor("a", script), actor("b", script)], wait_ready=False)
    tree.wait(ChildStarted, "a")
    assert whereis("root/a").ask("ping", timeout=5) == "pong"  # a is up, but not ready yet
    assert tree.of(ChildStarted, "b") == []
    whereis("root/a").tell("ready")
    assert tree.root.wait_ready(5)
    kinds = [(type(e).__name__, e.child_id) for e in tree.of((ChildStarted, ChildReadyEvent))]  # type: ignore[arg-type]
    assert kinds == [
        ("ChildStarted", "a"),
        ("ChildReadyEvent", "a"),
        ("ChildStarted", "b"),
        ("ChildReadyEvent", "b"),
    ]


def test_a_failed_start_stops_the_started_children_in_reverse_and_fails_the_supervisor(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.default_start["c"] = "fail"
    tree = make_tree(
        [actor("a", script), actor("b", script), actor("c", script), actor("d", script)],
        wait_ready=False,
    )
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, StartFailed)
    assert "child 'c'" in reason.cause
    assert "RuntimeError: refusing to start" in reason.cause
    assert [e.child_id for e in tree.of(ChildExitedEvent)] == ["c", "b", "a"]
    assert tree.of(ChildStarted, "d") == []


def test_a_child_not_ready_within_its_start_timeout_is_a_start_timeout(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.default_start["b"] = "hang"
    tree = make_tree(
        [actor("a", script), actor("b", script, start_timeout=0.3, shutdown=0.2)], wait_ready=False
    )
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, StartFailed)
    assert "start_timeout after 0.3s" in reason.cause
    exits = {e.child_id: e.reason for e in tree.of(ChildExitedEvent)}
    assert isinstance(exits["b"], StartTimeout)
    assert isinstance(exits["a"], Shutdown)


def test_a_process_that_never_prints_its_ready_line_is_killed_at_start_timeout(
    make_tree: Callable[..., Tree],
) -> None:
    spec = ChildSpec(
        "p",
        ProcessStart(
            [sys.executable, "-c", "import time; time.sleep(60)"], ready=ReadyOnLine("never")
        ),
        start_timeout=0.5,
    )
    tree = make_tree([spec], wait_ready=False)
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, StartFailed)
    assert "start_timeout" in reason.cause


def test_a_child_hanging_in_start_up_does_not_hang_its_supervisor(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.default_start["b"] = "hang"
    tree = make_tree(
        [actor("a", script), actor("b", script, start_timeout=600, shutdown=0.3)], wait_ready=False
    )
    tree.wait(ChildStarted, "b")
    assert tree.children()["b"].state == "starting"  # the supervisor still answers
    tree.root.stop("operator")
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, Shutdown)
    exits = {e.child_id: e.reason for e in tree.of(ChildExitedEvent)}
    assert isinstance(exits["b"], Killed)  # abandoned after its shutdown timeout
    assert isinstance(exits["a"], Shutdown)


def test_stop_goes_in_reverse_start_order_one_child_at_a_time(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    for child in "abcd":
        script.stop_behaviour[child] = "slow:0.05"
    tree = make_tree([actor(i, script) for i in "abcd"])
    tree.root.stop("operator")
    assert isinstance(tree.root.wait_exit(10), Shutdown)
    assert [e.child_id for e in tree.of(ChildExitedEvent)] == ["d", "c", "b", "a"]
    # one at a time: each stop began only after the previous child had cleaned up
    order = [
        (what, child) for what, child, _ in script.records if what in ("stop_begin", "cleanup_done")
    ]
    assert order == [(w, c) for c in "dcba" for w in ("stop_begin", "cleanup_done")]
    assert isinstance(tree.of(SupervisorStopped)[0].reason, Shutdown)


def test_an_actor_ignoring_stop_is_abandoned_after_its_shutdown_timeout(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.stop_behaviour["b"] = "ignore"
    tree = make_tree([actor("a", script), actor("b", script, shutdown=0.3)])
    tree.root.stop("operator")
    assert isinstance(tree.root.wait_exit(10), Shutdown)
    exits = {e.child_id: e.reason for e in tree.of(ChildExitedEvent)}
    assert isinstance(exits["b"], Killed)
    assert "shutdown timeout" in exits["b"].detail
    assert isinstance(exits["a"], Shutdown)


def test_shutdown_infinity_waits_as_long_as_the_child_needs(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    script.stop_behaviour["a"] = "slow:0.5"
    tree = make_tree([actor("a", script, shutdown="infinity")])
    tree.root.stop("operator")
    assert isinstance(tree.root.wait_exit(10), Shutdown)
    assert isinstance(tree.of(ChildExitedEvent, "a")[0].reason, Shutdown)


def test_a_brutal_stop_skips_the_graceful_hook(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([actor("a", script), actor("b", script, shutdown="brutal")])
    tree.root.stop("operator")
    tree.root.wait_exit(10)
    assert [c for c, _ in script.seen("stop_begin")] == ["a"]
    assert sorted(c for c, _ in script.seen("cleanup_done")) == ["a", "b"]  # cleanup still runs
