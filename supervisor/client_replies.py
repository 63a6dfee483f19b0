"""`ReplyMux`: one NATS subscription for the reply streams of every request in flight on
a connection (the frontend's, and each `NodeClient`'s).

Each request gets a reply subject `{inbox}.{n}` under the connection's own inbox prefix
and an `Inbox` its chunks are put on; a single wildcard subscription feeds all the inboxes
(as nats-py's own request multiplexer does), so no SUB/UNSUB round trip per request.
Chunks that come another way (a node's direct stream to the frontend) are handed to the
same inboxes by `deliver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Delivered", "Inbox", "Reply", "ReplyMux", "in_place", "is_no_responders"]

T = TypeVar("T")


class Reply(Protocol):
    """What an inbox holds: a NATS message, or a `Delivered` one."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...


class Delivered:
    """A reply that came to the reply subject other than through NATS."""

    __slots__ = ("data", "subject")

    headers = None

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data


def is_no_responders(msg: Reply) -> bool:
    """NATS's answer to a request published where nobody subscribes (status 503)."""
    headers = msg.headers
    return headers is not None and headers.get("Status") == "503" and not msg.data


async def in_place(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has taken every command `nc` sent before: its subscriptions
    are in place for what other connections publish next.

    nats-py 2.16's `flush()` is not that: it writes its PING straight to the socket, ahead
    of commands still queued for its writer, so it can come back before a subscription
    just made reaches the server (NATS then answered "no responders" to a request sent
    after the responder had subscribed and flushed: 5 times in 300). A message to an inbox
    of its own goes through the same queue as everything before it."""
    subject = nc.new_inbox()
    sub = await nc.subscribe(subject, max_msgs=1)
    try:
        await nc.publish(subject, b"")
        await sub.next_msg(timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class Inbox(Generic[T]):
    """The messages of one stream, for the one task that reads them, in order.

    `next(timeout)` is the whole read side: the next message, or None after `timeout`
    seconds without one. It is on the path of every streamed token, so it costs one
    future per wait and no timer per wait (an `asyncio.Queue` read with a timeout costs
    a task, a timer and `asyncio.wait`'s callbacks: a quarter of the frontend's CPU per
    token at 16 streams). One timer per inbox stays armed while it is read; when it fires
    early (the last wait ended before its deadline) it re-arms for the current wait's.

    A message is never handed to a waiter, only signalled: a reader cancelled just as a
    message arrived leaves it in the inbox for the next read, and a cancel always raises
    (`asyncio.wait_for(queue.get(), t)` on Python 3.11 returns the item instead when both
    land in the same loop turn: a stream whose client went away then ran on to its end
    and was never cancelled on the node).
    """

    __slots__ = ("_deadline", "_items", "_timer", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def put(self, item: T) -> None:
        """Add a message (on the loop that reads it) and wake the reader."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._items)

    async def next(self, timeout: float) -> T | None:
        """The next message, or None if none comes within `timeout` seconds."""
        if self._items:
            return self._items.popleft()
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        return self._items.popleft() if self._items else None

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms its own timer
        loop = waiter.get_loop()
        if loop.time() >= self._deadline:
            waiter.set_result(None)
        else:  # armed by an earlier wait: this one's deadline is later
            self._timer = loop.call_at(self._deadline, self._expire)

    def close(self) -> None:
        """Stop the timer (the inbox is no longer read)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ReplyMux:
    """Reply subjects and their queues; see the module docstring."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = ""
        self._inboxes: dict[str, Inbox[Reply]] = {}
        self._counter = itertools.count(1)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the inbox prefix; see `_DirectDelivery`."""
        self.prefix = self.nc.new_inbox()
        subject = f"{self.prefix}.*"
        sub = await self.nc.subscribe(subject)
        if isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) and isinstance(
            getattr(sub, "_pending_size", None), int
        ):
            sub._pending_queue = _DirectDelivery(sub, self._deliver_now)  # type: ignore[assignment]
            self._sub = sub
            return
        await sub.unsubscribe()  # a nats-py whose subscriptions are built otherwise
        self._sub = await self.nc.subscribe(subject, cb=self._deliver)

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def open(self) -> tuple[str, Inbox[Reply]]:
        """A fresh reply subject and the inbox its messages arrive in."""
        subject = f"{self.prefix}.{next(self._counter)}"
        inbox: Inbox[Reply] = Inbox()
        self._inboxes[subject] = inbox
        return subject, inbox

    async def request(self, subject: str, data: bytes, timeout: float) -> Reply | None:
        """The first answer to `data` published on `subject`, or None if none comes within
        `timeout` seconds; a subject nobody serves answers at once (`is_no_responders`).

        Unlike nats-py's `request` (`asyncio.wait_for` on Python 3.11), a cancel that
        lands in the loop turn the answer does still raises: a stream's resume probe or
        lost-instance probe answered just as its client went away swallowed the cancel,
        and the request ran on to its end on the node, never cancelled."""
        reply, inbox = self.open()
        try:
            await self.nc.publish(subject, data, reply=reply)
            return await inbox.next(timeout)
        finally:
            self.close(reply)

    def close(self, subject: str) -> None:
        """Forget a reply subject; late messages to it are dropped."""
        inbox = self._inboxes.pop(subject, None)
        if inbox is not None:
            inbox.close()

    def _deliver_now(self, msg: Msg) -> None:
        inbox = self._inboxes.get(msg.subject)
        if inbox is not None:
            inbox.put(msg)

    async def _deliver(self, msg: Msg) -> None:
        self._deliver_now(msg)

    def deliver(self, subject: str, data: bytes) -> None:
        """A reply to `subject` that came another way (on the loop of the mux's reader)."""
        inbox = self._inboxes.get(subject)
        if inbox is not None:
            inbox.put(Delivered(subject, data))


class _DirectDelivery:
    """Takes the place of a nats-py subscription's pending queue, so that the client's
    reader hands each reply straight to its inbox.

    nats-py puts a subscription's messages on an `asyncio.Queue` and, when the
    subscription has a callback, runs a task that takes them off and calls it: a queue
    put, a task turn and a queue get per streamed token, for a callback that only appends
    to an inbox. A subscription without a callback has no task; its queue is replaced by
    this object, which delivers at once (and keeps the subscription's pending-bytes count,
    which nats-py raises before the put, at zero). nats-py is pinned; `ReplyMux.start`
    falls back to a callback when the subscription does not look as expected.
    """

    def __init__(self, sub: Subscription, deliver: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        self._deliver(msg)

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        pass

    async def join(self) -> None:  # a drain of the subscription: nothing is held here
        return None
