"""`Supervisor`: starts, watches, restarts and stops children by OTP rules.

A supervisor never blocks its own thread: starting and stopping children are steps of
a plan, each finished by a notice from the child (`ChildReady`, `ChildExited`) or by one
of its own timers (`TimerFired`). So a child that hangs in start-up or in stop cannot
hang its supervisor, which can always be asked to stop. What to do (which children to
restart, whether the intensity is exceeded, how long to back off, whether a significant
exit ends the supervisor) is decided by the pure functions of `_decisions`.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pykka

from supervisor.core import _names
from supervisor.core._actor import ChildContext, SupervisedActor, crash_reason
from supervisor.core._clock import Timer
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
    RestartIntensityExceededEvent,
    SupervisionEvent,
    SupervisorStopped,
)
from supervisor.core._process import ProcessChild
from supervisor.core._protocol import (
    AddChild,
    ChildExited,
    ChildInfo,
    ChildReady,
    ExitReason,
    Killed,
    RemoveChild,
    RestartIntensityExceeded,
    Shutdown,
    StartFailed,
    StartTimeout,
    StopRequest,
    TimerFired,
    WhichChildren,
)
from supervisor.core._spec import ActorStart, ChildSpec, SupervisorFlags, validate_supervisor

__all__ = ["Supervisor"]

State = Literal["starting", "running", "stopping", "restarting", "stopped"]
_ALIVE = ("starting", "running", "stopping")
# A brutally stopped actor gets this long to leave before it is abandoned.
_BRUTAL_ACTOR_GRACE = 1.0
_ASK_TIMEOUT = 2.0


@dataclass
class _Child:
    spec: ChildSpec
    state: State = "stopped"
    generation: int = -1
    restarts: int = 0
    last_exit: ExitReason | None = None
    ready_at: float | None = None
    actor: pykka.ActorRef[Any] | None = None
    process: ProcessChild | None = None
    backoff: BackoffState = field(default_factory=BackoffState)
    timer: Timer | None = None  # start or shutdown timeout of the current incarnation
    handover: dict[str, Any] = field(default_factory=dict)  # kept across restarts


@dataclass(frozen=True)
class _StartStep:
    child_id: str
    initial: bool


@dataclass(frozen=True)
class _StopStep:
    child_ids: tuple[str, ...]
    reason: str
    brutal: bool = False
    remove: bool = False


@dataclass(frozen=True)
class _RestartStep:
    """Arms the backoff timer; when it fires, the children's starts join the plan."""

    child_ids: tuple[str, ...]
    failed: str
    delay: float


@dataclass(frozen=True)
class _ReadyStep:
    """All initial children are ready: the supervisor itself is ready."""


@dataclass(frozen=True)
class _FinishStep:
    reason: ExitReason


_Step = _StartStep | _StopStep | _RestartStep | _ReadyStep | _FinishStep


