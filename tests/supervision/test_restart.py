"""Restarts: restart type × exit reason on live actors, and each strategy's bystanders."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from supervisor.core import (
    Backoff,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildRestarted,
    ChildStarted,
    Crash,
    Normal,
    Shutdown,
    SupervisorFlags,
    whereis,
)
from tests.supervision.children import EXIT_WITH, Script, actor, process
from tests.supervision.conftest import Tree

FAST = Backoff(initial=0.0, jitter=0.0)


@pytest.mark.parametrize(
    ("restart", "command", "restarted"),
    [
        ("permanent", "crash", True),
        ("permanent", "exit_normal", True),
        ("permanent", "exit_shutdown", True),
        ("transient", "crash", True),
        ("transient", "exit_normal", False),
        ("transient", "exit_shutdown", False),
        ("temporary", "crash", False),
        ("temporary", "exit_normal", False),
    ],
)
def test_restart_type_decides_by_exit_reason(
    make_tree: Callable[..., Tree], script: Script, restart: str, command: str, restarted: bool
) -> None:
    tree = make_tree(
        [actor("w", script, restart=restart), actor("other", script)],
        SupervisorFlags(intensity=5, backoff=FAST),
    )
    whereis("root/w").tell(command)
    exited = tree.wait(ChildExitedEvent, "w")[0]
    expected = {"crash": Crash, "exit_normal": Normal, "exit_shutdown": Shutdown}[command]
    assert isinstance(exited.reason, expected)
    if restarted:
        tree.wait(ChildReadyEvent, "w", count=2)
        assert tree.children()["w"].generation == 1
    else:
        # The sibling answering proves the supervisor has handled the exit by now.
        assert whereis("root/other").ask("ping", timeout=5) == "pong"
        tree.root.which_children()
        assert tree.of(ChildRestarted, "w") == []
        rows = tree.children()
        if restart == "temporary":
            assert "w" not in rows  # OTP deletes a temporary child when it exits
        else:
            assert rows["w"].state == "stopped"
    assert tree.of(ChildExitedEvent, "other") == []


def _started_order(tree: Tree) -> list[str]:
    return [e.child_id for e in tree.of(ChildStarted)]


def _exited_order(tree: Tree) -> list[str]:
    return [e.child_id for e in tree.of(ChildExitedEvent)]


def test_one_for_one_restarts_only_the_failed_child(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor(i, script) for i in "abc"],
        SupervisorFlags(strategy="one_for_one", intensity=5, backoff=FAST),
    )
    whereis("root/b").tell("crash")
    tree.wait(ChildReadyEvent, "b", count=2)
    rows = tree.children()
    assert (rows["a"].generation, rows["b"].generation, rows["c"].generation) == (0, 1, 0)
    assert _exited_order(tree) == ["b"]


def test_one_for_all_stops_the_rest_in_reverse_then_starts_all_in_order(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor(i, script) for i in "abcd"],
        SupervisorFlags(strategy="one_for_all", intensity=5, backoff=FAST),
    )
    whereis("root/b").tell("crash")
    tree.wait(ChildReadyEvent, "d", count=2)
    assert _exited_order(tree) == ["b", "d", "c", "a"]
    assert _started_order(tree) == ["a", "b", "c", "d"] * 2
    for e in tree.of(ChildExitedEvent)[1:]:
        assert isinstance(e.reason, Shutdown)
    assert {c.generation for c in tree.children().values()} == {1}


def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor(i, script) for i in "abcd"],
        SupervisorFlags(strategy="rest_for_one", intensity=5, backoff=FAST),
    )
    whereis("root/b").tell("crash")
    tree.wait(ChildReadyEvent, "d", count=2)
    assert _exited_order(tree) == ["b", "d", "c"]
    assert _started_order(tree) == ["a", "b", "c", "d", "b", "c", "d"]
    assert tree.children()["a"].generation == 0


def test_one_for_all_drops_a_temporary_sibling_instead_of_restarting_it(
    make_tree: Callable[..., Tree], script: Script
) -> None:
    tree = make_tree(
        [actor("a", script), actor("t", script, restart="temporary"), actor("c", script)],
        SupervisorFlags(strategy="one_for_all", intensity=5, backoff=FAST),
    )
    whereis("root/a").tell("crash")
    tree.wait(ChildReadyEvent, "c", count=2)
    assert list(tree.children()) == ["a", "c"]


def test_a_crashing_process_child_is_restarted_with_its_last_output(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree(
        [process("p", EXIT_WITH.format(code=3))],
        SupervisorFlags(intensity=1, period=60, backoff=Backoff(initial=5)),
        wait_ready=False,
    )
    exited = tree.wait(ChildExitedEvent, "p")[0]
    assert isinstance(exited.reason, Crash)
    assert exited.reason.message == "exited with status 3"
    assert "about to fail" in exited.reason.traceback
    restarted = tree.wait(ChildRestarted, "p")[0]
    assert restarted.generation == 1
    assert restarted.delay == pytest.approx(5.0, rel=0.11)
