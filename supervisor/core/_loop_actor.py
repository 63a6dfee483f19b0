"""`LoopActor`: a supervised actor whose messages are handled on an asyncio event loop
it shares, instead of on a thread of its own.

A thread per actor costs a thread wake-up (a futex, a GIL hand-off: ~0.1 ms of CPU on a
small machine) for every message that crosses into it. An actor whose messages mostly
come from code running on one event loop (a network connection's callbacks, a socket
reader) saves that: a tell from the loop's own thread is a `call_soon`, no wake-up at
all, and a tell from another thread costs one `call_soon_threadsafe`. As Erlang runs
many processes on one scheduler, several such actors may share a loop; each still has its
own inbox, is handled one message at a time, and crashes, stops and restarts alone, with
every semantic of `SupervisedActor` (exit reasons, timers, undelivered answers, faults).

The price: while one of them handles a message, nothing else on that loop runs. So a
loop-hosted actor must never block in `handle`: no `ask`, no sleep, no blocking I/O;
work that waits is started as a task on the loop (`spawn`) whose end comes back as a
message; a message handled for longer than `SLOW_MESSAGE` is logged as having held up
the loop. `on_start_up` is the exception: it runs on a short-lived thread of its own, so
it may block (asks, subscriptions) as any actor's start-up does; the actor then attaches
to the loop its `loop_host()` names and is reported ready. The `Suspend` fault parks the
inbox instead of sleeping, so only this actor stops answering. If the loop ends while the
actor lives (its owner closed it), the actor exits with a crash saying so.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import pykka
import structlog
from pykka._envelope import Envelope

from supervisor.core._actor import SupervisedActor, crash_reason
from supervisor.core._protocol import Crash

__all__ = ["SLOW_MESSAGE", "LoopActor", "LoopHost", "LoopThread"]

# A message handled for longer than this held up every other actor and reader on the loop:
# it is logged (a loop-hosted actor must not block in `handle`).
SLOW_MESSAGE = 0.1

_get_running_loop = asyncio._get_running_loop  # the cheap "which loop runs here"


class LoopHost(Protocol):
    """What owns the event loop a `LoopActor` runs on."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (running on a thread of the host's)."""
        ...

    def when_loop_ends(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (on any thread) once the loop has stopped for good, at once if
        it already has; returns a function that takes the request back."""
        ...


class LoopThread:
    """An event loop running on a daemon thread of its own: a `LoopHost` for actors or
    readers that have no other loop to share, and the loop of the node's NATS link."""

    def __init__(self, name: str, start: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._ended = False
        self._at_end: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the loop's thread (when made with `start=False`)."""
        self._thread.start()

    @property
    def ended(self) -> bool:
        """Whether the loop has stopped for good (its end callbacks run, or ran)."""
        return self._ended

    @property
    def on_loop(self) -> bool:
        """Whether the caller runs on the loop's thread."""
        return threading.get_ident() == self._thread.ident

    @property
    def running(self) -> bool:
        """Whether the loop's thread was started and has not ended."""
        return self._thread.is_alive()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with self._lock:
                self._ended = True
                callbacks, self._at_end = self._at_end, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - one failing must not keep the others from running
                    structlog.get_logger().exception("loop-end callback failed")

    def when_loop_ends(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See `LoopHost.when_loop_ends`."""
        with self._lock:
            ended = self._ended
            if not ended:
                self._at_end.append(callback)
        if ended:
            callback()

        def forget() -> None:
            with self._lock:
                if callback in self._at_end:
                    self._at_end.remove(callback)

        return forget

    def stop(self, timeout: float = 2.0, close: bool = True) -> None:
        """Stop the loop (what it hosts is told by `when_loop_ends`) and, unless `close` is
        false, close it."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if close and not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class _LoopInbox:
    """A loop-hosted actor's inbox: a deque, and one scheduled turn of the loop to drain
    it at a time (none while the actor is not yet attached, or is parked)."""

    def __init__(self) -> None:
        self.queue: collections.deque[Envelope[Any]] = collections.deque()
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.run: Callable[[], None] = _nothing
        self.scheduled = False
        self.parked = False

    def put(self, envelope: Envelope[Any], /) -> None:
        with self.lock:
            self.queue.append(envelope)
            if self.scheduled or self.parked or self.loop is None:
                return
            self.scheduled = True
            loop = self.loop
        if _get_running_loop() is loop:
            loop.call_soon(self.run)
        else:
            try:
                loop.call_soon_threadsafe(self.run)
            except RuntimeError:  # the loop is closed: the actor's end follows (loop_ended)
                pass

    def get(self) -> Envelope[Any]:
        return self.queue.popleft()

    def empty(self) -> bool:
        return not self.queue


def _nothing() -> None:
    pass


class LoopActor(SupervisedActor):
    """A `SupervisedActor` handled on a shared event loop (see the module docstring).
    Subclasses implement `loop_host()`, called once `on_start_up` returned."""

    actor_inbox: _LoopInbox
    _held_up_said = -1.0  # when a held-up loop was last logged

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _LoopInbox()

    def loop_host(self) -> LoopHost:
        """The owner of the loop this actor is to run on (asked after `on_start_up`)."""
        msg = f"{type(self).__name__} does not name its loop_host"
        raise NotImplementedError(msg)

    # --- runtime: start on a thread, then attach to the loop ---------------------------------

    def _start_actor_loop(self) -> None:
        name = f"{type(self).__name__}-start"
        threading.Thread(target=self._start_up_thread, name=name, daemon=True).start()

    def _start_up_thread(self) -> None:
        self._actor_loop_setup()  # pykka's: on_start, which runs on_start_up
        if self.actor_stopped.is_set():
            self._answer_undelivered()

    def _started_up(self) -> None:
        host = self.loop_host()
        loop = host.loop
        if loop.is_closed() or not loop.is_running():
            msg = "the event loop it is to run on does not run (its owner stopped)"
            raise RuntimeError(msg)
        inbox = self.actor_inbox
        inbox.run = self._run_inbox
        with inbox.lock:
            inbox.loop = loop
            inbox.scheduled = True  # what came during the start-up is handled first
        loop.call_soon_threadsafe(self._run_inbox)
        self._forget_host = host.when_loop_ends(self._loop_ended)  # at once if it just did

    def _loop_ended(self) -> None:
        detail = "the event loop it runs on ended (its owner stopped) while it still ran"
        self._supervised_finish(Crash(error_type="LoopEnded", message=detail, traceback=""))

    # --- runtime: the inbox, drained on the loop -------------------------------------------

    def _run_inbox(self) -> None:
        inbox = self.actor_inbox
        with inbox.lock:
            inbox.scheduled = False
            count = len(inbox.queue)  # what came meanwhile waits for the next turn
        for _ in range(count):
            if self.actor_stopped.is_set():
                self._answer_undelivered()  # tells that raced the exit
                return
            if inbox.parked:
                return
            try:
                envelope = inbox.queue.popleft()
            except IndexError:
                return
            self._receive(envelope)

    def _receive(self, envelope: Envelope[Any]) -> None:
        started = time.perf_counter()
        try:
            response = self._handle_receive(envelope.message)
        except BaseException as exc:  # noqa: BLE001 - on_receive crashed the actor already
            if not self.actor_stopped.is_set():
                self._supervised_finish(crash_reason(exc))
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception((type(exc), exc, exc.__traceback__))
            return
        finally:
            took = time.perf_counter() - started
            if took > SLOW_MESSAGE:
                self._held_up(envelope.message, took)
        if envelope.reply_to is not None:
            envelope.reply_to.set(response)

    def _held_up(self, message: Any, seconds: float) -> None:
        """Say that a message kept the loop from everything else (at most once a second
        per actor): the one failure mode a loop-hosted actor adds, a `handle` that blocks."""
        now = time.monotonic()
        if now - self._held_up_said < 1.0:
            return
        self._held_up_said = now
        self.log.warning(
            "a message held up the event loop this actor shares",
            message_type=type(message).__name__,
            seconds=round(seconds, 3),
        )

    def _suspend(self, seconds: float) -> None:
        inbox = self.actor_inbox
        loop = inbox.loop
        assert loop is not None
        with inbox.lock:
            inbox.parked = True

        def unpark() -> None:
            with inbox.lock:
                inbox.parked = False
                inbox.scheduled = True
            self._run_inbox()

        loop.call_later(seconds, unpark)

    def _supervised_finish(self, reason: Any) -> None:
        forget = getattr(self, "_forget_host", None)
        if forget is not None:
            forget()
        super()._supervised_finish(reason)

    # --- API for subclasses ------------------------------------------------------------------

    def spawn(
        self, work: Coroutine[Any, Any, Any], then: Callable[[Any], Any] | None = None
    ) -> asyncio.Task[Any]:
        """Run `work` as a task on the actor's loop; when it ends, `then(result)` is told to
        the actor as a message (if `then` is given and the actor still runs). An exception
        in `work` crashes the actor, as one in `handle` would."""
        loop = self.actor_inbox.loop
        assert loop is not None, "spawn before the actor runs on its loop"
        task = loop.create_task(work)
        ref = self.actor_ref

        def done(finished: asyncio.Task[Any]) -> None:
            if finished.cancelled() or self.actor_stopped.is_set():
                return
            exc = finished.exception()
            if exc is not None:
                self.log.error("actor crashed", error=f"{type(exc).__name__}: {exc}", task=True)
                self._supervised_finish(crash_reason(exc))
            elif then is not None:
                try:
                    ref.tell(then(finished.result()))
                except pykka.ActorDeadError:
                    pass

        task.add_done_callback(done)
        return task
