"""Significant children end their supervisor; pools add and remove children at run time."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from supervisor.core import (
    ActorStart,
    AddChild,
    Backoff,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    RemoveChild,
    Shutdown,
    Supervisor,
    SupervisorFlags,
    SupervisorStopped,
    WhichChildren,
    whereis,
)
from tests.supervision.children import Script, actor
from tests.supervision.conftest import Tree


def test_any_significant_child_exiting_ends_the_supervisor(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [
            actor("a", script),
            actor("engine", script, restart="transient", significant=True),
            actor("c", script),
        ],
        SupervisorFlags(auto_shutdown="any_significant"),
    )
    whereis("root/engine").tell("exit_normal")
    reason = tree.root.wait_exit(10)
    assert isinstance(reason, Shutdown)
    assert "auto_shutdown (any_significant): engine exited" in reason.detail
    assert [e.child_id for e in tree.of(ChildExitedEvent)] == ["engine", "c", "a"]


def test_all_significant_waits_for_the_last_significant_child(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor(i, script, restart="transient", significant=True) for i in ("s1", "s2")]
        + [actor("x", script)],
        SupervisorFlags(auto_shutdown="all_significant"),
    )
    whereis("root/s1").tell("exit_normal")
    tree.wait(ChildExitedEvent, "s1")
    assert whereis("root/x").ask("ping", timeout=5) == "pong"
    assert tree.root.exit_reason is None
    whereis("root/s2").tell("exit_normal")
    assert isinstance(tree.root.wait_exit(10), Shutdown)


def test_a_significant_child_that_is_restarted_does_not_end_the_supervisor(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor("engine", script, restart="transient", significant=True)],
        SupervisorFlags(auto_shutdown="any_significant", intensity=3, backoff=Backoff(initial=0.0)),
    )
    whereis("root/engine").tell("crash")
    tree.wait(ChildReadyEvent, "engine", count=2)
    assert tree.root.exit_reason is None


def _pool(script: Script, size: int) -> ChildSpec:
    flags = SupervisorFlags(strategy="pool", intensity=5, backoff=Backoff(initial=0.0))
    return ChildSpec(
        "pool", ActorStart(Supervisor, (flags, [actor("h", script)]), {"pool_size": size})
    )


def test_a_pool_starts_its_size_and_adds_and_removes_children(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([_pool(script, 2)])
    pool = whereis("root/pool")
    assert [c.id for c in pool.ask(WhichChildren(), timeout=5)] == ["h-1", "h-2"]
    new_id = pool.ask(AddChild(), timeout=5)
    assert new_id == "h-3"
    tree.wait(ChildReadyEvent, "h-3")
    pool.ask(RemoveChild("h-1"), timeout=5)
    tree.wait(ChildExitedEvent, "h-1")
    rows = tree.children(recursive=True)["pool"].children
    assert [c.id for c in rows] == ["h-2", "h-3"]
    with pytest.raises(KeyError):
        pool.ask(RemoveChild("h-9"), timeout=5)


def test_a_crashed_pool_member_is_restarted_alone(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([_pool(script, 3)])
    whereis("root/pool/h-2").tell("crash")
    tree.wait(ChildReadyEvent, "h-2", count=2)
    assert [e.child_id for e in tree.of(ChildExitedEvent)] == ["h-2"]


def test_a_pool_stops_its_members_all_at_once(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    for i in range(1, 5):
        script.stop_behaviour[f"h-{i}"] = "slow:0.3"
    tree = make_tree([_pool(script, 4)])
    tree.root.stop("operator")
    tree.root.wait_exit(10)
    order = [w for w, c, _ in script.records if w in ("stop_begin", "cleanup_done")]
    assert order[:4] == ["stop_begin"] * 4  # every stop began before any member finished
    assert isinstance(tree.of(SupervisorStopped)[-1].reason, Shutdown)


def test_add_child_on_a_fixed_supervisor_is_refused(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree([actor("a", script)])
    with pytest.raises(ValueError, match="not a pool supervisor"):
        tree.root.ref.ask(AddChild(), timeout=5)
