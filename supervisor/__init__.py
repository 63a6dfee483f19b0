"""OTP-style supervision on pykka: child specs, strategies, restarts, ordered stop.

The public surface; everything else in this package is private.
"""

# First: `python -m supervisor` (the node) catches its stop signals on this import, before
# the imports below take their few tenths of a second (see stop_signals; for any other use
# of the package it does nothing).
from supervisor import stop_signals  # noqa: F401

# isort: split
from supervisor._actor import ChildContext, SupervisedActor
from supervisor._clock import Clock, FakeClock, RealClock
from supervisor._decisions import (
    BackoffState,
    add_restart,
    auto_shutdown_due,
    children_to_restart,
    intensity_exceeded,
    next_backoff,
    should_restart,
)
from supervisor._events import EventBus, EventRecorder
from supervisor._metrics import SupervisionMetrics
from supervisor._names import ask, whereis
from supervisor._process import kill_all_process_groups, live_process_groups
from supervisor._root import Root, exit_code_for
from supervisor._spec import (
    DEFAULTS,
    ActorStart,
    Backoff,
    ChildSpec,
    InvalidSpec,
    ProcessStart,
    ReadyImmediately,
    ReadyOnFile,
    ReadyOnLine,
    ReadyOnPort,
    SupervisorFlags,
    validate_child_spec,
    validate_flags,
    validate_supervisor,
)
from supervisor._supervisor import Supervisor

__all__ = [
    "DEFAULTS",
    "ActorStart",
    "Backoff",
    "BackoffState",
    "ChildContext",
    "ChildSpec",
    "Clock",
    "EventBus",
    "EventRecorder",
    "FakeClock",
    "InvalidSpec",
    "ProcessStart",
    "ReadyImmediately",
    "ReadyOnFile",
    "ReadyOnLine",
    "ReadyOnPort",
    "RealClock",
    "Root",
    "SupervisedActor",
    "SupervisionMetrics",
    "Supervisor",
    "SupervisorFlags",
    "add_restart",
    "ask",
    "auto_shutdown_due",
    "children_to_restart",
    "exit_code_for",
    "intensity_exceeded",
    "kill_all_process_groups",
    "live_process_groups",
    "next_backoff",
    "should_restart",
    "validate_child_spec",
    "validate_flags",
    "validate_supervisor",
    "whereis",
]
