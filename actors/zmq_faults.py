"""Injected ZMQ faults for a reader thread: drop or delay a fraction of messages."""

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
        with self._lock:
            rule = self._rule
            if rule is None:
                return True
            if time.monotonic() >= rule.until:
                self._rule = None
                return True
            roll = self._random.random()
            delay_roll = self._random.random()
        if roll < rule.drop:
            self.dropped += 1
            return False
        if delay_roll < rule.delay_fraction and rule.delay > 0:
            self.delayed += 1
            time.sleep(rule.delay)
        return True
