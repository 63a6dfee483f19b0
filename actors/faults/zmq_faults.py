"""Injected ZMQ faults for a socket reader: drop or delay a fraction of messages."""

from __future__ import annotations

import random
import threading
import time

from messages.chaos import ChaosZmq

__all__ = ["ZmqFaults"]


class ZmqFaults:
    """The current drop/delay rule of one socket (set by the actor, applied by its reader)."""

    def __init__(self) -> None:
        self._rule: ChaosZmq | None = None
        self._random = random.Random()
        self._lock = threading.Lock()
        self.dropped = 0
        self.delayed = 0

    def set(self, rule: ChaosZmq) -> None:
        """Apply `rule` until its `until` time."""
        with self._lock:
            self._rule = rule

    def admit(self) -> bool:
        """Called per received message: False to drop it; may sleep to delay it."""
        delay = self.verdict()
        if delay is None:
            return False
        if delay > 0:
            time.sleep(delay)
        return True

    def verdict(self) -> float | None:
        """Called per received message by a reader that must not sleep (one on an event
        loop): None to drop it, else the seconds to hold it first (0.0: none)."""
        if self._rule is None:  # the usual case, read without the lock: one attribute load
            return 0.0
        with self._lock:
            rule = self._rule
            if rule is None:
                return 0.0
            if time.monotonic() >= rule.until:
                self._rule = None
                return 0.0
            roll = self._random.random()
            delay_roll = self._random.random()
        if roll < rule.drop:
            self.dropped += 1
            return None
        if delay_roll < rule.delay_fraction and rule.delay > 0:
            self.delayed += 1
            return rule.delay
        return 0.0
