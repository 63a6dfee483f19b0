"""`ReplyMux`: one NATS subscription for the reply streams of every request in flight on
a connection (the frontend's, and each `NodeClient`'s).

Each request gets a reply subject `{inbox}.{n}` under the connection's own inbox prefix
and a queue its chunks are put on; a single wildcard subscription feeds all the queues (as
nats-py's own request multiplexer does), so no SUB/UNSUB round trip per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["ReplyMux", "is_no_responders"]


def is_no_responders(msg: Msg) -> bool:
    """NATS's answer to a request published where nobody subscribes (status 503)."""
    headers = msg.headers
    return headers is not None and headers.get("Status") == "503" and not msg.data


class ReplyMux:
    """Reply subjects and their queues; see the module docstring."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = ""
        self._queues: dict[str, asyncio.Queue[Msg]] = {}
        self._counter = itertools.count(1)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the inbox prefix."""
        self.prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._deliver)

    async def stop(self) -> None:
        """Unsubscribe."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def open(self) -> tuple[str, asyncio.Queue[Msg]]:
        """A fresh reply subject and the queue its messages arrive on."""
        subject = f"{self.prefix}.{next(self._counter)}"
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._queues[subject] = queue
        return subject, queue

    def close(self, subject: str) -> None:
        """Forget a reply subject; late messages to it are dropped."""
        self._queues.pop(subject, None)

    async def _deliver(self, msg: Msg) -> None:
        queue = self._queues.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)
