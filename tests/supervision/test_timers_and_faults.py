"""The library's timers (`send_after`, `send_every` on the injected clock) and its fault
hooks (`suspend`, `crash`), as OTP's `erlang:send_after`, `timer:send_interval` and
`sys:suspend`: tested with a `FakeClock`, so no test sleeps to make time pass."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

import pytest

from supervisor.core import (
    ActorStart,
    ChildContext,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    Crash,
    FakeClock,
    SupervisedActor,
    SupervisorFlags,
    Timer,
    crash,
    suspend,
    whereis,
)
from tests.supervision.children import wait_until
from tests.supervision.conftest import Tree


class Ticking(SupervisedActor):
    """Arms the timers its test asks for and reports every message it gets."""

    def __init__(self, context: ChildContext, seen: queue.Queue[Any]) -> None:
        super().__init__(context)
        self.seen = seen
        self.timers: dict[str, Timer] = {}

    def handle(self, message: Any) -> Any:
        match message:
            case ("after", delay, payload):
                self.timers[payload] = self.send_after(delay, payload)
            case ("every", interval, payload):
                self.timers[payload] = self.send_every(interval, payload)
            case ("cancel", payload):
                self.timers[payload].cancel()
            case "crash":
                msg = "asked to crash"
                raise ValueError(msg)
            case _:
                self.seen.put(message)
        return None


def _tree(make_tree: Callable[..., Tree], clock: FakeClock) -> tuple[Tree, queue.Queue[Any]]:
    seen: queue.Queue[Any] = queue.Queue()
    spec = ChildSpec("ticker", ActorStart(Ticking, (seen,)))
    return make_tree([spec], SupervisorFlags(intensity=5), clock=clock), seen


def _ask(message: Any) -> None:
    ref = whereis("root/ticker")
    assert ref is not None
    ref.ask(message, timeout=5)


def _drain(seen: queue.Queue[Any], count: int) -> list[Any]:
    return [seen.get(timeout=5) for _ in range(count)]


def test_send_after_delivers_once_when_the_clock_reaches_the_delay(
    make_tree: Callable[..., Tree],
) -> None:
    clock = FakeClock()
    _, seen = _tree(make_tree, clock)
    _ask(("after", 5.0, "late"))
    clock.advance(4.9)
    _ask("marker")  # everything told before the marker is handled before it
    assert _drain(seen, 1) == ["marker"]
    clock.advance(0.1)
    assert _drain(seen, 1) == ["late"]
    clock.advance(100)
    _ask("marker")
    assert _drain(seen, 1) == ["marker"]


def test_send_every_repeats_at_its_interval_until_cancelled(
    make_tree: Callable[..., Tree],
) -> None:
    clock = FakeClock()
    _, seen = _tree(make_tree, clock)
    _ask(("every", 2.0, "tick"))
    for _ in range(3):
        clock.advance(2.0)
    assert _drain(seen, 3) == ["tick", "tick", "tick"]
    _ask(("cancel", "tick"))
    assert clock.pending() == []
    clock.advance(10)
    _ask("marker")
    assert _drain(seen, 1) == ["marker"]


def test_an_actors_timers_are_cancelled_when_it_exits(make_tree: Callable[..., Tree]) -> None:
    clock = FakeClock()
    tree, _seen = _tree(make_tree, clock)
    _ask(("every", 1.0, "tick"))
    _ask(("after", 30.0, "late"))
    assert len(clock.pending()) == 2
    ref = whereis("root/ticker")
    assert ref is not None
    ref.tell("crash")
    tree.wait(ChildExitedEvent, "ticker")
    # What is left is the supervisor's restart backoff (about 0.1 s), none of the
    # crashed incarnation's timers. The exit event is emitted before the supervisor
    # schedules that backoff: wait for it to be scheduled.
    assert wait_until(lambda: len(clock.pending()) >= 1, timeout=10), "no backoff scheduled"
    assert len(clock.pending()) == 1
    assert clock.pending()[0] < 0.5
    clock.advance(1.0)
    tree.wait(ChildReadyEvent, "ticker", count=2)
    assert clock.pending() == []


def test_send_every_refuses_a_non_positive_interval() -> None:
    class Probe(SupervisedActor):
        pass

    ctx = ChildContext("p", 0, "p", lambda _n: None, None, FakeClock())  # type: ignore[arg-type]
    actor = Probe(ctx)
    with pytest.raises(ValueError, match="positive interval"):
        actor.send_every(0, "x")


def test_suspend_blocks_the_actor_and_crash_is_an_ordinary_crash(
    make_tree: Callable[..., Tree],
) -> None:
    clock = FakeClock()
    tree, seen = _tree(make_tree, clock)
    began = time.monotonic()
    assert suspend("root/ticker", 0.3)
    ref = whereis("root/ticker")
    assert ref is not None
    ref.tell("after-suspend")
    assert seen.get(timeout=5) == "after-suspend"
    assert time.monotonic() - began >= 0.3  # not handled before the suspension ended
    assert crash("root/ticker", "on purpose")
    exited = tree.wait(ChildExitedEvent, "ticker")[0]
    assert isinstance(exited.reason, Crash)
    assert (exited.reason.error_type, exited.reason.message) == ("InjectedFaultError", "on purpose")
    assert not suspend("root/nobody", 1.0)
    assert not crash("root/nobody")
