"""`ReplyMux` on a real NATS server: every reply reaches its own stream's inbox, in order,
straight from nats-py's reader (no callback task), across a reconnect, and nothing
counts as pending on the subscription (a slow-consumer limit can never trip on it).

The direct delivery relies on how nats-py 2.16 builds a subscription; the first test
fails when an upgrade makes `ReplyMux` fall back to a callback subscription, so the
fallback (correct, but a task turn and a queue per token slower) is never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from supervisor.chaos_nodes import NatsServer
from supervisor.client_replies import ReplyMux, _DirectDelivery, in_place, is_no_responders

STREAMS, MESSAGES = 8, 200


@contextlib.asynccontextmanager
async def _mux_and_peer(url: str) -> AsyncIterator[tuple[ReplyMux, Client]]:
    """A started `ReplyMux` on one connection, and a second connection to talk to it."""
    own = await nats.connect(url)
    peer = await nats.connect(url)
    mux = ReplyMux(own)
    await mux.start()
    await in_place(own)  # the SUB is in place before another connection publishes
    try:
        yield mux, peer
    finally:
        await mux.stop()
        await peer.close()
        await own.close()


async def _send_and_read(url: str) -> tuple[bool, list[list[bytes]], int, int]:
    async with _mux_and_peer(url) as (mux, sender):
        sub = mux._sub
        direct = sub is not None and isinstance(sub._pending_queue, _DirectDelivery)
        opened = [mux.open() for _ in range(STREAMS)]
        for i in range(MESSAGES):  # interleaved: stream k gets "k:i" in order
            for k, (subject, _) in enumerate(opened):
                await sender.publish(subject, f"{k}:{i}".encode())
        await sender.flush()
        got: list[list[bytes]] = []
        for _, inbox in opened:
            data: list[bytes] = []
            while len(data) < MESSAGES:
                # generous: the test is of order and completeness, and a loaded CI
                # machine once stalled this read past 2 s
                msg = await inbox.next(10.0)
                if msg is None:
                    break  # the rest did not come: the comparison below says which
                data.append(msg.data)
            got.append(data)
        assert sub is not None
        pending = sub._pending_size
        late_subject, late_inbox = opened[0]
        mux.close(late_subject)
        await sender.publish(late_subject, b"after close")  # dropped: nobody reads it
        await sender.flush()
        await asyncio.sleep(0.1)
        return direct, got, pending, len(late_inbox)


def test_replies_reach_their_own_inbox_in_order_straight_from_the_reader(
    tmp_path: Path,
) -> None:
    with NatsServer(tmp_path) as server:
        direct, got, pending, late = asyncio.run(_send_and_read(server.url))
    assert direct, "ReplyMux fell back to a callback subscription (nats-py changed?)"
    for k, data in enumerate(got):
        assert data == [f"{k}:{i}".encode() for i in range(MESSAGES)]
    assert pending == 0
    assert late == 0


async def _across_a_restart(tmp_path: Path, servers: list[NatsServer]) -> bytes:
    server = servers[0]
    receiver = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    mux = ReplyMux(receiver)
    await mux.start()
    await in_place(receiver)
    subject, inbox = mux.open()
    port = server.port
    server.stop()
    server = NatsServer.on_port(tmp_path, port)
    servers.append(server)
    for _ in range(100):  # the receiver re-subscribes once it is back
        if receiver.is_connected:
            break
        await asyncio.sleep(0.1)
    sender = await nats.connect(server.url)
    try:
        for _ in range(50):  # until the SUB replayed on reconnect is in place
            await sender.publish(subject, b"after restart")
            await sender.flush()
            msg = await inbox.next(0.1)
            if msg is not None:
                return msg.data
        return b"<nothing>"
    finally:
        await sender.close()
        await mux.stop()
        await receiver.close()


def test_the_inboxes_keep_receiving_after_the_server_restarts(tmp_path: Path) -> None:
    servers = [NatsServer(tmp_path)]
    try:
        data = asyncio.run(_across_a_restart(tmp_path, servers))
    finally:
        for server in servers:
            server.stop()
    assert data == b"after restart"


async def _requests(url: str) -> tuple[bytes | None, bool, float, bool, bool]:
    async with _mux_and_peer(url) as (mux, responder):
        race: list[asyncio.Task[object]] = []

        async def answer(msg: Msg) -> None:
            await responder.publish(msg.reply, b"answer:" + msg.data)

        async def answer_and_cancel(msg: Msg) -> None:
            # the answer and the asker's cancel in one loop turn (both connections share it)
            mux.deliver(msg.reply, b"answer")
            race[0].cancel()

        await responder.subscribe("svc.echo", cb=answer)
        await responder.subscribe("svc.race", cb=answer_and_cancel)
        await responder.subscribe("svc.silent")
        await in_place(responder)
        echoed = await mux.request("svc.echo", b"ping", 5.0)
        nobody = await mux.request("svc.nobody", b"", 5.0)
        start = asyncio.get_running_loop().time()
        silent = await mux.request("svc.silent", b"", 0.3)
        waited = asyncio.get_running_loop().time() - start
        race.append(asyncio.ensure_future(mux.request("svc.race", b"", 5.0)))
        cancelled = False
        try:
            await race[0]
        except asyncio.CancelledError:
            cancelled = True
        assert silent is None
        return (
            echoed.data if echoed is not None else None,
            nobody is not None and is_no_responders(nobody),
            waited,
            cancelled,
            not mux._inboxes,  # every request's inbox closed
        )


def test_a_request_gets_its_answer_or_none_and_a_cancel_landing_with_the_answer_raises(
    tmp_path: Path,
) -> None:
    """`ReplyMux.request`: the answer; NATS's no-responders status for a subject nobody
    serves; None after the timeout; and a cancel that lands in the loop turn the answer
    does raises (nats-py's `request` returns the answer then, on Python 3.11: a resume
    probe answered as the client went away kept a stream running on the node)."""
    with NatsServer(tmp_path) as server:
        echoed, no_responders, waited, cancelled, closed = asyncio.run(_requests(server.url))
    assert echoed == b"answer:ping"
    assert no_responders
    assert 0.3 <= waited < 2.0
    assert cancelled
    assert closed


async def _subscribe_then_ask(url: str, rounds: int) -> int:
    asker = await nats.connect(url)
    responder = await nats.connect(url)
    unanswered = 0
    try:
        for i in range(rounds):

            async def answer(msg: Msg) -> None:
                await responder.publish(msg.reply, b"here")

            sub = await responder.subscribe(f"svc.fresh.{i}", cb=answer)
            await in_place(responder)
            try:
                await asker.request(f"svc.fresh.{i}", b"", timeout=5.0)
            except nats.errors.NoRespondersError:
                unanswered += 1
            await sub.unsubscribe()
        return unanswered
    finally:
        await responder.close()
        await asker.close()


def test_a_subscription_is_in_place_for_other_connections_once_in_place_returns(
    tmp_path: Path,
) -> None:
    """A responder subscribes, waits for `in_place`, and another connection's request
    finds it, every time (with nats-py 2.16's `flush()` in its place, NATS answered "no
    responders" in 1 to 6 rounds of 300: its PING overtakes the SUB)."""
    with NatsServer(tmp_path) as server:
        unanswered = asyncio.run(_subscribe_then_ask(server.url, 300))
    assert unanswered == 0
