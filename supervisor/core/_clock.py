"""Clocks: the real one, and a fake one tests advance by hand.

Supervisors read time (restart intensity, backoff reset) and arm timers (start
timeout, shutdown timeout, backoff) only through a `Clock`, so every time-based
decision can be tested without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "FakeClock", "RealClock", "Timer"]


class Timer(Protocol):
    """A pending call that can be cancelled."""

    def cancel(self) -> None:
        """Drop the call if it has not run yet (idempotent)."""


class Clock(Protocol):
    """Monotonic time in seconds and delayed calls."""

    def now(self) -> float:
        """Current monotonic time in seconds."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` (on a clock thread, so it must be quick) after `delay` seconds."""


class _Entry:
    __slots__ = ("callback", "cancelled", "due", "seq")

    def __init__(self, due: float, seq: int, callback: Callable[[], None]) -> None:
        self.due = due
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: _Entry) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class RealClock:
    """`time.monotonic` and one daemon thread that runs due callbacks in order."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        entry = _Entry(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="clock", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0].due > time.monotonic():
                    timeout = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                entry = heapq.heappop(self._heap)
            if not entry.cancelled:
                try:
                    entry.callback()
                except Exception:
                    import logging

                    logging.getLogger(__name__).exception("timer callback failed")


class FakeClock:
    """A clock that only moves when a test calls `advance`; due callbacks run in that call."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        with self._lock:
            entry = _Entry(self._now + max(0.0, delay), next(self._seq), callback)
            heapq.heappush(self._heap, entry)
        return entry

    def pending(self) -> list[float]:
        """Delays (from now) of the timers not yet run nor cancelled, soonest first."""
        with self._lock:
            return sorted(e.due - self._now for e in self._heap if not e.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward, running every callback that falls due, in order."""
        with self._lock:
            target = self._now + seconds
        while True:
            with self._lock:
                if not self._heap or self._heap[0].due > target:
                    self._now = target
                    return
                entry = heapq.heappop(self._heap)
                self._now = max(self._now, entry.due)
            if not entry.cancelled:
                entry.callback()


REAL_CLOCK = RealClock()
