"""`SupervisedActor`: a pykka actor that takes part in supervision.

Pykka gives an actor a thread and an inbox, nothing more. This base class adds what
a supervisor needs, and designs around four pykka quirks:

* a failing `ask` does not crash a pykka actor: here any exception escaping a handler
  crashes the actor (as a failing `gen_server:call` does), and the caller still gets it;
* `on_failure` is not called when `on_start` raises: here a failing start-up is reported
  as `start_failed` and the cleanup hook runs;
* a `BaseException` in one pykka actor stops every actor in the process: here it is
  caught and turned into a crash of this actor alone;
* `actor_stopped` is set before `on_stop` finishes: here the parent learns of the exit
  only from the `ChildExited` notice, sent after the cleanup hook has returned.

Subclasses implement `on_start_up` (start-up work; the actor is ready when it returns,
or later when it calls `report_ready` if `deferred_ready` is set), `handle` (a match
on message type), `on_shutdown` (graceful stop) and `on_exit` (cleanup on every path).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from supervisor.core._clock import Clock, Timer
from supervisor.core._events import EventBus
from supervisor.core._faults import InjectCrash, Suspend
from supervisor.core._protocol import (
    ChildExited,
    ChildReady,
    Crash,
    ExitReason,
    Shutdown,
    StartFailed,
    StopRequest,
)

__all__ = [
    "ActorCrashed",
    "ChildContext",
    "InjectedFaultError",
    "Notify",
    "SupervisedActor",
    "crash_reason",
]

Notify = Callable[[ChildReady | ChildExited], None]


class ActorCrashed(Exception):
    """Raised to an `ask` caller when the actor died of a `BaseException`."""


class InjectedFaultError(RuntimeError):
    """A crash injected on purpose (fault injection)."""


@dataclass(frozen=True)
class ChildContext:
    """What a supervised child knows of its place in the tree."""

    child_id: str
    generation: int
    path: str  # e.g. "node/engine/engine_actor"
    notify: Notify  # delivers ChildReady / ChildExited to the parent
    bus: EventBus
    clock: Clock
    # What this child id hands over to its next incarnation: the supervisor keeps this dict
    # across the child's restarts (as an ETS table whose heir is the supervisor), so state
    # that must outlive a crash is put here; it goes when the child is removed or the
    # supervisor stops.
    handover: dict[str, Any] = field(default_factory=dict)


def crash_reason(exc: BaseException) -> Crash:
    """The `Crash` exit reason for an exception, with its traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Crash(error_type=type(exc).__name__, message=str(exc), traceback=tb)


