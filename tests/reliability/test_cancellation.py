"""A consumer cancelled while it waits for the next chunk is cancelled, always.

`asyncio.wait_for(queue.get(), t)` on Python 3.11 returns the item instead of raising
when the item and the cancel land in the same loop turn: the frontend's stream for a
client that went away then ran to its end and the node never heard a cancel (a CI run
failed on it). The frontend and the client wait with `next_within`, tested here on the
exact interleaving that loses the cancel.
"""

from __future__ import annotations

import asyncio

import pytest

from supervisor.client import next_within


async def _consume(queue: asyncio.Queue[int], got: list[int]) -> None:
    while True:
        item = await next_within(queue, 5.0)
        if item is not None:
            got.append(item)


def test_a_cancel_landing_with_an_item_still_cancels() -> None:
    async def scenario() -> tuple[bool, list[int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        got: list[int] = []
        consumer = asyncio.ensure_future(_consume(queue, got))
        await asyncio.sleep(0.01)  # the consumer waits on the queue
        queue.put_nowait(1)
        await asyncio.sleep(0)  # the getter takes the item ...
        consumer.cancel()  # ... and the cancel comes in the same turn
        done, _ = await asyncio.wait({consumer}, timeout=1.0)
        if not done:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        return bool(done) and consumer.cancelled(), got

    cancelled, got = asyncio.run(scenario())
    assert cancelled, f"the consumer ran on after its cancel (it got {got})"


def test_an_item_arriving_after_the_timeout_waits_for_the_next_call() -> None:
    async def scenario() -> tuple[int | None, int | None, int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        first = await next_within(queue, 0.05)
        queue.put_nowait(7)
        second = await next_within(queue, 0.05)
        return first, second, queue.qsize()

    assert asyncio.run(scenario()) == (None, 7, 0)


def test_a_timeout_racing_an_item_loses_nothing() -> None:
    """Items put while getters time out all reach a later call, in order."""

    async def scenario() -> list[int]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i in range(200):  # puts spread around the getters' 1 ms deadlines
            loop.call_later(0.001 * (i % 7) + 0.0005 * i, queue.put_nowait, i)
        got: list[int] = []
        deadline = loop.time() + 5.0
        while len(got) < 200 and loop.time() < deadline:
            item = await next_within(queue, 0.001)
            if item is not None:
                got.append(item)
        return got

    got = asyncio.run(scenario())
    assert sorted(got) == list(range(200))


@pytest.mark.parametrize("size", [0, 3])
def test_a_cancelled_waiter_leaves_the_queue_usable(size: int) -> None:
    async def scenario() -> int | None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(size):
            queue.put_nowait(i)
        waiter = asyncio.ensure_future(next_within(queue, 5.0))
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        queue.put_nowait(99)
        return await next_within(queue, 0.5)

    assert asyncio.run(scenario()) == (0 if size else 99)
