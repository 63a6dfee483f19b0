"""OTP-style supervision on pykka: child specs, strategies, restarts, ordered stop.

The public surface; everything else in this package is private.
"""

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
from supervisor._process import kill_all_process_groups, live_process_groups, set_output_handler
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
    "set_output_handler",
    "should_restart",
    "validate_child_spec",
    "validate_flags",
    "validate_supervisor",
    "whereis",
]