class SupervisedActor(pykka.ThreadingActor):
    """Base of every actor a supervisor starts. See the module docstring."""

    # A hung actor must not keep the process alive once its supervisor gave up on it.
    use_daemon_thread = True
    # When True, the actor is ready only once it calls `report_ready()`.
    deferred_ready = False

    def __init__(self, context: ChildContext) -> None:
        super().__init__()
        self.context = context
        self.log = structlog.get_logger().bind(path=context.path, generation=context.generation)
        self._ready_reported = False
        self._exited = False
        self._exit_lock = threading.Lock()
        self._send_timers: set[_ActorTimer] = set()
        self._send_timers_lock = threading.Lock()
        self._exit_reason: ExitReason = Shutdown(detail="not exited")

    # --- hooks for subclasses -------------------------------------------------------------

    def on_start_up(self) -> None:
        """Start-up work, in the actor's thread; raising fails the start."""

    def handle(self, message: Any) -> Any:
        """Handle one message; the default refuses it (a crash, as an unknown call in OTP)."""
        msg = f"{type(self).__name__} does not handle {type(message).__name__}"
        raise TypeError(msg)

    def on_shutdown(self, request: StopRequest) -> None:
        """Graceful stop asked by the supervisor; may block up to the shutdown timeout."""

    def on_exit(self, reason: ExitReason) -> None:
        """Release resources; runs once on every exit path (stop, crash, failed start)."""

    def on_undelivered(self, message: Any) -> None:
        """A message that was still in the inbox when the actor exited (never handled).
        Actors that owe an answer for some messages give it here."""

    # --- API for subclasses -----------------------------------------------------------------

    def report_ready(self) -> None:
        """Report the readiness handshake (once); for `deferred_ready` actors."""
        if not self._ready_reported and not self._exited:
            self._ready_reported = True
            self.context.notify(ChildReady(self.context.child_id, self.context.generation))

    def send_after(self, delay: float, message: Any) -> Timer:
        """Tell this actor `message` after `delay` seconds of the context's clock (Erlang's
        `erlang:send_after`). The timer is cancelled when the actor exits."""
        return self._new_actor_timer(delay, message, repeat=False)

    def send_every(self, interval: float, message: Any) -> Timer:
        """Tell this actor `message` every `interval` seconds of the context's clock, the
        first after one interval (Erlang's `timer:send_interval`), until cancelled or the
        actor exits."""
        if interval <= 0:
            msg = f"send_every needs a positive interval, got {interval!r}"
            raise ValueError(msg)
        return self._new_actor_timer(interval, message, repeat=True)

    def _new_actor_timer(self, delay: float, message: Any, repeat: bool) -> Timer:
        timer = _ActorTimer(self, delay, message, repeat)
        with self._send_timers_lock:
            if self._exited:
                timer.cancelled = True
                return timer
            self._send_timers.add(timer)
        timer.arm()
        return timer

    def _forget_timer(self, timer: _ActorTimer) -> None:
        with self._send_timers_lock:
            self._send_timers.discard(timer)

    def exit(self, reason: ExitReason) -> None:
        """End this actor from inside its own thread with `reason` (e.g. `Normal()`)."""
        self._supervised_finish(reason)

    # --- pykka plumbing ---------------------------------------------------------------------

    def on_start(self) -> None:
        try:
            self.on_start_up()
            self._started_up()
        except BaseException as exc:  # noqa: BLE001
            self.log.error("start-up failed", error=f"{type(exc).__name__}: {exc}")
            self._supervised_finish(StartFailed(cause=f"{type(exc).__name__}: {exc}"))
            return
        if not self.deferred_ready:
            self.report_ready()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, StopRequest):
            return self.on_stop_request(message)
        try:
            if isinstance(message, Suspend):  # a fault hook: stop answering for a while
                self._suspend(message.seconds)
                return None
            if isinstance(message, InjectCrash):  # a fault hook: crash right here
                raise InjectedFaultError(message.detail)
            return self.handle(message)
        except BaseException as exc:
            reason = crash_reason(exc)
            self.log.error(
                "actor crashed", error=reason.describe(), message_type=type(message).__name__
            )
            self._supervised_finish(reason)
            if isinstance(exc, Exception):
                raise  # to an ask caller; pykka only logs it for a tell
            raise ActorCrashed(reason.describe()) from exc

    def _started_up(self) -> None:
        """Runtime hook: `on_start_up` returned, the actor is not yet reported ready."""

    def _suspend(self, seconds: float) -> None:
        """Runtime hook for the `Suspend` fault: answer nothing for `seconds`."""
        time.sleep(seconds)

    def on_stop_request(self, request: StopRequest) -> None:
        """The supervisor asks this actor to stop: graceful hook, cleanup, exit notice."""
        try:
            if not request.brutal:
                self.on_shutdown(request)
        except BaseException as exc:  # noqa: BLE001
            self.log.error("graceful stop failed", error=f"{type(exc).__name__}: {exc}")
            self._supervised_finish(crash_reason(exc))
            return
        self._supervised_finish(Shutdown(detail=request.reason))

    def on_stop(self) -> None:
        # Only reached through pykka's own stop (ActorRef.stop, ActorRegistry.stop_all).
        self._supervised_finish(Shutdown(detail="pykka stop"))

    def on_failure(self, *_exc_info: Any) -> None:
        # Already reported by on_receive; pykka calls this after logging a tell's exception.
        pass

    def _supervised_finish(self, reason: ExitReason) -> None:
        with self._exit_lock:
            if self._exited:
                return
            self._exited = True
        with self._send_timers_lock:
            timers, self._send_timers = self._send_timers, set()
        for timer in timers:
            timer.cancel()
        try:
            self.on_exit(reason)
        except BaseException as exc:  # noqa: BLE001
            self.log.error("cleanup failed", error=f"{type(exc).__name__}: {exc}")
        # Leave the receive loop without taking another message; from now on a tell to
        # this actor fails at the sender (ActorDeadError).
        pykka.ActorRegistry.unregister(self.actor_ref)
        self._exit_reason = reason
        self.actor_stopped.set()
        self._answer_undelivered()
        self.context.notify(ChildExited(self.context.child_id, self.context.generation, reason))

    def _answer_undelivered(self) -> None:
        """What is in the inbox of an exited actor is never handled: let the actor answer
        for it (a message that raced its exit comes here too, on a loop-hosted actor)."""
        reason = self._exit_reason
        while not self.actor_inbox.empty():
            envelope = self.actor_inbox.get()
            try:
                self.on_undelivered(envelope.message)
            except Exception as exc:  # noqa: BLE001
                self.log.error(
                    "undelivered message hook failed", error=f"{type(exc).__name__}: {exc}"
                )
            # An ask still waiting for this message fails now, not at its timeout (a
            # sibling asking during its start-up would otherwise outlive its own stop).
            if envelope.reply_to is not None:
                dead = pykka.ActorDeadError(f"{self.actor_ref} exited: {reason.describe()}")
                with contextlib.suppress(queue.Full):  # answered already
                    envelope.reply_to.set_exception((type(dead), dead, None))


class _ActorTimer:
    """A `send_after` / `send_every` timer of one actor (see those methods)."""

    def __init__(self, actor: SupervisedActor, delay: float, message: Any, repeat: bool) -> None:
        self._actor = actor
        self._ref = actor.actor_ref
        self._delay = delay
        self._message = message
        self._repeat = repeat
        self._pending: Timer | None = None
        self._lock = threading.Lock()
        self.cancelled = False

    def arm(self) -> None:
        with self._lock:
            if not self.cancelled:
                self._pending = self._actor.context.clock.call_later(self._delay, self._fire)

    def _fire(self) -> None:
        if self.cancelled:
            return
        try:
            self._ref.tell(self._message)
        except pykka.ActorDeadError:
            self.cancel()
            return
        if self._repeat:
            self.arm()
        else:
            self._actor._forget_timer(self)

    def cancel(self) -> None:
        """Drop the timer (idempotent); a message already told stays in the inbox."""
        with self._lock:
            self.cancelled = True
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._actor._forget_timer(self)
