"""The stream table: the pure core of the HandlerActor.

It holds every in-flight stream of a handler and the chunks of recently ended ones, and
decides everything about them: the chunk each engine output becomes (its index, its
finish reason after a cancel, a deadline or a shutdown, its error), when a stream ends,
what a resume request gets back and what is forgotten when. It does no I/O, reads no
clock (every call that needs the time takes `now`) and starts no thread: the actor
carries out what it returns (publish these bytes, abort that request, arm this timer).

Finish-reason rules, when the engine ends a stream the node asked it to stop:

| why the node asked (`ending`) | the engine says | the client gets |
| --- | --- | --- |
| cancelled (client cancel) | cancelled | `cancelled` |
| deadline_exceeded (timeout) | cancelled | `error`, code `deadline_exceeded` |
| shutdown (drain timeout) | cancelled | `shutdown` |

An engine `error` keeps its code when it is a known one, else `engine_error`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal, cast

from messages.codec import encode_json
from messages.engine import HostChunk
from messages.request import (
    ERROR_CODES,
    EmbedRequest,
    EmbedResponse,
    ErrorCode,
    ErrorInfo,
    FinishReason,
    GenerateRequest,
    StreamChunk,
    Usage,
    error_info,
)

__all__ = ["Ended", "Progress", "Stream", "StreamTable"]

Ending = Literal["", "cancelled", "deadline_exceeded", "shutdown"]


@dataclass
class Stream:
    """One in-flight request: where its chunks go, what was sent, why it is ending."""

    request: GenerateRequest | EmbedRequest
    reply: str
    received_at: float
    deadline_at: float
    index: int = 0  # the next chunk's index
    first_token_at: float | None = None
    last_chunk_at: float | None = None
    ending: Ending = ""  # why the node asked the engine to stop it
    sent: list[bytes] = field(default_factory=list)  # the chunks published, for resume

    @property
    def request_id(self) -> str:
        """The stream's request id."""
        return self.request.request_id


@dataclass(frozen=True)
class Progress:
    """What one engine output did to its stream (for the actor's metrics and I/O)."""

    stream: Stream
    chunk: StreamChunk  # the chunk for the client
    data: bytes  # ... encoded; publish it to `stream.reply`
    ended: Ended | None  # set when this chunk ended the stream
    ttft: float | None = None  # seconds from receipt to the first token (first time only)
    itl: float | None = None  # seconds since the previous token chunk
    tokens: int = 0


@dataclass(frozen=True)
class Ended:
    """A stream that ended: its outcome, for the actor's metrics."""

    request_id: str
    reply: str
    data: bytes  # the last message (a chunk, or an EmbedResponse): publish it
    outcome: str  # the error code, or the finish reason
    seconds: float  # from receipt to the end
    usage: Usage | None


@dataclass
class _Kept:
    ended_at: float
    sent: list[bytes]
    size: int


