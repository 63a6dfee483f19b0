"""A consumer cancelled while it waits for the next chunk is cancelled, always, and no
message is lost to a timeout or a cancel.

`asyncio.wait_for(queue.get(), t)` on Python 3.11 returns the item instead of raising
when the item and the cancel land in the same loop turn: the frontend's stream for a
client that went away then ran to its end and the node never heard a cancel (a CI run
failed on it). The frontend and the client wait with `Inbox.next`, tested here on the
exact interleaving that loses the cancel, and on the re-armed timer it keeps per inbox.
"""

from __future__ import annotations

import asyncio

import pytest

from supervisor.client_replies import Inbox


async def _consume(inbox: Inbox[int], got: list[int]) -> None:
    while True:
        item = await inbox.next(5.0)
        if item is not None:
            got.append(item)


def test_a_cancel_landing_with_an_item_still_cancels() -> None:
    async def scenario() -> tuple[bool, list[int], int]:
        inbox: Inbox[int] = Inbox()
        got: list[int] = []
        consumer = asyncio.ensure_future(_consume(inbox, got))
        await asyncio.sleep(0.01)  # the consumer waits on the inbox
        inbox.put(1)
        consumer.cancel()  # the cancel comes in the same turn as the item
        done, _ = await asyncio.wait({consumer}, timeout=1.0)
        if not done:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        return bool(done) and consumer.cancelled(), got, len(inbox)

    cancelled, got, left = asyncio.run(scenario())
    assert cancelled, f"the consumer ran on after its cancel (it got {got})"
    assert (got, left) == ([], 1), "the item is neither taken nor lost: it waits in the inbox"


def test_an_item_arriving_after_the_timeout_waits_for_the_next_call() -> None:
    async def scenario() -> tuple[int | None, int | None, int]:
        inbox: Inbox[int] = Inbox()
        first = await inbox.next(0.05)
        inbox.put(7)
        second = await inbox.next(0.05)
        return first, second, len(inbox)

    assert asyncio.run(scenario()) == (None, 7, 0)


def test_a_timeout_racing_an_item_loses_nothing() -> None:
    """Items put while reads time out all reach a later read, in order."""

    async def scenario() -> list[int]:
        inbox: Inbox[int] = Inbox()
        loop = asyncio.get_running_loop()
        for i in range(200):  # puts spread around the reads' 1 ms deadlines
            loop.call_later(0.001 * (i % 7) + 0.0005 * i, inbox.put, i)
        got: list[int] = []
        deadline = loop.time() + 5.0
        while len(got) < 200 and loop.time() < deadline:
            item = await inbox.next(0.001)
            if item is not None:
                got.append(item)
        return got

    assert sorted(asyncio.run(scenario())) == list(range(200))


def test_a_wait_after_quick_ones_still_times_out_on_its_own_deadline() -> None:
    """The timer armed by an early read fires before a later read's deadline: it re-arms,
    so the later read neither ends early nor waits forever."""

    async def scenario() -> tuple[float, float]:
        inbox: Inbox[int] = Inbox()
        loop = asyncio.get_running_loop()
        for i in range(5):  # quick reads, each answered within 10 ms of its 0.2 s deadline
            loop.call_later(0.01, inbox.put, i)
            assert await inbox.next(0.2) == i
        await asyncio.sleep(0.15)  # the first read's timer fires while nobody waits
        start = loop.time()
        assert await inbox.next(0.3) is None
        first_gap = loop.time() - start
        loop.call_later(0.05, inbox.put, 9)
        start = loop.time()
        assert await inbox.next(0.3) == 9
        return first_gap, loop.time() - start

    waited, answered = asyncio.run(scenario())
    assert 0.29 <= waited < 0.6, f"a 0.3 s read timed out after {waited:.3f} s"
    assert answered < 0.25, f"an item 50 ms away took {answered:.3f} s"


@pytest.mark.parametrize("size", [0, 3])
def test_a_cancelled_waiter_leaves_the_inbox_usable(size: int) -> None:
    async def scenario() -> int | None:
        inbox: Inbox[int] = Inbox()
        for i in range(size):
            inbox.put(i)
        waiter = asyncio.ensure_future(inbox.next(5.0))
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        inbox.put(99)
        return await inbox.next(0.5)

    assert asyncio.run(scenario()) == (0 if size else 99)
