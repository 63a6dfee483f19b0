"""`LoopActor`: supervised actors handled on a shared event loop. They keep every
semantic of a thread actor (order, ask, crash and restart alone, timers, fault hooks,
undelivered answers) while handling their messages on the loop's thread; a start-up may
block; the `Suspend` fault parks one actor without stopping the loop; the loop's end
ends its actors."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from supervisor.core import (
    SLOW_MESSAGE,
    ActorStart,
    ChildContext,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    Crash,
    LoopActor,
    LoopHost,
    LoopThread,
    SupervisorFlags,
    ask,
    crash,
    suspend,
    whereis,
)
from tests.supervision.children import wait_until
from tests.supervision.conftest import Tree


class Echo(LoopActor):
    """Reports each message with the thread it was handled on; answers asks."""

    def __init__(self, context: ChildContext, host: LoopHost, seen: queue.Queue[Any]) -> None:
        super().__init__(context)
        self.host = host
        self.seen = seen

    def on_start_up(self) -> None:
        self.seen.put(("started_on", threading.current_thread().name))
        self.actor_ref.tell("told during start-up")
        time.sleep(0.2)  # a start-up may block: it runs on a thread of its own

    def loop_host(self) -> LoopHost:
        return self.host

    def handle(self, message: Any) -> Any:
        match message:
            case "crash":
                msg = "asked to crash"
                raise ValueError(msg)
            case ("after", delay, payload):
                self.send_after(delay, payload)
            case ("sleep_in_task", seconds):
                self.spawn(asyncio.sleep(seconds, "slept"), then=lambda r: ("task", r))
            case "failing_task":
                self.spawn(_fail())
            case "ping":
                return "pong"
            case ("block", seconds):
                time.sleep(seconds)  # what a loop-hosted actor must not do
            case _:
                self.seen.put((message, threading.current_thread().name))
        return None


async def _fail() -> None:
    await asyncio.sleep(0)
    msg = "the task failed"
    raise RuntimeError(msg)


@pytest.fixture
def host() -> Iterator[LoopThread]:
    loop = LoopThread("test-loop")
    yield loop
    loop.stop()


def _tree(
    make_tree: Callable[..., Tree], host: LoopHost, ids: tuple[str, ...] = ("a",)
) -> tuple[Tree, dict[str, queue.Queue[Any]]]:
    seen: dict[str, queue.Queue[Any]] = {i: queue.Queue() for i in ids}
    specs = [ChildSpec(i, ActorStart(Echo, (host, seen[i]))) for i in ids]
    return make_tree(specs, SupervisorFlags(intensity=5, period=30)), seen


def _next(seen: queue.Queue[Any]) -> Any:
    return seen.get(timeout=5)


def test_messages_are_handled_in_order_on_the_loop_thread_after_a_blocking_start_up(
    make_tree: Callable[..., Tree], host: LoopThread
) -> None:
    tree, seen = _tree(make_tree, host)
    tree.wait(ChildReadyEvent, "a")
    kind, thread = _next(seen["a"])
    assert kind == "started_on"
    assert thread != "test-loop"  # the start-up ran on a thread of its own
    assert _next(seen["a"]) == ("told during start-up", "test-loop")
    ref = whereis("root/a")
    assert ref is not None
    for i in range(50):
        ref.tell(i)
    assert [_next(seen["a"]) for _ in range(50)] == [(i, "test-loop") for i in range(50)]
    assert ask("root/a", "ping", timeout=5) == "pong"  # from another thread


def test_a_crash_restarts_that_actor_alone_and_the_loop_serves_its_sibling_on(
    make_tree: Callable[..., Tree], host: LoopThread
) -> None:
    tree, _seen = _tree(make_tree, host, ("a", "b"))
    tree.wait(ChildReadyEvent, "b")
    assert crash("root/a", "injected")
    exited = tree.wait(ChildExitedEvent, "a")[0]
    assert isinstance(exited.reason, Crash)
    assert exited.reason.error_type == "InjectedFaultError"
    tree.wait(ChildReadyEvent, "a", count=2)
    with pytest.raises(ValueError, match="asked to crash"):
        ask("root/b", "crash", timeout=5)  # the caller gets the exception, as a thread's
    tree.wait(ChildReadyEvent, "b", count=2)
    assert ask("root/a", "ping", timeout=5) == "pong"
    assert ask("root/b", "ping", timeout=5) == "pong"


def test_suspend_parks_one_actor_while_its_sibling_on_the_loop_answers(
    make_tree: Callable[..., Tree], host: LoopThread
) -> None:
    tree, seen = _tree(make_tree, host, ("a", "b"))
    tree.wait(ChildReadyEvent, "b")
    assert suspend("root/a", 1.0)
    started = time.monotonic()
    a = whereis("root/a")
    assert a is not None
    a.tell("after the suspension")
    assert ask("root/b", "ping", timeout=0.5) == "pong"  # the loop is not blocked
    while _next(seen["a"])[0] != "after the suspension":
        pass
    assert time.monotonic() - started >= 0.9


def test_timers_and_tasks_come_back_as_messages_and_a_failing_task_crashes_the_actor(
    make_tree: Callable[..., Tree], host: LoopThread
) -> None:
    tree, seen = _tree(make_tree, host)
    tree.wait(ChildReadyEvent, "a")
    ref = whereis("root/a")
    assert ref is not None
    ref.tell(("after", 0.05, "timer fired"))
    ref.tell(("sleep_in_task", 0.05))
    got = set()
    while len(got) < 2:
        message = _next(seen["a"])[0]
        if message not in {"started_on", "told during start-up"}:
            got.add(message)
    assert got == {"timer fired", ("task", "slept")}
    ref.tell("failing_task")
    exited = tree.wait(ChildExitedEvent, "a")[0]
    assert isinstance(exited.reason, Crash)
    assert "the task failed" in exited.reason.message
    tree.wait(ChildReadyEvent, "a", count=2)


def test_when_its_loop_ends_the_actor_exits_with_a_crash_that_says_so(
    make_tree: Callable[..., Tree],
) -> None:
    loop = LoopThread("short-loop")
    tree, _seen = _tree(make_tree, loop)
    tree.wait(ChildReadyEvent, "a")
    ref = whereis("root/a")
    assert ref is not None
    loop.stop()
    exited = tree.wait(ChildExitedEvent, "a")[0]
    assert isinstance(exited.reason, Crash)
    assert exited.reason.error_type == "LoopEnded"
    assert wait_until(lambda: not ref.is_alive())
    # its restart finds the loop ended: each incarnation ends at once, until the
    # supervisor gives up, instead of waiting for ever
    tree.wait(ChildExitedEvent, "a", count=2)


def test_a_message_that_holds_up_the_loop_is_logged_with_its_type(
    make_tree: Callable[..., Tree], host: LoopThread
) -> None:
    with structlog.testing.capture_logs() as logs:
        tree, _seen = _tree(make_tree, host)
        tree.wait(ChildReadyEvent, "a")
        ask("root/a", ("block", SLOW_MESSAGE * 1.5), timeout=5)
        ask("root/a", ("block", SLOW_MESSAGE / 10), timeout=5)
    held = [e for e in logs if e["event"] == "a message held up the event loop this actor shares"]
    assert len(held) == 1, held
    assert held[0]["message_type"] == "tuple"
    assert held[0]["seconds"] >= SLOW_MESSAGE
