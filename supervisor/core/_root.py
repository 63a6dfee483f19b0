"""The root of a tree: start a top supervisor, wait for it, stop it, read its end.

The root is the only place that blocks on the tree. It receives the top supervisor's
lifecycle notices on a plain queue, so the calling thread (the main thread of
`python -m supervisor`) keeps handling signals while the tree runs.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from typing import Any, cast

import pykka

from supervisor.core import _names
from supervisor.core._actor import ChildContext
from supervisor.core._clock import REAL_CLOCK, Clock
from supervisor.core._events import EventBus
from supervisor.core._process import kill_all_process_groups
from supervisor.core._protocol import (
    ChildExited,
    ChildInfo,
    ChildReady,
    ExitReason,
    Normal,
    Shutdown,
    StopRequest,
    WhichChildren,
)
from supervisor.core._spec import ChildSpec, SupervisorFlags
from supervisor.core._supervisor import Supervisor

__all__ = ["Root", "exit_code_for"]


def exit_code_for(reason: ExitReason) -> int:
    """0 for an ordered stop or a normal end; 1 for escalation, failed start or crash."""
    return 0 if isinstance(reason, Normal | Shutdown) else 1


class Root:
    """Owns the top supervisor of a tree."""

    def __init__(
        self,
        name: str,
        flags: SupervisorFlags,
        children: Sequence[ChildSpec],
        bus: EventBus | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.bus = bus or EventBus()
        self.clock = clock or REAL_CLOCK
        # A SimpleQueue: its put is reentrant, so a signal handler may `wake()` the thread
        # waiting in `poll()` even while that very thread is inside the queue's code.
        self._notices: queue.SimpleQueue[ChildReady | ChildExited | None] = queue.SimpleQueue()
        context = ChildContext(
            child_id=name,
            generation=0,
            path=name,
            notify=self._notices.put,
            bus=self.bus,
            clock=self.clock,
        )
        self.ref: pykka.ActorRef[Any] = Supervisor.start(context, flags, children)
        _names.register(name, self.ref)
        self.ready = False
        self.exit_reason: ExitReason | None = None

    def poll(self, timeout: float) -> ChildReady | ChildExited | None:
        """Wait up to `timeout` for the next notice from the top supervisor (None after
        the timeout or a `wake()`)."""
        try:
            notice = self._notices.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(notice, ChildReady):
            self.ready = True
        elif isinstance(notice, ChildExited):
            self.exit_reason = notice.reason
        return notice

    def wake(self) -> None:
        """End the current or next `poll()` at once (safe from a signal handler)."""
        self._notices.put(None)

    def wait_ready(self, timeout: float) -> bool:
        """True once the whole tree is ready; False if it exited or the time ran out."""
        deadline = time.monotonic() + timeout
        while not self.ready and self.exit_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.poll(remaining)
        return self.ready and self.exit_reason is None

    def stop(self, reason: str = "requested", brutal: bool = False) -> None:
        """Ask the tree to stop in order (or brutally); returns at once."""
        try:
            self.ref.tell(StopRequest(reason=reason, brutal=brutal))
        except pykka.ActorDeadError:
            pass

    def wait_exit(self, timeout: float) -> ExitReason | None:
        """Wait for the tree's end; None if still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.exit_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.poll(remaining)
        return self.exit_reason

    def stop_and_wait(self, timeout: float = 60.0, reason: str = "requested") -> ExitReason:
        """Stop in order; past `timeout`, stop brutally and kill every process group."""
        self.stop(reason)
        result = self.wait_exit(timeout)
        if result is None:
            self.stop("stop timed out", brutal=True)
            result = self.wait_exit(5.0)
        kill_all_process_groups()
        return result or Shutdown(detail="abandoned")

    def which_children(self, recursive: bool = True, timeout: float = 5.0) -> tuple[ChildInfo, ...]:
        """The tree's children (see `WhichChildren`)."""
        return cast(tuple[ChildInfo, ...], self.ref.ask(WhichChildren(recursive), timeout=timeout))
