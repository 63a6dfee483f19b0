"""Supervision events (every start, exit, restart and escalation, as typed values), the
in-process bus they are published on, and a recorder tests wait on.

Supervisors publish these on an event bus; they are logged, counted as Prometheus
metrics and can be subscribed to (tests wait on them instead of sleeping).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec

from supervisor.core._protocol import ExitReason

__all__ = [
    "ChildExitedEvent",
    "ChildReadyEvent",
    "ChildRestarted",
    "ChildStarted",
    "EventBus",
    "EventRecorder",
    "RestartIntensityExceededEvent",
    "SupervisionEvent",
    "SupervisorStopped",
]


class _Event(msgspec.Struct, frozen=True, tag_field="event", tag=str.lower):
    """Common fields: the supervisor's actor path and the monotonic time of the event."""

    supervisor: str
    at: float


class ChildStarted(_Event, frozen=True, tag="child_started"):
    """A child's incarnation `generation` was spawned (not yet ready)."""

    child_id: str
    generation: int
    kind: str


class ChildReadyEvent(_Event, frozen=True, tag="child_ready"):
    """A child reported ready; the next sibling may start."""

    child_id: str
    generation: int


class ChildExitedEvent(_Event, frozen=True, tag="child_exited"):
    """A child's incarnation ended with `reason`."""

    child_id: str
    generation: int
    reason: ExitReason


class ChildRestarted(_Event, frozen=True, tag="child_restarted"):
    """A child is being restarted (after `delay` seconds of backoff), because of `cause`."""

    child_id: str
    generation: int
    delay: float
    cause: str


class RestartIntensityExceededEvent(_Event, frozen=True, tag="restart_intensity_exceeded"):
    """The supervisor gives up and escalates to its parent."""

    child_id: str
    restarts: int
    period: float


class SupervisorStopped(_Event, frozen=True, tag="supervisor_stopped"):
    """The supervisor stopped all its children and exits with `reason`."""

    reason: ExitReason


SupervisionEvent = (
    ChildStarted
    | ChildReadyEvent
    | ChildExitedEvent
    | ChildRestarted
    | RestartIntensityExceededEvent
    | SupervisorStopped
)


Listener = Callable[[SupervisionEvent], None]


class EventBus:
    """Synchronous publish/subscribe: listeners run in the publishing thread, in order."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add `listener`; returns a function that removes it."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [x for x in self._listeners if x is not listener]

        return unsubscribe

    def publish(self, event: SupervisionEvent) -> None:
        """Deliver `event` to every listener; a failing listener never stops the others."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                import logging

                logging.getLogger(__name__).exception("supervision event listener failed")


class EventRecorder:
    """Records every event of a bus; `wait_for` blocks until a matching one arrives."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[SupervisionEvent] = []
        self._cond = threading.Condition()
        self._unsubscribe = bus.subscribe(self._record)

    def _record(self, event: SupervisionEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[SupervisionEvent], bool],
        timeout: float = 10.0,
        count: int = 1,
    ) -> list[SupervisionEvent]:
        """Wait until `count` recorded events satisfy `predicate`; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if predicate(e)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = [type(e).__name__ for e in self.events[-20:]]
                    msg = f"timed out after {timeout}s waiting for {count} events; last: {kinds}"
                    raise TimeoutError(msg)
                self._cond.wait(remaining)

    def close(self) -> None:
        """Stop recording."""
        self._unsubscribe()
