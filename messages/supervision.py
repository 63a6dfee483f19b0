"""Supervision events: every start, exit, restart and escalation, as typed values.

Supervisors publish these on an event bus; they are logged, counted as Prometheus
metrics and can be subscribed to (tests wait on them instead of sleeping).
"""

from __future__ import annotations

import msgspec

from messages.control import ExitReason

__all__ = [
    "ChildExitedEvent",
    "ChildReadyEvent",
    "ChildRestarted",
    "ChildStarted",
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
