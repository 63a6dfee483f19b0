"""One attempt of a request on one rank: send it, put its chunks in order, ask the node for
chunks lost in transit, and tell a lost or stopping instance (a `Retry`) from one that is
only slow. The `Dispatcher` decides what happens after a `Retry`."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from actors.frontend import metrics
from actors.frontend.errors import FrontendError
from actors.frontend.router import Candidate
from actors.frontend.streams import Retry, retry_of
from messages.codec import DecodeError, decode_json, encode_json
from messages.discovery import InstanceRecord
from messages.request import DirectReply, GenerateRequest, StreamChunk, error_chunk
from supervisor.client import ask_resume
from supervisor.client_replies import is_no_responders

if TYPE_CHECKING:
    from nats.aio.client import Client

    from actors.frontend.discovery import Discovery
    from actors.frontend.indexer import KvIndexer, RankKey
    from supervisor.client_replies import Reply, ReplyMux

__all__ = ["DEADLINE_GRACE", "PROBE_AFTER", "run_attempt"]

PROBE_AFTER = 1.0  # seconds without a chunk before asking whether the instance is lost
RESUME_INTERVAL = 1.0  # at most one resume request per stream this often
RESUME_TIMEOUT = 1.0
DEADLINE_GRACE = 5.0  # past the request's own timeout (which the node enforces)
# No node has held the request for this long (every resume probe unanswered): it was lost
# on its way (published as the frontend's NATS server died) and is sent again.
UNHELD_AFTER = 5.0


class Dispatcher(Protocol):
    """What an attempt uses of the dispatcher that runs it."""

    nc: Client
    mux: ReplyMux
    discovery: Discovery
    indexer: KvIndexer
    inflight: Counter[RankKey]
    log: Any
    direct: DirectReply | None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def cancel(self, record: InstanceRecord, request_id: str) -> None: ...


@dataclass
class _Order:
    """The attempt's chunks in index order (a NATS server restart may drop some)."""

    index: int  # of the next chunk to yield
    heard_at: float  # the last chunk or resume answer
    probed_at: float  # the last resume request
    tokens: int = 0
    gone: bool = False  # the instance is lost: nothing to cancel there
    unheld_since: float | None = None  # since when resume probes find no node holding it
    early: dict[int, StreamChunk] = field(default_factory=dict)

    def take(self, chunk: StreamChunk, now: float) -> None:
        self.heard_at = now
        self.unheld_since = None
        if chunk.index >= self.index:
            self.early[chunk.index] = chunk

    def ready(self) -> Iterator[StreamChunk]:
        while self.index in self.early:
            chunk = self.early.pop(self.index)
            self.index = chunk.index + 1
            yield chunk


