"""`NatsLink`: the node's one NATS connection, usable from any thread.

nats-py is asyncio; actors are threads. The link runs the connection on its own event
loop thread and offers thread-safe calls: `publish` (non-blocking, ordered: one FIFO
drained by one task), `subscribe` (callbacks run on the loop thread, so they must only
hand the message to an actor), and `call` (run a coroutine, wait for its result).

While disconnected, the link holds publishes (up to `pending_size` bytes) and sends them
`resume_delay` seconds after the reconnect, when clients that lost the server too have
re-subscribed; beyond the buffer a publish is dropped, counted in `dropped`, and logged:
nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import OutboundBufferLimitError

from actors.streams.direct import DirectSender
from supervisor.core import LoopThread

__all__ = ["LinkEvent", "NatsLink"]

T = TypeVar("T")
LinkEvent = str  # "disconnected" | "reconnected" | "closed"
MessageCallback = Callable[[str, str, bytes], None]  # subject, reply, data


class NatsLink:
    """A NATS connection on a private event loop thread (see the module docstring)."""

    def __init__(
        self,
        servers: list[str],
        name: str,
        connect_timeout: float = 10.0,
        pending_size: int = 8 * 1024 * 1024,
        connect_options: dict[str, Any] | None = None,
        resume_delay: float = 1.0,
    ) -> None:
        self.servers = servers
        self.name = name
        self.connect_timeout = connect_timeout
        self.pending_size = pending_size
        self.connect_options = connect_options or {}
        self.resume_delay = resume_delay
        self.log = structlog.get_logger().bind(path=f"nats:{name}")
        self.nc: Client | None = None
        self.published = 0
        self.dropped = 0
        self.reconnects = 0
        self.connected = threading.Event()
        self._queue: collections.deque[tuple[str, bytes, str]] = collections.deque()
        self._drain_scheduled = False
        self._flowing = False  # connected, and past the resume delay after a reconnect
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[LinkEvent], None]] = []
        self._closed = False
        self._calls: set[concurrent.futures.Future[Any]] = set()  # calls waiting on the loop
        # the loop's thread (started by connect); its end fails the calls still waiting
        self._host = LoopThread(f"nats-{name}", start=False)
        self.loop = self._host.loop
        self.when_loop_ends = self._host.when_loop_ends
        self.when_loop_ends(self._fail_calls)
        self._unsubscribing: set[asyncio.Task[None]] = set()
        # chunks sent straight to frontends that ask (from the loop: the handlers')
        self.direct = DirectSender(self.loop, lambda: self._host.on_loop, self.log)

    # --- life cycle -------------------------------------------------------------------------

    def connect(self) -> None:
        """Start the loop thread and connect; raises if the servers cannot be reached."""
        self._host.start()
        self.call(self._connect, timeout=self.connect_timeout + 5)

    def _fail_calls(self) -> None:
        """The loop ended: calls waiting for it fail now (`when_loop_ends` also lets actors
        hosted on the loop, `LoopActor`s, exit instead of waiting for ever)."""
        with self._lock:
            calls, self._calls = self._calls, set()
        closed = ConnectionError(f"the NATS link {self.name} closed during the call")
        for call in calls:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                call.set_exception(closed)

    @property
    def on_loop(self) -> bool:
        """Whether the caller runs on the link's loop thread."""
        return self._host.on_loop

    async def _connect(self) -> None:
        self.nc = await nats.connect(
            servers=self.servers,
            name=self.name,
            connect_timeout=self.connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            pending_size=self.pending_size,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            error_cb=self._on_error,
            **self.connect_options,
        )
        self.connected.set()
        with self._lock:
            self._flowing = True

    @property
    def flowing(self) -> bool:
        """Connected and past the resume delay: a publish now goes out (not queued or
        dropped)."""
        return self._flowing

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, close the connection and stop the loop thread."""
        if self._closed or not self._host.running:
            return
        self._closed = True

        async def shutdown() -> None:
            await self.direct.close()
            if self._unsubscribing:  # on-loop unsubscribes still on their way
                await asyncio.wait(self._unsubscribing, timeout=1.0)
            if self.nc is not None and not self.nc.is_closed:
                await self._drain_queue()
                try:
                    await asyncio.wait_for(self.nc.flush(), timeout=1.0)
                except Exception:  # noqa: BLE001 - best effort at close
                    pass
                await self.nc.close()

        try:
            self.call(shutdown, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("nats close incomplete", error=str(exc))
        self._host.stop(timeout, close=False)

    # --- events ------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[LinkEvent], None]) -> Callable[[], None]:
        """Be told of disconnects and reconnects (on the loop thread: only hand it on)."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def _notify(self, event: LinkEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                self.log.exception("link listener failed")

    async def _on_disconnected(self) -> None:
        self.connected.clear()
        with self._lock:
            self._flowing = False
        self.log.warning(
            "nats disconnected; publishes are buffered", buffer_bytes=self.pending_size
        )
        self._notify("disconnected")

    async def _on_reconnected(self) -> None:
        self.connected.set()
        self.reconnects += 1
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        self.log.info(
            "nats reconnected",
            server=url,
            dropped_total=self.dropped,
            held=len(self._queue),
            sending_after=self.resume_delay,
        )
        self.loop.call_later(self.resume_delay, self._resume)
        self._notify("reconnected")

    async def _on_closed(self) -> None:
        self.connected.clear()
        if not self._closed:
            self.log.error("nats connection closed")
            self._notify("closed")

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("nats error", error=f"{type(exc).__name__}: {exc}")

    # --- publishing ---------------------------------------------------------------------------

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Queue a publish; returns at once. Order is kept across all callers.

        While disconnected (and for `resume_delay` after a reconnect, so that clients who
        lost the server too have re-subscribed) publishes wait in the queue, up to
        `pending_size` bytes; beyond that they are dropped, counted and logged.
        """
        self.publish_many([(subject, data, reply)])

    def publish_many(self, messages: list[tuple[str, bytes, str]]) -> None:
        """Queue several publishes (subject, data, reply) at once, in order."""
        with self._lock:
            if self._closed:
                return
            for subject, data, reply in messages:
                if not self._flowing and self._queued_bytes + len(data) > self.pending_size:
                    self._drop(subject)
                    continue
                self._queue.append((subject, data, reply))
                self._queued_bytes += len(data)
            if self._drain_scheduled or not self._flowing or not self._queue:
                return
            self._drain_scheduled = True
        if self.on_loop:
            self.loop.call_soon(self._start_drain)  # a reader on the loop: no wake-up needed
        else:
            self.loop.call_soon_threadsafe(self._start_drain)

    def _drop(self, subject: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            self.log.error(
                "publish dropped: disconnected and the buffer is full",
                subject=subject,
                dropped_total=self.dropped,
                buffer_bytes=self.pending_size,
            )

    def _start_drain(self) -> None:
        self.loop.create_task(self._drain_queue())

    def _resume(self) -> None:
        # On the loop, `resume_delay` after a reconnect: send what waited.
        with self._lock:
            if not self.connected.is_set() or self._flowing:
                return
            self._flowing = True
            start = bool(self._queue) and not self._drain_scheduled
            self._drain_scheduled = self._drain_scheduled or start
        if start:
            self._start_drain()

    async def _drain_queue(self) -> None:
        nc = self.nc
        while True:
            with self._lock:
                if not self._queue or not self._flowing:
                    self._drain_scheduled = False
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
            for subject, data, reply in batch:
                if nc is None:
                    self.dropped += 1
                    continue
                try:
                    await nc.publish(subject, data, reply=reply)
                    self.published += 1
                except OutboundBufferLimitError:
                    self.dropped += 1
                    if self.dropped == 1 or self.dropped % 1000 == 0:
                        self.log.error(
                            "publish dropped: disconnected and the buffer is full",
                            subject=subject,
                            dropped_total=self.dropped,
                        )
                except Exception as exc:  # noqa: BLE001 - count and report, never kill the drain
                    self.dropped += 1
                    self.log.error("publish failed", subject=subject, error=str(exc))

    # --- subscribing and calling --------------------------------------------------------------

    def subscribe(self, subject: str, callback: MessageCallback, queue: str = "") -> Any:
        """Subscribe; `callback(subject, reply, data)` runs on the loop thread."""

        async def on_message(msg: Msg) -> None:
            callback(msg.subject, msg.reply, msg.data)

        async def go() -> Any:
            assert self.nc is not None
            return await self.nc.subscribe(subject, queue=queue, cb=on_message)

        return self.call(go, timeout=self.connect_timeout)

    def unsubscribe(self, subscription: Any, timeout: float = 2.0) -> None:
        """Stop a subscription (best effort when the connection is gone). On the loop
        thread it does not wait: the unsubscribe goes out in a task of the loop."""

        async def go() -> None:
            await subscription.unsubscribe()

        if self._host.ended or self.loop.is_closed():
            return  # nothing carries it any more: the connection is gone with the loop
        if self.on_loop:
            task = self.loop.create_task(go())
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribed)
            return
        if not self.loop.is_running():
            return
        try:
            self.call(go, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            self.log.debug("unsubscribe failed", error=str(exc))

    def _unsubscribed(self, task: asyncio.Task[None]) -> None:
        self._unsubscribing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.debug("unsubscribe failed", error=str(task.exception()))

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run `factory()` on the loop and wait up to `timeout` seconds for its result.
        Once the loop has ended (the link closed), it raises `ConnectionError` at once, and
        calls still waiting then fail with it too."""
        if self.on_loop:
            msg = "NatsLink.call from its own loop thread would deadlock"
            raise RuntimeError(msg)

        async def run() -> T:
            return await factory()

        with self._lock:
            if self._host.ended:  # nothing would ever run it: say so now, not at the timeout
                msg = f"the NATS link {self.name} is closed"
                raise ConnectionError(msg)
            future = asyncio.run_coroutine_threadsafe(run(), self.loop)
            self._calls.add(future)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise
        finally:
            with self._lock:
                self._calls.discard(future)
