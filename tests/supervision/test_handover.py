"""What a child hands over to its next incarnation (`ChildContext.handover`): kept by the
supervisor across the child's restarts, as an ETS table whose heir is the supervisor, and
in the supervisor's own handover, so across the supervisor's restarts too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from supervisor.core import (
    ActorStart,
    Backoff,
    ChildContext,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    SupervisedActor,
    Supervisor,
    SupervisorFlags,
    whereis,
)
from tests.supervision.children import wait_until
from tests.supervision.conftest import Tree

FAST = SupervisorFlags(intensity=5, backoff=Backoff(initial=0.0, jitter=0.0))


class Counter(SupervisedActor):
    """Counts its incarnations in its handover, and remembers what it was told."""

    def on_start_up(self) -> None:
        self.context.handover["starts"] = self.context.handover.get("starts", 0) + 1

    def handle(self, message: Any) -> Any:
        match message:
            case ("remember", value):
                self.context.handover["value"] = value
            case "read":
                return dict(self.context.handover)
            case "crash":
                msg = "asked to crash"
                raise ValueError(msg)
        return None


def _ref(path: str) -> Any:
    ref = whereis(path)
    assert ref is not None
    return ref


def _ask(path: str, message: Any) -> Any:
    return _ref(path).ask(message, timeout=5)


def _pool(size: int, **worker: Any) -> ChildSpec:
    """A pool supervisor `pool` of `size` `Counter` workers `w` (ChildSpec options)."""
    flags = SupervisorFlags(strategy="pool", intensity=5)
    workers = [ChildSpec("w", ActorStart(Counter), **worker)]
    return ChildSpec("pool", ActorStart(Supervisor, (flags, workers), {"pool_size": size}))


def test_a_restarted_child_finds_what_its_predecessor_handed_over(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree([ChildSpec("c", ActorStart(Counter))], FAST)
    _ask("root/c", ("remember", "streams"))
    _ref("root/c").tell("crash")
    tree.wait(ChildReadyEvent, "c", count=2)
    assert _ask("root/c", "read") == {"starts": 2, "value": "streams"}


def test_each_child_has_its_own_handover_and_a_pool_child_keeps_its_own(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree([ChildSpec("a", ActorStart(Counter)), _pool(2)], FAST)
    _ask("root/a", ("remember", "a's"))
    _ask("root/pool/w-1", ("remember", "w-1's"))
    _ref("root/pool/w-1").tell("crash")
    tree.wait(ChildExitedEvent, "w-1")
    tree.wait(ChildReadyEvent, "w-1", count=2)
    assert _ask("root/pool/w-1", "read") == {"starts": 2, "value": "w-1's"}
    assert _ask("root/pool/w-2", "read") == {"starts": 1}
    assert _ask("root/a", "read") == {"starts": 1, "value": "a's"}


def test_a_child_context_made_by_hand_starts_with_an_empty_handover() -> None:
    context = ChildContext("x", 0, "x", lambda _n: None, None, None)  # type: ignore[arg-type]
    assert context.handover == {}


def test_what_a_child_handed_over_outlives_a_restart_of_its_supervisor(
    make_tree: Callable[..., Tree],
) -> None:
    # A rest_for_one sibling's crash restarts the subtree the child is in: its supervisor
    # keeps the children's handovers in its own, which its parent keeps.
    sub = ChildSpec(
        "sub",
        ActorStart(Supervisor, (FAST, [ChildSpec("c", ActorStart(Counter))])),
    )
    first = ChildSpec("first", ActorStart(Counter))
    rest = SupervisorFlags(
        strategy="rest_for_one", intensity=5, backoff=Backoff(initial=0.0, jitter=0.0)
    )
    tree = make_tree([first, sub], rest)
    _ask("root/sub/c", ("remember", "streams"))
    _ref("root/first").tell("crash")
    tree.wait(ChildReadyEvent, "sub", count=2)
    assert _ask("root/sub/c", "read") == {"starts": 2, "value": "streams"}


def test_a_pool_child_removed_for_good_takes_its_handover_along(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree([_pool(1, restart="transient")], FAST)
    _ask("root/pool/w-1", ("remember", "w-1's"))
    kept = _ref("root/pool").proxy().context.get().handover["children"]
    assert kept["w-1"]["value"] == "w-1's"
    # a normal exit of a transient child: not restarted, removed from the pool
    _ref("root/pool/w-1").stop()
    tree.wait(ChildExitedEvent, "w-1")
    assert wait_until(lambda: "w-1" not in kept)  # the event comes before the removal