class Supervisor(SupervisedActor):
    """A supervisor actor; itself a child of another supervisor or of the root."""

    deferred_ready = True
    is_supervisor = True  # what `ChildSpec.kind` reads

    def __init__(
        self,
        context: ChildContext,
        flags: SupervisorFlags,
        children: Sequence[ChildSpec],
        pool_size: int = 0,
    ) -> None:
        super().__init__(context)
        self.flags = flags
        self.specs = tuple(children)
        self.pool_size = pool_size
        self.phase: Literal["starting", "running", "stopping"] = "starting"
        self._children: list[_Child] = []
        self._plan: deque[_Step] = deque()
        self._current: _Step | None = None
        self._restart_times: tuple[float, ...] = ()
        self._timers: dict[int, tuple[str, Any]] = {}
        self._timer_handles: dict[int, Timer] = {}
        self._tokens = itertools.count(1)
        self._pool_ids = itertools.count(1)
        self._random = random.Random()

    # --- start-up ---------------------------------------------------------------------------

    def on_start_up(self) -> None:
        validate_supervisor(self.flags, self.specs)
        if self.flags.strategy == "pool":
            for _ in range(self.pool_size):
                self._children.append(self._new_pool_child())
        else:
            self._children = [self._new_child(spec) for spec in self.specs]
        for child in self._children:
            self._plan.append(_StartStep(child.spec.id, initial=True))
        self._plan.append(_ReadyStep())
        self._advance()

    def _new_pool_child(self) -> _Child:
        template = self.specs[0]
        spec = ChildSpec(
            id=f"{template.id}-{next(self._pool_ids)}",
            start=template.start,
            restart=template.restart,
            shutdown=template.shutdown,
            significant=template.significant,
            start_timeout=template.start_timeout,
        )
        return self._new_child(spec)

    def _new_child(self, spec: ChildSpec) -> _Child:
        # What a child hands over is kept in this supervisor's own handover, which its
        # parent keeps: so it also outlives a restart of this supervisor (a rest_for_one
        # sibling's crash restarting the subtree it is in), as an ETS table whose heir is
        # the grandparent.
        kept = self.context.handover.setdefault("children", {})
        return _Child(spec, handover=kept.setdefault(spec.id, {}))

    def _forget(self, child_ids: Any) -> None:
        """Children removed for good: what they handed over goes with them."""
        kept = self.context.handover.get("children", {})
        for child_id in child_ids:
            kept.pop(child_id, None)

    # --- messages -------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case ChildReady():
                self._on_ready(message)
            case ChildExited():
                self._on_exited(message)
            case TimerFired(token=token):
                self._on_timer(token)
            case WhichChildren(recursive=recursive):
                return self._which_children(recursive)
            case AddChild():
                return self._add_pool_child()
            case RemoveChild(child_id=child_id):
                self._remove_pool_child(child_id)
            case _:
                return super().handle(message)
        return None

    def on_stop_request(self, request: StopRequest) -> None:
        self._shutdown(Shutdown(detail=request.reason), brutal=request.brutal)

    def on_exit(self, reason: ExitReason) -> None:
        # Normally every child is stopped by now. If the supervisor itself failed, it must
        # not leave children behind: kill processes, tell actors to leave at once.
        for child in self._children:
            if child.state in _ALIVE:
                if child.process is not None:
                    child.process.kill("supervisor exited")
                elif child.actor is not None:
                    child.actor.tell(StopRequest(reason="supervisor exited", brutal=True))
        for handle in self._timer_handles.values():
            handle.cancel()

    # --- the plan ---------------------------------------------------------------------------

    def _advance(self) -> None:
        while self._current is None and self._plan and not self._exited:
            step = self._plan.popleft()
            self._current = step
            self._begin(step)

    def _complete(self, step: _Step) -> None:
        if self._current is step:
            self._current = None
            self._advance()

    def _begin(self, step: _Step) -> None:
        match step:
            case _StartStep():
                self._begin_start(step)
            case _StopStep():
                self._begin_stop(step)
            case _RestartStep():
                self._arm(step.delay, "restart", step)
                self._current = None
            case _ReadyStep():
                self.phase = "running"
                self.log.info("supervisor ready", children=len(self._children))
                self.report_ready()
                self._current = None
            case _FinishStep(reason=reason):
                self._emit(SupervisorStopped, reason=reason)
                self.log.info("supervisor stopped", reason=reason.describe())
                self.exit(reason)

    def _begin_start(self, step: _StartStep) -> None:
        child = self._find(step.child_id)
        if child is None or child.state not in ("stopped", "restarting"):
            self._current = None
            return
        spec = child.spec
        child.generation += 1
        child.state = "starting"
        child.ready_at = None
        path = f"{self.context.path}/{spec.id}"
        context = ChildContext(
            child_id=spec.id,
            generation=child.generation,
            path=path,
            notify=self._notify,
            bus=self.context.bus,
            clock=self.context.clock,
            handover=child.handover,
        )
        child.timer = self._arm(spec.start_timeout, "start_timeout", (spec.id, child.generation))
        try:
            if isinstance(spec.start, ActorStart):
                start = spec.start
                child.actor = start.actor_class.start(context, *start.args, **dict(start.kwargs))
                _names.register(path, child.actor)
            else:
                child.process = ProcessChild(
                    spec.start, spec.id, child.generation, path, self._notify
                )
                child.process.start()
        except Exception as exc:  # a constructor or exec failure  # noqa: BLE001
            self._record_exit(child, StartFailed(cause=crash_reason(exc).describe()))
            self._after_start_failure(child)
            return
        self._emit(ChildStarted, child_id=spec.id, generation=child.generation, kind=spec.kind)

    def _begin_stop(self, step: _StopStep) -> None:
        pending = False
        for child_id in step.child_ids:
            child = self._find(child_id)
            if child is None:
                continue
            if child.state == "restarting":
                child.state = "stopped"
            elif child.state in ("starting", "running"):
                self._send_stop(child, step.reason, step.brutal)
                pending = True
            elif child.state == "stopping":
                if step.brutal:  # a brutal stop overtakes a graceful one in progress
                    self._send_stop(child, step.reason, brutal=True)
                pending = True
        if not pending:
            self._finish_stop_step(step)

    def _send_stop(self, child: _Child, reason: str, brutal: bool) -> None:
        self._cancel(child)
        child.state = "stopping"
        shutdown = "brutal" if brutal else child.spec.effective_shutdown
        key = (child.spec.id, child.generation)
        if child.process is not None:
            if shutdown == "brutal":
                child.process.kill("brutal shutdown")
                return
            child.process.terminate()
        elif child.actor is not None:
            request = StopRequest(reason=reason, brutal=shutdown == "brutal")
            try:
                child.actor.tell(request)
            except pykka.ActorDeadError:
                pass  # its exit notice is already on the way
            if shutdown == "brutal":
                child.timer = self._arm(_BRUTAL_ACTOR_GRACE, "shutdown_timeout", key)
                return
        if shutdown != "infinity":
            assert isinstance(shutdown, int | float)
            child.timer = self._arm(float(shutdown), "shutdown_timeout", key)

    def _finish_stop_step(self, step: _StopStep) -> None:
        if step.remove:
            self._children = [c for c in self._children if c.spec.id not in step.child_ids]
            self._forget(step.child_ids)
        self._complete(step)

    # --- notices from children ---------------------------------------------------------------

    def _notify(self, message: ChildReady | ChildExited) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass  # the supervisor is gone; its own exit already dealt with the child

    def _on_ready(self, message: ChildReady) -> None:
        child = self._find(message.child_id)
        if child is None or child.generation != message.generation or child.state != "starting":
            return
        self._cancel(child)
        child.state = "running"
        child.ready_at = self.context.clock.now()
        self._emit(ChildReadyEvent, child_id=child.spec.id, generation=child.generation)
        current = self._current
        if isinstance(current, _StartStep) and current.child_id == child.spec.id:
            self._complete(current)

    def _on_exited(self, message: ChildExited) -> None:
        child = self._find(message.child_id)
        if child is None or child.generation != message.generation or child.state not in _ALIVE:
            return  # a stale notice from an incarnation already dealt with
        previous = child.state
        self._record_exit(child, message.reason)
        if previous == "starting":
            self._after_start_failure(child)
        elif previous == "stopping":
            self._stop_progress()
        else:
            self._after_unexpected_exit(child, message.reason)
            self._advance()

    def _record_exit(self, child: _Child, reason: ExitReason) -> None:
        self._cancel(child)
        if child.state == "starting" and not isinstance(reason, StartFailed | StartTimeout):
            reason = StartFailed(cause=reason.describe())
        child.state = "stopped"
        child.last_exit = reason
        child.actor = None
        child.process = None
        _names.unregister(f"{self.context.path}/{child.spec.id}")
        self._emit(
            ChildExitedEvent, child_id=child.spec.id, generation=child.generation, reason=reason
        )
        level = "info" if isinstance(reason, Shutdown) else "warning"
        getattr(self.log, level)(
            "child exited",
            child=child.spec.id,
            child_generation=child.generation,
            reason=reason.describe(),
        )

    def _after_start_failure(self, child: _Child) -> None:
        current = self._current
        initial = False
        if isinstance(current, _StartStep) and current.child_id == child.spec.id:
            initial = current.initial
            self._current = None
        if self.phase == "stopping":
            self._advance()
            return
        assert child.last_exit is not None
        if initial:
            cause = f"child {child.spec.id!r}: {child.last_exit.describe()}"
            self._shutdown(StartFailed(cause=cause))
            return
        self._after_unexpected_exit(child, child.last_exit)
        self._advance()

    def _stop_progress(self) -> None:
        current = self._current
        if not isinstance(current, _StopStep):
            return
        for child_id in current.child_ids:
            child = self._find(child_id)
            if child is not None and child.state == "stopping":
                return
        self._finish_stop_step(current)

    # --- restart decisions ---------------------------------------------------------------

    def _after_unexpected_exit(self, child: _Child, reason: ExitReason) -> None:
        if self.phase == "stopping":
            return
        spec = child.spec
        restart = should_restart(spec.restart, reason)
        if not restart:
            if spec.restart == "temporary" or self.flags.strategy == "pool":
                self._children.remove(child)
                self._forget([spec.id])
            if spec.significant:
                alive = sum(1 for c in self._children if c.spec.significant and c.state in _ALIVE)
                if auto_shutdown_due(self.flags.auto_shutdown, True, alive):
                    detail = f"auto_shutdown ({self.flags.auto_shutdown}): {spec.id} exited"
                    self._shutdown(Shutdown(detail=detail))
            return
        now = self.context.clock.now()
        self._restart_times = add_restart(self._restart_times, now, self.flags.period)
        if intensity_exceeded(self._restart_times, self.flags.intensity):
            self._escalate(child, reason)
            return
        order = [c.spec.id for c in self._children]
        ids = children_to_restart(self.flags.strategy, order, spec.id)
        for sibling in reversed(ids):
            if sibling != spec.id:
                why = f"{self.flags.strategy} restart after {spec.id} exited"
                self._plan.append(_StopStep((sibling,), reason=why))
        delay, child.backoff = next_backoff(
            child.backoff, now, self.flags.backoff, self._random.random()
        )
        child.state = "restarting"
        for child_id in ids:
            target = self._find(child_id)
            if target is None or (child_id != spec.id and target.spec.restart == "temporary"):
                continue
            self._emit(
                ChildRestarted,
                child_id=child_id,
                generation=target.generation + 1,
                delay=delay,
                cause=f"{spec.id} exited: {reason.describe()}",
            )
        self._plan.append(_RestartStep(tuple(ids), failed=spec.id, delay=delay))

    def _escalate(self, child: _Child, reason: ExitReason) -> None:
        restarts = len(self._restart_times)
        self._emit(
            RestartIntensityExceededEvent,
            child_id=child.spec.id,
            restarts=restarts,
            period=self.flags.period,
        )
        self.log.error(
            "restart intensity exceeded",
            child=child.spec.id,
            restarts=restarts,
            intensity=self.flags.intensity,
            period=self.flags.period,
            last_reason=reason.describe(),
        )
        self._shutdown(
            RestartIntensityExceeded(
                supervisor=self.context.path,
                child=child.spec.id,
                restarts=restarts,
                period=self.flags.period,
                last_reason=reason.describe(),
            )
        )

    def _restart_due(self, step: _RestartStep) -> None:
        if self.phase == "stopping":
            return
        for child_id in step.child_ids:
            child = self._find(child_id)
            if child is None or child.state not in ("stopped", "restarting"):
                continue
            if child_id != step.failed and child.spec.restart == "temporary":
                self._children.remove(child)  # OTP: temporary siblings are not restarted
                self._forget([child_id])
                continue
            child.state = "restarting"
            child.restarts += 1
            self._plan.append(_StartStep(child_id, initial=False))
        self._advance()

    # --- stopping everything --------------------------------------------------------------

    def _shutdown(self, reason: ExitReason, brutal: bool = False) -> None:
        """Stop every child in reverse start order (a pool: all at once), then exit."""
        if self.phase == "stopping" and not brutal:
            return
        self.phase = "stopping"
        for token, (kind, _data) in list(self._timers.items()):
            if kind == "restart":
                self._disarm(token)
        if isinstance(self._current, _FinishStep):
            return
        self._plan.clear()
        self._current = None
        alive = [c.spec.id for c in self._children if c.state in _ALIVE]
        why = (
            reason.describe() if not isinstance(reason, Shutdown) else (reason.detail or "shutdown")
        )
        if self.flags.strategy == "pool":
            self._plan.append(_StopStep(tuple(alive), reason=why, brutal=brutal))
        else:
            for child_id in reversed(alive):
                self._plan.append(_StopStep((child_id,), reason=why, brutal=brutal))
        self._plan.append(_FinishStep(reason))
        self._advance()

    # --- timers --------------------------------------------------------------------------

    def _arm(self, delay: float, kind: str, data: Any) -> Timer:
        token = next(self._tokens)
        self._timers[token] = (kind, data)
        ref = self.actor_ref

        def fire() -> None:
            try:
                ref.tell(TimerFired(token))
            except pykka.ActorDeadError:
                pass

        handle = self.context.clock.call_later(delay, fire)
        self._timer_handles[token] = handle
        return _TokenTimer(self, token)

    def _disarm(self, token: int) -> None:
        self._timers.pop(token, None)
        handle = self._timer_handles.pop(token, None)
        if handle is not None:
            handle.cancel()

    def _cancel(self, child: _Child) -> None:
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None

    def _on_timer(self, token: int) -> None:
        entry = self._timers.pop(token, None)
        self._timer_handles.pop(token, None)
        if entry is None:
            return
        kind, data = entry
        if kind == "restart":
            self._restart_due(data)
            return
        child_id, generation = data
        child = self._find(child_id)
        if child is None or child.generation != generation:
            return
        child.timer = None
        if kind == "start_timeout" and child.state == "starting":
            self.log.warning(
                "child start timed out", child=child_id, timeout=child.spec.start_timeout
            )
            self._abandon(child, "start timeout")
            self._record_exit(child, StartTimeout(timeout=child.spec.start_timeout))
            self._after_start_failure(child)
        elif kind == "shutdown_timeout" and child.state == "stopping":
            if child.process is not None:
                # SIGKILL the group; the exit notice follows at once.
                self.log.warning("child did not stop in time; killing", child=child_id)
                child.process.kill()
                return
            self.log.warning("actor did not stop in time; abandoning its thread", child=child_id)
            self._record_exit(child, Killed(detail="did not stop within its shutdown timeout"))
            self._stop_progress()

    def _abandon(self, child: _Child, why: str) -> None:
        if child.process is not None:
            child.process.kill(why)
        elif child.actor is not None:
            try:
                child.actor.tell(StopRequest(reason=why, brutal=True))
            except pykka.ActorDeadError:
                pass

    # --- pool ------------------------------------------------------------------------------

    def _add_pool_child(self) -> str:
        if self.flags.strategy != "pool":
            msg = f"{self.context.path} is not a pool supervisor"
            raise ValueError(msg)
        if self.phase == "stopping":
            msg = f"{self.context.path} is stopping"
            raise RuntimeError(msg)
        child = self._new_pool_child()
        self._children.append(child)
        self._plan.append(_StartStep(child.spec.id, initial=False))
        self._advance()
        return child.spec.id

    def _remove_pool_child(self, child_id: str) -> None:
        if self._find(child_id) is None:
            msg = f"{self.context.path} has no child {child_id!r}"
            raise KeyError(msg)
        self._plan.append(_StopStep((child_id,), reason="removed from the pool", remove=True))
        self._advance()

    # --- introspection ----------------------------------------------------------------------

    def _which_children(self, recursive: bool) -> tuple[ChildInfo, ...]:
        now = self.context.clock.now()
        rows = []
        for child in self._children:
            grandchildren: tuple[ChildInfo, ...] = ()
            if recursive and child.spec.kind == "supervisor" and child.actor is not None:
                try:
                    grandchildren = cast(
                        tuple[ChildInfo, ...],
                        child.actor.ask(WhichChildren(True), timeout=_ASK_TIMEOUT),
                    )
                except Exception:  # noqa: BLE001
                    grandchildren = ()
            rows.append(
                ChildInfo(
                    id=child.spec.id,
                    kind=child.spec.kind,
                    state=child.state,
                    generation=max(child.generation, 0),
                    restarts=child.restarts,
                    last_exit=child.last_exit.describe() if child.last_exit else None,
                    uptime=round(now - child.ready_at, 3) if child.ready_at is not None else None,
                    pid=child.process.pid if child.process is not None else None,
                    children=grandchildren,
                )
            )
        return tuple(rows)

    # --- helpers -------------------------------------------------------------------------

    def _find(self, child_id: str) -> _Child | None:
        for child in self._children:
            if child.spec.id == child_id:
                return child
        return None

    def _emit(self, event_type: type[SupervisionEvent], **fields: Any) -> None:
        event = event_type(supervisor=self.context.path, at=self.context.clock.now(), **fields)
        self.context.bus.publish(event)


class _TokenTimer:
    """A child's timer as the supervisor tracks it: cancelling also forgets the token."""

    def __init__(self, supervisor: Supervisor, token: int) -> None:
        self._supervisor = supervisor
        self._token = token

    def cancel(self) -> None:
        self._supervisor._disarm(self._token)
