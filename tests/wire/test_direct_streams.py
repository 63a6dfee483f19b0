"""Direct streams on real TCP sockets: the node's `DirectSender` and the frontend's
`DirectReceiver` on one event loop (see `actors.streams.direct`).

A stream goes direct only if the connection was up when its first chunk went out, and
stays on the way it began; a wrong token, a broken connection or a bad frame sends the
chunks back through NATS (the sender says False), never into the void unannounced.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog

from actors.streams.direct import MAX_PAUSED, DirectReceiver, DirectSender
from messages.request import DirectReply

LOG = structlog.get_logger()


def _run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 20))


async def _until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


_Pair = tuple[list[tuple[str, bytes]], DirectReply, DirectReceiver, DirectSender]


@contextlib.asynccontextmanager
async def _pair() -> AsyncIterator[_Pair]:
    """A listening receiver (what it got, where to send) and a sender on this loop; both
    closed at the end."""
    got: list[tuple[str, bytes]] = []
    receiver = DirectReceiver(lambda subject, data: got.append((subject, data)), "127.0.0.1", LOG)
    sender = DirectSender(asyncio.get_running_loop(), lambda: True, LOG)
    target = await receiver.start()
    try:
        yield got, target, receiver, sender
    finally:
        await sender.close()
        await receiver.stop()


def test_chunks_go_straight_once_connected_in_order_and_byte_for_byte() -> None:
    async def body() -> None:
        async with _pair() as (got, target, _, sender):
            # the first stream to a frontend goes through NATS while the connection opens
            assert not sender.send(target, "_INBOX.a.1", b"first")
            await _until(lambda: sender.connections == 1, "the connection is up")
            assert not sender.send(target, "_INBOX.a.1", b"still nats")  # stays as it began
            sent = [(f"_INBOX.a.{2 + n % 3}", bytes([n]) * (1 + n * 37)) for n in range(60)]
            assert all(sender.send(target, subject, data) for subject, data in sent)
            await _until(lambda: len(got) == len(sent), "every frame arrived")
            assert got == sent
            assert sender.streams == {"direct": 3, "nats": 1}
            assert sender.sent == len(sent)

    _run(body)


def test_a_wrong_token_is_refused_and_its_streams_go_through_nats() -> None:
    async def body() -> None:
        async with _pair() as (got, target, receiver, sender):
            forged = DirectReply(target.host, target.port, "not-the-token")
            assert not sender.send(forged, "_INBOX.b.1", b"x")
            await _until(lambda: not sender._conns, "the refused connection is gone")
            assert not sender.send(forged, "_INBOX.b.2", b"y")  # and not tried again at once
            assert not got
            assert receiver.transports == set()

    _run(body)


def test_a_broken_connection_sends_the_rest_of_its_streams_through_nats() -> None:
    async def body() -> None:
        async with _pair() as (got, target, receiver, sender):
            sender.send(target, "_INBOX.c.0", b"opens the connection")
            await _until(lambda: sender.connections == 1, "the connection is up")
            assert sender.send(target, "_INBOX.c.1", b"direct")
            await _until(lambda: len(got) == 1, "the chunk arrived")
            await receiver.stop()  # the frontend goes away
            await _until(lambda: sender.connections == 0, "the sender saw it go")
            assert not sender.send(target, "_INBOX.c.1", b"the rest: nats")
            assert not sender.send(target, "_INBOX.c.2", b"a new stream: nats")

    _run(body)


def test_a_cut_drops_the_connections_and_opens_none_while_it_lasts() -> None:
    async def body() -> None:
        async with _pair() as (got, target, _, sender):
            sender.send(target, "_INBOX.d.0", b"opens the connection")
            await _until(lambda: sender.connections == 1, "the connection is up")
            sender.cut(0.5)
            await _until(lambda: not sender._conns, "the connection was dropped")
            assert not sender.send(target, "_INBOX.d.1", b"during the cut")
            assert not sender._conns  # no new connection during the cut
            await asyncio.sleep(2.6)  # the cut, and the retry pause after a lost connection
            assert not sender.send(target, "_INBOX.d.2", b"after: connecting")
            await _until(lambda: sender.connections == 1, "connected again")
            assert sender.send(target, "_INBOX.d.3", b"after: direct")
            await _until(lambda: ("_INBOX.d.3", b"after: direct") in got, "the chunk arrived")

    _run(body)


def test_the_receiver_drops_a_peer_without_the_handshake_or_with_a_bad_frame() -> None:
    async def body() -> None:
        async with _pair() as (got, target, _, _):
            loop = asyncio.get_running_loop()
            for payload in (
                b"GET / HTTP/1.1\r\n\r\n",  # no handshake
                b"SGLDIRECT1 " + target.token.encode() + b"\n" + struct.pack(">IH", 2**31, 5),
            ):
                with socket.create_connection((target.host, target.port)) as sock:
                    sock.setblocking(False)
                    await loop.sock_sendall(sock, payload)
                    answer = b""
                    with contextlib.suppress(ConnectionResetError):  # an abort: a reset
                        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 64), 5):
                            answer += chunk  # until the receiver closes it
                    assert answer in (b"", b"OK\n")
            assert not got

    _run(body)


class _Said:
    """A logger that keeps what it was told (to read the sender's warnings)."""

    def __init__(self) -> None:
        self.warnings: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append({"event": event, **fields})

    def info(self, event: str, **fields: Any) -> None:
        pass


def test_an_unreachable_frontend_is_tried_less_and_less_often_and_said_once() -> None:
    """A frontend on another machine with the default direct_host (127.0.0.1) is never
    reachable: the node keeps streaming through NATS, tries again at doubling intervals,
    and says so at the first attempt and every tenth, not every 2 s for ever."""

    async def body() -> None:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        said = _Said()
        sender = DirectSender(asyncio.get_running_loop(), lambda: True, said)
        target = DirectReply("127.0.0.1", port, "token")
        key = (target.host, target.port, target.token)
        delays = []
        for attempt in range(3):
            sender._retry_at[key] = 0.0  # as if its pause were over
            assert not sender.send(target, f"_INBOX.e.{attempt}", b"x")
            await _until(lambda: not sender._conns, "the attempt failed")
            delays.append(sender._retry_at[key] - asyncio.get_running_loop().time())
        assert [round(d) for d in delays] == [2, 4, 8]
        assert [w["attempts"] for w in said.warnings] == [1]
        assert "direct_host" in said.warnings[0]["event"]
        await sender.close()

    _run(body)


def test_frontends_whose_retry_pause_is_over_are_forgotten() -> None:
    """Every run of a frontend is another to the node (another token): over months of
    restarts the node must not keep them all."""

    async def body() -> None:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sender = DirectSender(asyncio.get_running_loop(), lambda: True, _Said())
        for run in range(3 * MAX_PAUSED):
            sender.send(DirectReply("127.0.0.1", port, f"run-{run}"), f"_INBOX.f.{run}", b"x")
            await _until(lambda: not sender._conns, "the attempt failed")
            for key in sender._retry_at:  # as if each pause were over
                sender._retry_at[key] = 0.0
        assert len(sender._retry_at) <= MAX_PAUSED
        assert len(sender._failures) <= MAX_PAUSED
        await sender.close()

    _run(body)
