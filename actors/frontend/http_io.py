"""HTTP plumbing: bodies, JSON and error responses, server-sent events, and noticing a
client that went away (so its request is cancelled on the node at once)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from actors.frontend.errors import FrontendError

__all__ = [
    "ClientGone",
    "SseResponse",
    "error_response",
    "json_response",
    "read_body",
    "sse_event",
    "until_disconnect",
]

T = TypeVar("T")
MAX_BODY_BYTES = 32 * 1024 * 1024
SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response (encoded with msgspec)."""
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_response(error: FrontendError) -> Response:
    """OpenAI's error body with the error's status."""
    return json_response(error.body(), error.status)


def sse_event(body: Any) -> bytes:
    """One server-sent event carrying `body` as JSON."""
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 beyond `MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise FrontendError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise FrontendError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    return body


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise `ClientGone`."""
    return await _until_gone(request.receive, work)


async def _until_gone(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` in the caller's own task, cancelled (`ClientGone`) if the client
    disconnects first. Not in a task of its own: starting one and waiting for it cost
    two loop turns, and under load each turn on a request's way to its first token waits
    behind every other stream's chunks (the frontend's TTFT at 16 busy streams is mostly
    such turns)."""
    task = asyncio.current_task()
    assert task is not None
    watching, gone = [True], [False]

    def on_disconnect(watch: asyncio.Future[None]) -> None:
        # scheduled when the watch ends: it may run after `work` did, hence `watching`
        if watching[0] and not watch.cancelled() and watch.exception() is None:
            gone[0] = True
            task.cancel()

    watch = asyncio.ensure_future(_disconnected(receive))
    watch.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone[0]:
            gone[0] = False  # our cancel, taken back here
            if task.uncancel() == 0:  # nobody else cancelled the task: the client went away
                raise ClientGone from None
        raise
    finally:
        watching[0] = False
        watch.cancel()
        if gone[0]:  # `work` swallowed our cancel and ended: take it back all the same
            task.uncancel()


class SseResponse(StreamingResponse):
    """A text/event-stream response that stops at once when the client disconnects, and
    always closes its iterator (whose cleanup cancels the request on the node)."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientGone, OSError):  # gone, or went away mid-write
                await _until_gone(receive, self._stream_in_bursts(send))
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()

    async def _stream_in_bursts(self, send: Send) -> None:
        """Like `stream_response`, but the events that came while the last write was on
        its way go out in one write: one ASGI send and one syscall per burst, not per
        chunk. The first event is read here, before the headers go: the stream has begun
        (its first output was read before the answer was chosen), so headers and first
        event leave in the same loop turn, with no task between."""
        events = self.body_iterator.__aiter__()
        first = await anext(events, None)
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})  # fmt: skip
        if first is not None:
            body = first.encode() if isinstance(first, str) else bytes(first)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        pending: list[bytes] = []
        arrived = asyncio.Event()
        reader = asyncio.ensure_future(self._read_into(events, pending, arrived))
        try:
            while not reader.done() or pending:
                await arrived.wait()
                arrived.clear()
                if pending:
                    burst = b"".join(pending)
                    pending.clear()
                    await send({"type": "http.response.body", "body": burst, "more_body": True})
            reader.result()  # the iterator's failure, if it had one
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _read_into(
        events: AsyncIterator[Any], pending: list[bytes], arrived: asyncio.Event
    ) -> None:
        try:
            async for event in events:
                pending.append(event.encode() if isinstance(event, str) else bytes(event))
                arrived.set()
        finally:
            arrived.set()