class StreamTable:
    """A handler's streams; see the module docstring."""

    def __init__(self, default_deadline: float, resume_window: float, resume_bytes: int) -> None:
        self.default_deadline = default_deadline
        self.resume_window = resume_window
        self.resume_bytes = resume_bytes
        self.streams: dict[str, Stream] = {}
        self._ended: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._ended_bytes = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.streams

    def __len__(self) -> int:
        return len(self.streams)

    def known(self, request_id: str) -> bool:
        """In flight, or ended recently enough to be kept for resume."""
        return request_id in self.streams or request_id in self._ended

    # --- opening, and what the engine sends ----------------------------------------------

    def open(
        self, request: GenerateRequest | EmbedRequest, reply: str, received_at: float
    ) -> Stream:
        """A new stream; its deadline runs from receipt (`request.timeout`, else the
        default). The caller checked that the id is not in flight."""
        timeout = request.timeout or self.default_deadline
        stream = Stream(request, reply, received_at, deadline_at=received_at + timeout)
        self.streams[request.request_id] = stream
        return stream

    def send(self, stream: Stream, chunk: StreamChunk) -> bytes:
        """Record `chunk` as published on `stream` (kept for resume); returns its bytes."""
        data = encode_json(chunk)
        stream.sent.append(data)
        stream.index += 1
        return data

    def output(self, chunk: HostChunk, now: float) -> Progress | None:
        """The engine's output for a stream: the chunk for the client, and whether it ended
        the stream. None for a chunk of a stream already ended (a late one)."""
        stream = self.streams.get(chunk.request_id)
        if stream is None:
            return None
        if chunk.embeddings is not None:
            final = StreamChunk(chunk.request_id, 0, finish_reason="stop", usage=chunk.usage)
            ended = self.end(stream.request_id, final, now, chunk.embeddings)
            return Progress(stream, final, ended.data, ended)
        ttft = itl = None
        if chunk.token_ids:
            if stream.first_token_at is None:
                stream.first_token_at = now
                ttft = now - stream.received_at
            elif stream.last_chunk_at is not None:
                itl = now - stream.last_chunk_at
            stream.last_chunk_at = now
        out = StreamChunk(
            request_id=chunk.request_id,
            index=stream.index,
            token_ids=chunk.token_ids,
            text=chunk.text,
            finish_reason=_finish_reason(chunk, stream.ending),
            error=_error(chunk, stream),
            usage=chunk.usage,
            logprobs=chunk.logprobs,
        )
        if out.finish_reason is None:
            data = self.send(stream, out)
            return Progress(stream, out, data, None, ttft, itl, len(chunk.token_ids))
        ended = self.end(stream.request_id, out, now)
        return Progress(stream, out, ended.data, ended, ttft, itl, len(chunk.token_ids))

    # --- the node asking a stream to stop --------------------------------------------------

    def stopping(self, request_id: str, why: Ending) -> bool:
        """The node asks the engine to stop a stream (cancel, deadline): record why, so its
        end is reported as such. True when the engine must be told (not already ending)."""
        stream = self.streams.get(request_id)
        if stream is None or stream.ending:
            return False
        stream.ending = why
        return True

    def deadline_chunk(self, request_id: str) -> StreamChunk | None:
        """The engine did not end a late stream within the grace: the chunk that ends it
        here (None if it ended meanwhile)."""
        stream = self.streams.get(request_id)
        if stream is None:
            return None
        return StreamChunk(
            request_id, stream.index, finish_reason="error", error=deadline_error(stream)
        )

    def closing_chunks(self, error: tuple[ErrorCode, str] | None = None) -> list[StreamChunk]:
        """The last chunk of every stream in flight, when the handler stops: `shutdown`,
        or `error` with the given code and message."""
        chunks = []
        for request_id, stream in self.streams.items():
            if error is None:
                chunks.append(StreamChunk(request_id, stream.index, finish_reason="shutdown"))
            else:
                info = error_info(*error)
                chunks.append(
                    StreamChunk(request_id, stream.index, finish_reason="error", error=info)
                )
        return chunks

    # --- ending ------------------------------------------------------------------------------

    def end(
        self,
        request_id: str,
        chunk: StreamChunk,
        now: float,
        vectors: list[list[float]] | None = None,
    ) -> Ended:
        """End a stream with `chunk` (its last), keep its chunks for resume."""
        stream = self.streams.pop(request_id)
        if isinstance(stream.request, EmbedRequest):
            data = encode_json(_embed_answer(stream.request, chunk, vectors))
        else:
            data = self.send(stream, chunk)
            self._keep(request_id, stream.sent, now)
        outcome = chunk.error.code if chunk.error else (chunk.finish_reason or "unknown")
        return Ended(request_id, stream.reply, data, outcome, now - stream.received_at, chunk.usage)

    def refused(self, request_id: str, data: bytes, now: float) -> None:
        """A refusal was published for `request_id`: keep it for resume, unless the id
        belongs to a stream in flight or kept (a duplicate id must not replace it)."""
        if request_id and not self.known(request_id):
            self._keep(request_id, [data], now)

    # --- resume --------------------------------------------------------------------------

    def resume(self, request_id: str, from_index: int, now: float) -> tuple[list[bytes], bool]:
        """The chunks of a stream from `from_index` on, and whether it ended. Raises
        KeyError for a stream this table does not hold (another handler's or node's)."""
        self.prune(now)
        stream = self.streams.get(request_id)
        if stream is not None:
            return stream.sent[from_index:], False
        return self._ended[request_id].sent[from_index:], True

    def _keep(self, request_id: str, sent: list[bytes], now: float) -> None:
        kept = _Kept(now, sent, sum(len(chunk) for chunk in sent))
        self._ended[request_id] = kept
        self._ended_bytes += kept.size
        self.prune(now)

    def prune(self, now: float) -> None:
        """Forget ended streams past the resume window, then the oldest while over the
        byte budget."""
        while self._ended:
            oldest = next(iter(self._ended.values()))
            expired = now - oldest.ended_at > self.resume_window
            if not expired and self._ended_bytes <= self.resume_bytes:
                break
            self._ended_bytes -= self._ended.popitem(last=False)[1].size

    @property
    def kept_bytes(self) -> int:
        """Bytes of ended streams' chunks kept for resume."""
        return self._ended_bytes


def _finish_reason(chunk: HostChunk, ending: Ending) -> FinishReason | None:
    if chunk.finish_reason == "cancelled" and ending in ("deadline_exceeded", "shutdown"):
        return "error" if ending == "deadline_exceeded" else "shutdown"
    return cast(FinishReason | None, chunk.finish_reason)  # the host sends only these


def _error(chunk: HostChunk, stream: Stream) -> ErrorInfo | None:
    if chunk.finish_reason == "cancelled" and stream.ending == "deadline_exceeded":
        return deadline_error(stream)
    if chunk.finish_reason == "error":
        code = chunk.error_code if chunk.error_code in ERROR_CODES else "engine_error"
        return error_info(code, chunk.error_message, chunk.error_field)
    return None


def deadline_error(stream: Stream) -> ErrorInfo:
    """The error of a stream whose timeout ran out."""
    timeout = stream.request.timeout
    why = (
        f"the request did not finish within its timeout ({timeout:g}s)"
        if timeout
        else "the request did not finish within the default deadline"
    )
    return error_info("deadline_exceeded", why)


def _embed_answer(
    request: EmbedRequest, chunk: StreamChunk, vectors: list[list[float]] | None
) -> EmbedResponse:
    error = chunk.error
    if error is None and chunk.finish_reason not in ("stop", "length"):
        code: ErrorCode = "not_ready" if chunk.finish_reason == "shutdown" else "engine_error"
        error = error_info(code, f"the request ended: {chunk.finish_reason}")
    return EmbedResponse(
        request_id=request.request_id, embeddings=vectors or [], usage=chunk.usage, error=error
    )
