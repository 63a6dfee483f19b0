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

Nothing fails that can continue. A stream whose engine went away (`engine_restarting`:
the engine host died, stalled or restarted, its DP rank was lost) is not ended: it waits
for an engine and is submitted again as a continuation, the prompt followed by every
token already streamed, with `max_tokens` reduced by those; its chunks go on from the
next index, so the client sees one stream with a pause. Each engine submission is an
attempt with an id of its own in the engine (`"<request_id> <attempt>"`, never a client
id: those have no space), so a late chunk of an abandoned attempt is told from the
current one. A request that arrives as a continuation (moved from another node) starts
where the client is. `migration_limit` bounds the seams of one stream.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal, cast

import msgspec

from messages.codec import encode_json
from messages.engine import HostChunk
from messages.request import (
    ERROR_CODES,
    Continuation,
    DirectReply,
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

__all__ = ["Ended", "Progress", "Stream", "StreamTable", "Submission"]

Ending = Literal["", "cancelled", "deadline_exceeded", "shutdown"]
MAX_ATTEMPTS = 50  # engine submissions of one stream on one node, seams or not


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
    first_index: int = 0  # the index of sent[0] (a continuation starts where the client is)
    generated: list[int] = field(default_factory=list)  # every token the client has
    migrations: int = 0  # seams so far (engine restarts here, moves between nodes)
    attempt: int = 0  # engine submissions so far on this node
    had_at_submit: int = 0  # tokens the client had when the current attempt was submitted
    engine_id: str = ""  # the current attempt's id in the engine; "" while it waits
    prompt_tokens: int = 0  # the prompt as the first engine counted it (0: not yet known)
    cached_tokens: int | None = None  # the first attempt's prefix-cache hit, once known

    @property
    def request_id(self) -> str:
        """The stream's request id."""
        return self.request.request_id

    @property
    def direct(self) -> DirectReply | None:
        """Where its frontend takes its chunks straight (see `actors.streams.direct`)."""
        request = self.request
        return request.reply_direct if isinstance(request, GenerateRequest) else None


@dataclass(frozen=True)
class Submission:
    """What to send the engine for a stream's next attempt."""

    engine_id: str
    request: GenerateRequest  # max_tokens and min_tokens reduced by the tokens already had
    continuation_ids: list[int]  # tokens already generated, after the prompt


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
    waits: bool = False  # the stream lost its engine: it waits to be submitted again
    seam: bool = False  # ... after its client got tokens from the lost attempt


@dataclass(frozen=True)
class Ended:
    """A stream that ended: its outcome, for the actor's metrics."""

    request_id: str
    reply: str
    data: bytes  # the last message (a chunk, or an EmbedResponse): publish it
    outcome: str  # the error code, or the finish reason
    seconds: float  # from receipt to the end
    usage: Usage | None
    direct: DirectReply | None = None  # see `Stream.direct`


@dataclass
class _Kept:
    ended_at: float
    sent: list[bytes]
    size: int
    first_index: int = 0


class StreamTable:
    """A handler's streams; see the module docstring."""

    def __init__(
        self,
        default_deadline: float,
        resume_window: float,
        resume_bytes: int,
        migration_limit: int = 3,
    ) -> None:
        self.default_deadline = default_deadline
        self.resume_window = resume_window
        self.resume_bytes = resume_bytes
        self.migration_limit = migration_limit
        self.streams: dict[str, Stream] = {}
        self._by_engine: dict[str, str] = {}  # current attempt's engine id -> request id
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
        cont = request.continuation if isinstance(request, GenerateRequest) else None
        if cont is not None:
            stream.index = stream.first_index = cont.next_index
            stream.generated = list(cont.token_ids)
            stream.migrations = cont.migrations
            stream.prompt_tokens = cont.prompt_tokens
            stream.cached_tokens = cont.cached_tokens if cont.prompt_tokens else None
        if isinstance(request, EmbedRequest):  # one attempt, under the client's id
            stream.engine_id = request.request_id
            self._by_engine[request.request_id] = request.request_id
        self.streams[request.request_id] = stream
        return stream

    def submit(self, request_id: str) -> Submission:
        """A new attempt for a generate stream: its engine id and what the engine gets."""
        stream = self.streams[request_id]
        request = stream.request
        assert isinstance(request, GenerateRequest)
        self._by_engine.pop(stream.engine_id, None)
        stream.attempt += 1
        stream.had_at_submit = len(stream.generated)
        stream.engine_id = f"{request_id} {stream.attempt}"
        self._by_engine[stream.engine_id] = request_id
        had = len(stream.generated)
        stop = request.stop
        if had:
            stop = msgspec.structs.replace(
                stop,
                max_tokens=max(1, stop.max_tokens - had),
                min_tokens=max(0, stop.min_tokens - had),
            )
        engine_request = msgspec.structs.replace(request, stop=stop, continuation=None)
        if stream.attempt > 1:  # its rank may be the one that was lost: let the engine pick
            engine_request = msgspec.structs.replace(engine_request, dp_rank=None)
        return Submission(stream.engine_id, engine_request, list(stream.generated))

    def complete(self, request_id: str) -> bool:
        """Whether a stream already has every token it may (`max_tokens`): a continuation
        that has nothing left to generate ends with `length` instead of being submitted."""
        stream = self.streams[request_id]
        request = stream.request
        return isinstance(request, GenerateRequest) and (
            len(stream.generated) >= request.stop.max_tokens
        )

    def suspend(self, request_id: str) -> str:
        """The stream's attempt is abandoned (its handler crashed, or it is handed over):
        it waits for the next one; returns the abandoned attempt's engine id."""
        stream = self.streams[request_id]
        engine_id, stream.engine_id = stream.engine_id, ""
        self._by_engine.pop(engine_id, None)
        stream.migrations += 1
        return engine_id

    def waiting(self) -> list[str]:
        """Streams waiting for an engine to be submitted to."""
        return [rid for rid, s in self.streams.items() if not s.engine_id and not s.ending]

    def send(self, stream: Stream, chunk: StreamChunk) -> bytes:
        """Record `chunk` as published on `stream` (kept for resume); returns its bytes."""
        data = encode_json(chunk)
        stream.sent.append(data)
        stream.index += 1
        return data

    def output(self, chunk: HostChunk, now: float) -> Progress | None:
        """The engine's output for a stream: the chunk for the client, and whether it ended
        the stream (or made it wait for an engine). None for a chunk of an attempt that is
        no longer current, or of a stream already ended (a late one)."""
        request_id = self._by_engine.get(chunk.request_id)
        stream = self.streams.get(request_id) if request_id is not None else None
        if stream is None:
            return None
        if chunk.embeddings is not None:
            final = StreamChunk(stream.request_id, 0, finish_reason="stop", usage=chunk.usage)
            ended = self.end(stream.request_id, final, now, chunk.embeddings)
            return Progress(stream, final, ended.data, ended)
        if self._continues(stream, chunk):
            self._by_engine.pop(stream.engine_id, None)
            stream.engine_id = ""
            seam = len(stream.generated) > stream.had_at_submit  # one the client sees
            stream.migrations += seam
            pause = StreamChunk(stream.request_id, stream.index)
            return Progress(stream, pause, b"", None, waits=True, seam=seam)
        ttft = itl = None
        if chunk.token_ids:
            if stream.first_token_at is None:
                stream.first_token_at = now
                ttft = now - stream.received_at
            elif stream.last_chunk_at is not None:
                itl = now - stream.last_chunk_at
            stream.last_chunk_at = now
            stream.generated.extend(chunk.token_ids)
        out = StreamChunk(
            request_id=stream.request_id,
            index=stream.index,
            token_ids=chunk.token_ids,
            text=chunk.text,
            finish_reason=_finish_reason(chunk, stream.ending),
            error=_error(chunk, stream),
            usage=self._usage(stream, chunk.usage),
            logprobs=chunk.logprobs,
            migrations=stream.migrations,
        )
        if out.finish_reason is None:
            data = self.send(stream, out)
            return Progress(stream, out, data, None, ttft, itl, len(chunk.token_ids))
        ended = self.end(stream.request_id, out, now)
        return Progress(stream, out, ended.data, ended, ttft, itl, len(chunk.token_ids))

    def _continues(self, stream: Stream, chunk: HostChunk) -> bool:
        """Whether this chunk's failure is one the stream survives: its engine went away
        (a generate stream, not being stopped, within the migration limit; an attempt
        that streamed nothing is no seam and costs none of it, up to `MAX_ATTEMPTS`)."""
        progressed = len(stream.generated) > stream.had_at_submit
        return (
            chunk.finish_reason == "error"
            and chunk.error_code == "engine_restarting"
            and isinstance(stream.request, GenerateRequest)
            and not stream.ending
            and (stream.migrations < self.migration_limit or not progressed)
            and stream.attempt < MAX_ATTEMPTS
        )

    def _usage(self, stream: Stream, usage: Usage | None) -> Usage | None:
        """The request's usage over all its attempts: the engine of a continuation counts
        the tokens it was given after the prompt as prompt; they were completion."""
        if usage is None:
            return None
        before = len(stream.generated) - usage.completion_tokens  # tokens of earlier attempts
        if before <= 0 and not stream.prompt_tokens:
            stream.prompt_tokens = usage.prompt_tokens
            stream.cached_tokens = usage.cached_tokens
            return usage
        prompt = stream.prompt_tokens or max(0, usage.prompt_tokens - before)
        cached = stream.cached_tokens
        if cached is None:
            cached = min(usage.cached_tokens, prompt)
        return Usage(
            prompt_tokens=prompt, completion_tokens=len(stream.generated), cached_tokens=cached
        )

    # --- the node asking a stream to stop --------------------------------------------------

    def stopping(self, request_id: str, why: Ending) -> Literal["abort", "end", "none"]:
        """The node stops a stream (cancel, deadline): record why, so its end is reported
        as such. `abort`: tell the engine (it ends the stream); `end`: no engine runs it
        (it waits for one), end it here with `stopped_chunk`; `none`: already ending."""
        stream = self.streams.get(request_id)
        if stream is None or stream.ending:
            return "none"
        stream.ending = why
        if stream.engine_id or isinstance(stream.request, EmbedRequest):
            return "abort"
        return "end"

    def stopped_chunk(self, request_id: str) -> StreamChunk | None:
        """The last chunk of a stream the node stopped, ended here (not by its engine):
        `cancelled`, `shutdown`, or the deadline's error. None if it ended meanwhile."""
        stream = self.streams.get(request_id)
        if stream is None:
            return None
        if stream.ending == "cancelled":
            return StreamChunk(request_id, stream.index, finish_reason="cancelled")
        if stream.ending == "shutdown":
            return StreamChunk(request_id, stream.index, finish_reason="shutdown")
        return StreamChunk(
            request_id, stream.index, finish_reason="error", error=deadline_error(stream)
        )

    def engine_id(self, request_id: str) -> str:
        """The current attempt's id in the engine ("" when none runs)."""
        stream = self.streams.get(request_id)
        return stream.engine_id if stream is not None else ""

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
        self._by_engine.pop(stream.engine_id, None)
        if isinstance(stream.request, EmbedRequest):
            data = encode_json(_embed_answer(stream.request, chunk, vectors))
        else:
            data = self.send(stream, chunk)
            self._keep(request_id, stream.sent, stream.first_index, now)
        outcome = chunk.error.code if chunk.error else (chunk.finish_reason or "unknown")
        seconds = now - stream.received_at
        return Ended(request_id, stream.reply, data, outcome, seconds, chunk.usage, stream.direct)

    def handover_request(self, request_id: str) -> GenerateRequest:
        """The request that continues a stream on another node: the client's request with
        what the client already has, streaming to the client's subject."""
        stream = self.streams[request_id]
        request = stream.request
        assert isinstance(request, GenerateRequest)
        cont = Continuation(
            token_ids=list(stream.generated),
            next_index=stream.index,
            migrations=stream.migrations + 1,
            prompt_tokens=stream.prompt_tokens,
            cached_tokens=stream.cached_tokens or 0,
            reply_to=stream.reply,
        )
        return msgspec.structs.replace(request, continuation=cont)

    def handed_over(self, request_id: str, now: float) -> str:
        """The stream went on elsewhere: forget it (its chunks so far stay for resume) and
        return its attempt's engine id, to abort."""
        stream = self.streams.pop(request_id)
        self._by_engine.pop(stream.engine_id, None)
        self._keep(request_id, stream.sent, stream.first_index, now)
        return stream.engine_id

    def refused(self, request_id: str, data: bytes, now: float) -> None:
        """A refusal was published for `request_id`: keep it for resume, unless the id
        belongs to a stream in flight or kept (a duplicate id must not replace it)."""
        if request_id and not self.known(request_id):
            self._keep(request_id, [data], 0, now)

    # --- resume --------------------------------------------------------------------------

    def resume(self, request_id: str, from_index: int, now: float) -> tuple[list[bytes], bool]:
        """The chunks of a stream from `from_index` on, and whether it ended. Raises
        KeyError for a stream this table does not hold (another handler's or node's)."""
        self.prune(now)
        stream = self.streams.get(request_id)
        if stream is not None:
            return stream.sent[max(0, from_index - stream.first_index) :], False
        kept = self._ended[request_id]
        return kept.sent[max(0, from_index - kept.first_index) :], True

    def _keep(self, request_id: str, sent: list[bytes], first_index: int, now: float) -> None:
        kept = _Kept(now, sent, sum(len(chunk) for chunk in sent), first_index)
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
    # the host sends only these (the cast as a string: `FinishReason | None` evaluated
    # would build a typing union on every chunk)
    return cast("FinishReason | None", chunk.finish_reason)


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
