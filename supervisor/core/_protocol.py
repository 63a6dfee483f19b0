"""Supervision messages: exit reasons, child lifecycle notices and supervision events.

Everything here is a frozen msgspec Struct, so a reason or an event can be logged,
compared in tests and sent over the wire without an untyped dict in between.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "AddChild",
    "ChildExited",
    "ChildInfo",
    "ChildReady",
    "Crash",
    "ExitReason",
    "Killed",
    "Normal",
    "RemoveChild",
    "RestartIntensityExceeded",
    "Shutdown",
    "StartFailed",
    "StartTimeout",
    "StopRequest",
    "TimerFired",
    "WhichChildren",
    "is_abnormal",
]


class _Reason(msgspec.Struct, frozen=True, tag_field="reason", tag=str.lower):
    """Base of every exit reason; the tag names the kind on the wire."""

    def describe(self) -> str:
        """One line for logs and summaries."""
        return type(self).__name__.lower()


class Normal(_Reason, frozen=True, tag="normal"):
    """The child finished its work and exited on its own (exit status 0)."""


class Shutdown(_Reason, frozen=True, tag="shutdown"):
    """The child stopped because its supervisor (or the operator) asked it to."""

    detail: str = ""

    def describe(self) -> str:
        return f"shutdown ({self.detail})" if self.detail else "shutdown"


class Crash(_Reason, frozen=True, tag="crash"):
    """The child failed: an exception in an actor, a non-zero exit status in a process."""

    error_type: str
    message: str
    traceback: str = ""

    def describe(self) -> str:
        return f"crash: {self.error_type}: {self.message}"


class StartFailed(_Reason, frozen=True, tag="start_failed"):
    """The child failed before reporting ready."""

    cause: str

    def describe(self) -> str:
        return f"start_failed: {self.cause}"


class StartTimeout(_Reason, frozen=True, tag="start_timeout"):
    """The child did not report ready within its start timeout."""

    timeout: float

    def describe(self) -> str:
        return f"start_timeout after {self.timeout:g}s"


class Killed(_Reason, frozen=True, tag="killed"):
    """The child was killed: by a signal (processes) or abandoned after its stop timed out."""

    signal: int = 0
    detail: str = ""
    output: str = ""  # a process's last lines of output, when nobody in the tree killed it

    def describe(self) -> str:
        parts = ["killed"]
        if self.signal:
            parts.append(f"by signal {self.signal}")
        if self.detail:
            parts.append(f"({self.detail})")
        return " ".join(parts)


class RestartIntensityExceeded(_Reason, frozen=True, tag="restart_intensity_exceeded"):
    """A supervisor gave up: more than `intensity` restarts within `period` seconds."""

    supervisor: str
    child: str
    restarts: int
    period: float
    last_reason: str

    def describe(self) -> str:
        return (
            f"restart_intensity_exceeded in {self.supervisor}: child {self.child!r} needed "
            f"{self.restarts} restarts within {self.period:g}s; last: {self.last_reason}"
        )


ExitReason = (
    Normal | Shutdown | Crash | StartFailed | StartTimeout | Killed | RestartIntensityExceeded
)


def is_abnormal(reason: ExitReason) -> bool:
    """True for every reason a `transient` child is restarted for (OTP: not normal/shutdown)."""
    return not isinstance(reason, Normal | Shutdown)


# --- lifecycle notices: child → supervisor -------------------------------------------


class ChildReady(msgspec.Struct, frozen=True):
    """A child finished its start-up (the readiness handshake)."""

    child_id: str
    generation: int


class ChildExited(msgspec.Struct, frozen=True):
    """A child's incarnation ended; `generation` tells stale notices from current ones."""

    child_id: str
    generation: int
    reason: ExitReason


class StopRequest(msgspec.Struct, frozen=True):
    """Ask a supervisor (or the root) to stop in order; `brutal` skips graceful timeouts."""

    reason: str = "requested"
    brutal: bool = False


class TimerFired(msgspec.Struct, frozen=True):
    """A supervisor's own timer (start timeout, shutdown timeout, backoff) went off."""

    token: int


# --- introspection and dynamic children ------------------------------------------------


class ChildInfo(msgspec.Struct, frozen=True):
    """One row of `which_children`: a child's identity, state and history."""

    id: str
    kind: str  # actor | process | supervisor
    state: str  # starting | running | stopping | restarting | stopped
    generation: int  # incarnation number, 0 for the first start
    restarts: int
    last_exit: str | None = None
    uptime: float | None = None  # seconds since it became ready
    pid: int | None = None
    children: tuple[ChildInfo, ...] = ()


class WhichChildren(msgspec.Struct, frozen=True):
    """Ask a supervisor for its children (and, if `recursive`, theirs)."""

    recursive: bool = False


class AddChild(msgspec.Struct, frozen=True):
    """Ask a pool supervisor for one more child of its spec; the reply is the new id."""


class RemoveChild(msgspec.Struct, frozen=True):
    """Ask a pool supervisor to stop and drop the child `child_id`."""

    child_id: str
