"""One generate stream of the client library, over all its attempts.

An attempt sends the request (or a continuation of it) to a fresh inbox and yields its
chunks in index order. Chunks lost in transit are asked for again on the resume subject:
at once on a gap, after the client reconnected, and after `probe_after` seconds of
silence. When no node answers for `lost_after` seconds, or the node ends the stream
because it is stopping or its engine cannot go on (a retryable error), the stream goes
on elsewhere: a continuation with every token the caller has, up to `migration_limit`
seams; the copy left behind, if it still runs somewhere, is cancelled. A refusal before
the first chunk (overloaded, not ready, engine restarting, stopping), or no node serving
the subject at all (every node away from NATS for a moment), is sent again after a short
backoff, never past the request's deadline. What cannot go on ends with an error chunk
— never silence; a request no node ever answered raises `Lost(no_responders=True)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from nats.aio.client import Client

from messages.codec import decode_json, encode_json
from messages.request import (
    CancelRequest,
    Continuation,
    DirectReply,
    GenerateRequest,
    ResumeReply,
    StreamChunk,
    error_chunk,
)
from supervisor.client_replies import Reply, ReplyMux

__all__ = ["Lost", "StreamOptions", "stream_chunks"]

POLL = 0.25  # seconds between checks for gaps, reconnects and silence while streaming
PROBE_INTERVAL = 1.0  # at most one resume request per stream this often
BACKOFF = 0.2  # seconds before the first re-send after a refusal; doubles
MAX_BACKOFF = 2.0  # ... up to this
_RETRY_BEFORE_START = {"overloaded", "not_ready", "engine_restarting"}


class _Client(Protocol):
    """What a stream uses of its `NodeClient`."""

    endpoint: str

    @property
    def base(self) -> str: ...

    @property
    def reconnects(self) -> int: ...

    def connection(self) -> Client: ...

    @property
    def replies(self) -> ReplyMux: ...

    @property
    def direct(self) -> DirectReply | None: ...

    async def resume(self, request_id: str, from_index: int) -> ResumeReply | None: ...


@dataclass(frozen=True)
class StreamOptions:
    idle_timeout: float
    probe_after: float
    lost_after: float
    migration_limit: int
    retries: int  # sends after a refusal (or a move) before giving up


class Lost(Exception):
    """No node holds the attempt's stream any more (`no_responders`: none serves it)."""

    def __init__(self, message: str, no_responders: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.no_responders = no_responders


@dataclass
class _Progress:
    """What the caller has received over all attempts."""

    next_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    migrations: int = 0

    def saw(self, chunk: StreamChunk) -> None:
        self.next_index = chunk.index + 1
        self.token_ids.extend(chunk.token_ids)
        self.migrations = max(self.migrations, chunk.migrations)

    def continuation(self, request: GenerateRequest) -> GenerateRequest:
        cont = Continuation(
            token_ids=list(self.token_ids),
            next_index=self.next_index,
            migrations=self.migrations + 1,
        )
        return msgspec.structs.replace(request, continuation=cont)


def _moves_on(chunk: StreamChunk, started: bool) -> bool:
    """Whether an ending chunk is one another node may do better than: the node stopping,
    or a retryable error (after the first chunk, any retryable error: the stream
    continues; before it, only a refusal worth sending again)."""
    if chunk.finish_reason == "shutdown":
        return True
    error = chunk.error
    if chunk.finish_reason != "error" or error is None or not error.retryable:
        return False
    return started or error.code in _RETRY_BEFORE_START


async def stream_chunks(
    client: _Client,
    request: GenerateRequest | bytes,
    subject: str,
    options: StreamOptions,
) -> AsyncIterator[StreamChunk]:
    """The chunks of `request` until the one with a finish reason (see the module doc)."""
    progress = _Progress()
    if isinstance(request, GenerateRequest) and client.direct is not None:
        request = msgspec.structs.replace(request, reply_direct=client.direct)
    data = request if isinstance(request, bytes) else encode_json(request)
    request_id = request.request_id if isinstance(request, GenerateRequest) else ""
    tries = seen = 0  # sends since the caller's last chunk; its index then
    first_ending: StreamChunk | None = None  # what ended the stream where it last ran
    loop = asyncio.get_running_loop()
    timeout = request.timeout if isinstance(request, GenerateRequest) else None
    give_up_at = loop.time() + timeout if timeout else float("inf")
    while True:
        ending: StreamChunk | None = None
        gone = False  # no node serves the subject at all, and it is too late to wait
        try:
            async for chunk in _attempt(client, data, subject, request_id, progress, options):
                request_id = request_id or chunk.request_id
                if chunk.finish_reason is not None and _moves_on(chunk, progress.next_index > 0):
                    ending = chunk
                    break
                progress.saw(chunk)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except Lost as lost:
            gone = lost.no_responders
            ending = error_chunk(request_id, progress.next_index, "stream_lost", lost.message)
            unanswered = lost  # raised if this was the last try and nothing came at all
        assert ending is not None
        if progress.next_index != seen:
            tries, seen, first_ending = 0, progress.next_index, ending
        tries += 1
        started = progress.next_index > 0
        pause = min(MAX_BACKOFF, BACKOFF * 2 ** (tries - 1)) if tries > 1 or not started else 0.0
        if (
            not isinstance(request, GenerateRequest)
            or tries > options.retries
            or loop.time() + pause >= give_up_at
            or (started and progress.migrations >= options.migration_limit)
        ):
            if gone and not started:
                raise unanswered
            final = first_ending or ending
            yield msgspec.structs.replace(final, index=progress.next_index)
            return
        if started:
            data = encode_json(progress.continuation(request))
            subject = f"{client.base}.{client.endpoint}"  # any node: the old one may be gone
            await _cancel_left_behind(client, request_id, progress.migrations + 1)
        await asyncio.sleep(pause)  # refused or unserved: wait, then again


async def _cancel_left_behind(client: _Client, request_id: str, migrations: int) -> None:
    """Stop the copy of the stream left behind, if it still runs on a node we lost."""
    cancel = CancelRequest(request_id, below_migrations=migrations)
    with contextlib.suppress(Exception):  # the connection may be down: the node ends it itself
        await client.connection().publish(f"{client.base}.cancel", encode_json(cancel))


@dataclass
class _Watch:
    """When the attempt last heard what (loop time)."""

    chunk_at: float
    heard_at: float
    probed_at: float
    reconnects: int


async def _attempt(
    client: _Client,
    data: bytes,
    subject: str,
    request_id: str,
    progress: _Progress,
    options: StreamOptions,
) -> AsyncIterator[StreamChunk]:
    """One send of the request: its chunks in order from `progress.next_index`; raises
    `Lost` when no node holds it, `TimeoutError` after `idle_timeout` without a chunk."""
    nc = client.connection()
    inbox, arrived = client.replies.open()
    now = asyncio.get_running_loop().time()
    watch = _Watch(now, now, now, client.reconnects)
    expected = progress.next_index
    early: dict[int, StreamChunk] = {}  # chunks that came after a gap
    try:
        await nc.publish(subject, data, reply=inbox)
        while True:
            msg = await arrived.next(POLL)
            named = _receive(msg, subject, expected, early, watch)
            request_id = request_id or named
            while expected in early:
                chunk = early.pop(expected)
                expected += 1
                yield chunk
                if chunk.finish_reason is not None:
                    return
            await _check(client, subject, request_id, expected, early, watch, options)
    finally:
        client.replies.close(inbox)


def _receive(
    msg: Reply | None, subject: str, expected: int, early: dict[int, StreamChunk], watch: _Watch
) -> str:
    """Take one message; the request id its chunk names ("" if none)."""
    if msg is None:
        return ""
    if msg.headers and msg.headers.get("Status") == "503":
        raise Lost(f"no node serves {subject}", no_responders=True)
    chunk = decode_json(msg.data, StreamChunk)
    watch.chunk_at = watch.heard_at = asyncio.get_running_loop().time()
    if chunk.index >= expected:
        early.setdefault(chunk.index, chunk)
    return chunk.request_id


async def _check(
    client: _Client,
    subject: str,
    request_id: str,
    expected: int,
    early: dict[int, StreamChunk],
    watch: _Watch,
    options: StreamOptions,
) -> None:
    """Silence and gaps: ask the resume subject; raise when the stream is idle or lost."""
    now = asyncio.get_running_loop().time()
    if now - watch.chunk_at >= options.idle_timeout:
        msg_text = f"no chunk for {options.idle_timeout:g}s on {subject}"
        raise TimeoutError(msg_text)
    reconnected = watch.reconnects != client.reconnects
    if not request_id or not (early or reconnected or now - watch.heard_at >= options.probe_after):
        return
    if now - watch.probed_at < PROBE_INTERVAL and not reconnected:
        return
    watch.reconnects, watch.probed_at = client.reconnects, now
    answer = await client.resume(request_id, expected)
    if answer is not None:
        watch.heard_at = asyncio.get_running_loop().time()
        for chunk in answer.chunks:
            if chunk.index >= expected:
                early.setdefault(chunk.index, chunk)
        return
    if asyncio.get_running_loop().time() - watch.heard_at >= options.lost_after:
        raise Lost(
            f"no node holds request {request_id} any more: chunks from index {expected} on "
            "were lost (the node restarted, died or is unreachable)"
        )
