"""OTP-style supervision on pykka: child specs, strategies, restarts, ordered stop.

A library that stands alone: it knows nothing of the application built on it (it
imports nothing from `actors/` or `messages/`) and owns its own vocabulary (exit
reasons, lifecycle notices, supervision events). This module is its public surface;
everything else in the package is private.
"""

from supervisor.core._actor import ActorCrashed, ChildContext, InjectedFaultError, SupervisedActor
from supervisor.core._clock import Clock, FakeClock, RealClock, Timer
from supervisor.core._decisions import (
    BackoffState,
    add_restart,
    auto_shutdown_due,
    children_to_restart,
    intensity_exceeded,
    next_backoff,
    should_restart,
)
from supervisor.core._events import (
    ChildExitedEvent,
    ChildReadyEvent,
    ChildRestarted,
    ChildStarted,
    EventBus,
    EventRecorder,
    RestartIntensityExceededEvent,
    SupervisionEvent,
    SupervisorStopped,
)
from supervisor.core._faults import crash, suspend
from supervisor.core._loop_actor import SLOW_MESSAGE, LoopActor, LoopHost, LoopThread
from supervisor.core._metrics import SupervisionMetrics
from supervisor.core._names import ask, whereis
from supervisor.core._process import (
    kill_all_process_groups,
    live_process_groups,
    set_output_handler,
)
from supervisor.core._protocol import (
    AddChild,
    ChildExited,
    ChildInfo,
    ChildReady,
    Crash,
    ExitReason,
    Killed,
    Normal,
    RemoveChild,
    RestartIntensityExceeded,
    Shutdown,
    StartFailed,
    StartTimeout,
    StopRequest,
    WhichChildren,
    is_abnormal,
)
from supervisor.core._root import Root, exit_code_for
from supervisor.core._spec import (
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
    Strategy,
    SupervisorFlags,
    validate_child_spec,
    validate_flags,
    validate_supervisor,
)
from supervisor.core._supervisor import Supervisor

__all__ = [
    "DEFAULTS",
    "SLOW_MESSAGE",
    "ActorCrashed",
    "ActorStart",
    "AddChild",
    "Backoff",
    "BackoffState",
    "ChildContext",
    "ChildExited",
    "ChildExitedEvent",
    "ChildInfo",
    "ChildReady",
    "ChildReadyEvent",
    "ChildRestarted",
    "ChildSpec",
    "ChildStarted",
    "Clock",
    "Crash",
    "EventBus",
    "EventRecorder",
    "ExitReason",
    "FakeClock",
    "InjectedFaultError",
    "InvalidSpec",
    "Killed",
    "LoopActor",
    "LoopHost",
    "LoopThread",
    "Normal",
    "ProcessStart",
    "ReadyImmediately",
    "ReadyOnFile",
    "ReadyOnLine",
    "ReadyOnPort",
    "RealClock",
    "RemoveChild",
    "RestartIntensityExceeded",
    "RestartIntensityExceededEvent",
    "Root",
    "Shutdown",
    "StartFailed",
    "StartTimeout",
    "StopRequest",
    "Strategy",
    "SupervisedActor",
    "SupervisionEvent",
    "SupervisionMetrics",
    "Supervisor",
    "SupervisorFlags",
    "SupervisorStopped",
    "Timer",
    "WhichChildren",
    "add_restart",
    "ask",
    "auto_shutdown_due",
    "children_to_restart",
    "crash",
    "exit_code_for",
    "intensity_exceeded",
    "is_abnormal",
    "kill_all_process_groups",
    "live_process_groups",
    "next_backoff",
    "set_output_handler",
    "should_restart",
    "suspend",
    "validate_child_spec",
    "validate_flags",
    "validate_supervisor",
    "whereis",
]
