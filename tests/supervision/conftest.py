"""Fixtures for supervision tests: a root factory that always cleans up after itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from supervisor.core import (
    ChildSpec,
    Clock,
    EventBus,
    EventRecorder,
    Root,
    SupervisorFlags,
    kill_all_process_groups,
    live_process_groups,
)
from tests.supervision.children import Script, wait_until


class Tree:
    """A started root with its event recorder."""

    def __init__(self, root: Root, recorder: EventRecorder) -> None:
        self.root = root
        self.events = recorder

    def of(
        self, kind: type[Any], child_id: str | None = None, supervisor: str | None = None
    ) -> list[Any]:
        """Recorded events of `kind`, optionally for one child id and/or supervisor path."""
        return [
            e
            for e in self.events.events
            if isinstance(e, kind)
            and (child_id is None or getattr(e, "child_id", None) == child_id)
            and (supervisor is None or e.supervisor == supervisor)
        ]

    def wait(
        self, kind: type[Any], child_id: str | None = None, count: int = 1, timeout: float = 10.0
    ) -> list[Any]:
        """Wait for `count` events of `kind` (for `child_id`)."""
        return self.events.wait_for(
            lambda e: (
                isinstance(e, kind)
                and (child_id is None or getattr(e, "child_id", None) == child_id)
            ),
            timeout=timeout,
            count=count,
        )

    def children(self, recursive: bool = False) -> dict[str, Any]:
        """which_children by id."""
        return {c.id: c for c in self.root.which_children(recursive=recursive)}


@pytest.fixture
def script() -> Iterator[Script]:
    """A fresh script; released at the end so no test thread hangs."""
    s = Script()
    yield s
    s.release.set()


@pytest.fixture
def make_tree() -> Iterator[Callable[..., Tree]]:
    """Start trees; every one is stopped (brutally if needed) and checked for leaks after."""
    trees: list[Tree] = []

    def make(
        children: Sequence[ChildSpec],
        flags: SupervisorFlags | None = None,
        clock: Clock | None = None,
        name: str = "root",
        wait_ready: bool = True,
    ) -> Tree:
        bus = EventBus()
        recorder = EventRecorder(bus)
        root = Root(name, flags or SupervisorFlags(), children, bus=bus, clock=clock)
        tree = Tree(root, recorder)
        trees.append(tree)
        if wait_ready:
            assert root.wait_ready(10), f"tree did not become ready: {root.exit_reason}"
        return tree

    yield make
    for tree in trees:
        if tree.root.exit_reason is None:
            tree.root.stop("test teardown", brutal=True)
            tree.root.wait_exit(5)
    leaked = live_process_groups()
    kill_all_process_groups()
    assert wait_until(lambda: not live_process_groups(), timeout=5), f"leaked groups {leaked}"
