"""An in-process bus for supervision events, and a recorder tests wait on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from messages.supervision import SupervisionEvent

__all__ = ["EventBus", "EventRecorder"]

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