async def run_attempt(
    dispatcher: Dispatcher,
    candidate: Candidate,
    request: GenerateRequest,
    abort: Callable[[], Exception | None] | None = None,
) -> AsyncGenerator[StreamChunk, None]:
    """The chunks of `request` on `candidate`; raises `Retry` when another should go on."""
    record, iid = candidate.record, candidate.instance_id
    direct = dispatcher.direct if record.direct_streams else None
    wire = msgspec.structs.replace(
        request, dp_rank=candidate.dp_rank, model=record.model.name, reply_direct=direct
    )
    key = (iid, candidate.dp_rank)
    reply, inbox = dispatcher.mux.open()
    dispatcher.inflight[key] += 1
    metrics.INFLIGHT.inc()
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + (request.timeout or 300.0) + DEADLINE_GRACE
    first = request.continuation.next_index if request.continuation is not None else 0
    order = _Order(first, loop.time(), loop.time())
    ended = False  # the node ended the stream, or never got it: nothing to cancel
    try:
        ended = True
        await _send(dispatcher, record, wire, reply)
        ended = False
        while True:
            msg = await inbox.next(PROBE_AFTER)
            if msg is not None:
                bad = _receive(dispatcher, msg, iid, wire.request_id, order, loop.time())
                if bad is not None:
                    yield bad
                    return
            for chunk in order.ready():
                ended = chunk.finish_reason is not None
                retry = retry_of(chunk, iid)
                if retry is not None:
                    raise retry
                order.tokens += len(chunk.token_ids)
                yield chunk
                if ended:
                    return
            if await _resumed(dispatcher, record, wire.request_id, order, loop.time()):
                continue
            if loop.time() - order.heard_at < PROBE_AFTER:
                continue
            failure = abort() if abort is not None and not order.tokens else None
            if failure is not None:
                raise failure from None
            if loop.time() > give_up_at:
                why = f"no answer from instance {iid} within the request's deadline"
                if not order.tokens:
                    raise FrontendError.of_code("deadline_exceeded", why) from None
                yield error_chunk(wire.request_id, order.index, "deadline_exceeded", why)
                return
            if await dispatcher.discovery.is_lost(record, dispatcher.indexer.heard_at(iid)):
                order.gone = True
                why = f"instance {iid} was lost after {order.tokens} tokens"
                raise Retry(iid, "node_lost", FrontendError.of_code("node_lost", why)) from None
            unheld = order.unheld_since
            if unheld is not None and loop.time() - unheld >= UNHELD_AFTER:
                why = f"no node holds the request sent to {iid}: it was lost on its way"
                raise Retry(iid, "not_received", FrontendError.of_code("node_lost", why))
    finally:
        dispatcher.inflight[key] -= 1
        if dispatcher.inflight[key] <= 0:
            del dispatcher.inflight[key]
        metrics.INFLIGHT.dec()
        dispatcher.mux.close(reply)
        if (
            not ended and not order.gone
        ):  # abandoned (client gone, deadline, moved on): stop it on the node
            dispatcher.spawn(dispatcher.cancel(record, wire.request_id))


async def _send(
    dispatcher: Dispatcher, record: InstanceRecord, wire: GenerateRequest, reply: str
) -> None:
    data = encode_json(wire)
    if len(data) > dispatcher.nc.max_payload:
        why = (
            f"the request is {len(data)} bytes on the wire, over the NATS server's "
            f"max_payload ({dispatcher.nc.max_payload})"
        )
        raise FrontendError(413, why, code="request_too_large")
    await dispatcher.nc.publish(record.subjects.instance, data, reply=reply)


def _receive(
    dispatcher: Dispatcher, msg: Reply, iid: str, request_id: str, order: _Order, now: float
) -> StreamChunk | None:
    """Take one message: None if it was a chunk, else the chunk that ends the stream."""
    if is_no_responders(msg):
        order.gone = True
        dispatcher.discovery.mark_down(iid, "no responders on its subject")
        why = f"instance {iid} does not answer (no responders)"
        raise Retry(iid, "no_responders", FrontendError.of_code("node_lost", why))
    try:
        chunk = decode_json(msg.data, StreamChunk)
    except DecodeError as exc:
        dispatcher.log.error("undecodable chunk", instance_id=iid, error=str(exc))
        return error_chunk(request_id, order.index, "internal", f"instance {iid}: {exc}")
    order.take(chunk, now)
    return None


async def _resumed(
    dispatcher: Dispatcher, record: InstanceRecord, request_id: str, order: _Order, now: float
) -> bool:
    """On a gap in the indices, or silence: ask the node for what it sent since. True if
    chunks came back (or the stream is not silent yet)."""
    silent = now - order.heard_at >= PROBE_AFTER
    if not order.early and not silent:
        return True
    if not record.subjects.resume or now - order.probed_at < RESUME_INTERVAL:
        return not silent
    order.probed_at = now
    subject = record.subjects.resume
    answer = await ask_resume(dispatcher.mux, subject, request_id, order.index, RESUME_TIMEOUT)
    if answer is None:
        if order.unheld_since is None:
            order.unheld_since = now
        return not silent
    order.unheld_since = None
    if answer.chunks:
        metrics.RESUMED.inc()
    for chunk in answer.chunks:
        order.take(chunk, order.heard_at)
    if order.early:
        order.heard_at = asyncio.get_running_loop().time()
        return True
    return not silent
