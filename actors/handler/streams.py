"""The handler's streams: its state and the carrying out of what the stream table decides.

`HandlerStreams` is the base of `HandlerActor` (see `actors.handler` for the request
plane as a whole): it holds the stream table (kept across a crash of the actor, in
the supervisor's handover), opens streams and submits their attempts to the engine, turns
engine output, cancels and resume requests into what the table says to publish, and ends
streams (timers, aborts in the engine, metrics). Admission of new requests is in
`actors.handler.admission`; start, stop, drain and hand-over in
`actors.handler.actor`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import msgspec
import pykka

from actors.nats.link import NatsLink
from actors.streams.table import Ending, Progress, StreamTable
from actors.telemetry import node_metrics
from messages.codec import DecodeError, decode_json, encode_json
from messages.engine import HostChunk
from messages.node import (
    AbortGenerate,
    IncomingResume,
    SubmitEmbed,
    SubmitGenerate,
)
from messages.request import (
    CancelRequest,
    DirectReply,
    EmbedRequest,
    ErrorCode,
    GenerateRequest,
    ResumeRequest,
    StreamChunk,
    error_chunk,
)
from supervisor.core import ChildContext, LoopActor, Shutdown, whereis
from supervisor.plan import HandlerSettings

__all__ = ["RESTARTING", "DeadlineGrace", "HandlerStreams", "RetrySubmit", "StreamDeadline"]

_DEADLINE_GRACE = 1.0  # after aborting a late request, wait this long for the engine to end it
RESTARTING = "the engine is (re)starting; retry shortly"
_RETRY_EVERY = 0.2  # while streams wait for an engine, look for one this often


@dataclass(frozen=True)
class StreamDeadline:
    """A stream's timeout ran out: ask the engine to stop it."""

    request_id: str


@dataclass(frozen=True)
class DeadlineGrace:
    """The engine did not end a late stream in time: end it here."""

    request_id: str


@dataclass(frozen=True)
class RetrySubmit:
    """Streams wait for an engine: submit them if one runs again."""


class HandlerStreams(LoopActor):
    """The streams of one handler and what is done to them (see the module docstring)."""

    def __init__(self, context: ChildContext, settings: HandlerSettings) -> None:
        super().__init__(context)
        self.mode = settings.mode
        self.disaggregation = settings.disaggregation
        self.fabric_path = settings.fabric
        self.engine_path = settings.engine_actor
        self.subjects = settings.subjects
        self.limits = settings.limits
        self.drain_timeout = settings.drain_timeout
        self.link: NatsLink | None = None
        self._subscriptions: list[Any] = []
        # The streams outlive a crash of this actor: the supervisor keeps them for the next
        # incarnation of this child (context.handover), which continues them.
        adopted = context.handover.get("table")
        self.table: StreamTable = (
            adopted
            if isinstance(adopted, StreamTable)
            else StreamTable(
                self.limits.default_deadline,
                self.limits.resume_window,
                self.limits.resume_buffer_bytes,
                self.limits.migration_limit,
            )
        )
        context.handover["table"] = self.table
        self._adopted = adopted is not None
        self._timers: dict[str, list[Any]] = {}
        self._outbox: list[tuple[str, bytes, str]] | None = None
        self._draining = False
        self._crashed = False
        self._retry: Any = None  # the armed RetrySubmit timer
        # A drain's hand-over: streams still to offer, the one on offer, its held output.
        self._to_offer: list[str] = []
        self._offering = ""
        self._held: list[HostChunk] = []
        self._moved = 0

    # --- opening and submitting ---------------------------------------------------------

    def _open(self, request: GenerateRequest | EmbedRequest, reply: str, received_at: float) -> Any:
        stream = self.table.open(request, reply, received_at)
        remaining = stream.deadline_at - self.context.clock.now()
        self._stream_timer(
            request.request_id, max(0.0, remaining), StreamDeadline(request.request_id)
        )
        return stream

    def _submit(self, request_id: str, engine: Any) -> None:
        """Submit a stream's next attempt to the engine (or end it, if it already has every
        token it may)."""
        if self.table.complete(request_id):
            stream = self.table.streams[request_id]
            self._end(request_id, StreamChunk(request_id, stream.index, finish_reason="length"))
            return
        submission = self.table.submit(request_id)
        message = SubmitGenerate(
            submission.request,
            reply_path=self.context.path,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            engine_id=submission.engine_id,
            continuation_ids=submission.continuation_ids,
        )
        self._tell_engine(engine, submission.engine_id, message)

    def _tell_engine(
        self, engine: Any, engine_id: str, message: SubmitGenerate | SubmitEmbed
    ) -> None:
        try:
            engine.tell(message)
        except pykka.ActorDeadError:  # it stopped between the lookup and the tell
            gone = HostChunk(
                engine_id,
                finish_reason="error",
                error_code="engine_restarting",
                error_message=RESTARTING,
            )
            self._on_output(gone)

    def _retry_soon(self, delay: float = _RETRY_EVERY) -> None:
        if self._retry is None:
            self._retry = self.send_after(delay, RetrySubmit())

    def _submit_waiting(self) -> None:
        """Submit the streams that wait for an engine, once a new one runs."""
        waiting = self.table.waiting()
        if not waiting:
            return
        # An engine actor still dying takes the submission into an inbox it never reads and
        # answers it (on_undelivered): that attempt streams nothing and costs no seam.
        engine = whereis(self.engine_path)
        if engine is None:
            self._retry_soon()
            return
        self.log.info("continuing streams on the engine", streams=len(waiting))
        for request_id in waiting:
            self._submit(request_id, engine)

    # --- engine output, cancel, resume ----------------------------------------------------

    def _on_output(self, chunk: HostChunk) -> None:
        progress = self.table.output(chunk, self.context.clock.now())
        if progress is None:
            return  # a late chunk: its attempt was abandoned, or its stream ended
        if progress.waits:  # its engine went away: the stream continues on the next one
            if progress.seam:
                node_metrics.MIGRATIONS.labels("engine_lost").inc()
            self._retry_soon()
            return
        _observe(progress)
        stream = progress.stream
        self._publish(stream.reply, progress.data, stream.direct)
        if progress.ended is not None:
            self._forget_route(stream.reply)
            self._after_end(progress.ended.request_id)

    def _on_cancel(self, data: bytes) -> None:
        try:
            cancel = decode_json(data, CancelRequest)
        except DecodeError:
            return  # another node's business to complain; ours only if we know the id
        stream = self.table.streams.get(cancel.request_id)
        below = cancel.below_migrations
        if stream is None or (below is not None and stream.migrations >= below):
            return  # not ours, or the copy its client moved elsewhere asks to keep
        self._stop_stream(cancel.request_id, "cancelled")

    def _stop_stream(self, request_id: str, why: Ending) -> None:
        """Stop a stream (cancel, deadline): through its engine, or here if none runs it."""
        match self.table.stopping(request_id, why):
            case "abort":
                self._abort_in_engine(self.table.engine_id(request_id), why)
                if why == "deadline_exceeded":
                    self._stream_timer(request_id, _DEADLINE_GRACE, DeadlineGrace(request_id))
            case "end":
                chunk = self.table.stopped_chunk(request_id)
                if chunk is not None:
                    self._end(request_id, chunk)
            case "none":
                pass

    def _on_resume(self, message: IncomingResume) -> None:
        if not message.reply:
            return  # nowhere to answer
        try:
            asked = decode_json(message.data, ResumeRequest)
        except DecodeError:
            return  # not ours to answer: nobody knows who should
        try:
            chunks, ended = self.table.resume(
                asked.request_id, asked.from_index, self.context.clock.now()
            )
        except KeyError:
            return  # another handler's or node's, or forgotten: the client hears silence
        answer = {
            "request_id": asked.request_id,
            "chunks": [msgspec.Raw(chunk) for chunk in chunks],
            "ended": ended,
        }
        node_metrics.RESUMES.labels("ended" if ended else "running").inc()
        self.log.info(
            "stream resumed",
            request_id=asked.request_id,
            from_index=asked.from_index,
            chunks=len(chunks),
            ended=ended,
        )
        assert self.link is not None
        self.link.publish(message.reply, msgspec.json.encode(answer))

    # --- carrying out the core's decisions -------------------------------------------------

    def _end(self, request_id: str, chunk: StreamChunk) -> None:
        ended = self.table.end(request_id, chunk, self.context.clock.now())
        _count_end(ended.outcome, ended.seconds, ended.usage)
        self._publish(ended.reply, ended.data, ended.direct)
        self._forget_route(ended.reply)
        self._after_end(request_id)

    def _after_end(self, request_id: str, exiting: bool = False) -> None:
        for timer in self._timers.pop(request_id, []):
            timer.cancel()
        if self._draining and not self.table and not exiting:
            self.exit(Shutdown(detail="drained"))

    def _stream_timer(self, request_id: str, delay: float, message: Any) -> None:
        self._timers.setdefault(request_id, []).append(self.send_after(delay, message))

    def _abort_in_engine(self, engine_id: str, reason: str) -> None:
        engine = whereis(self.engine_path)
        if engine is not None and engine_id:
            with contextlib.suppress(pykka.ActorDeadError):
                engine.tell(AbortGenerate(engine_id, reason))

    def _close_all(self) -> None:
        """End every stream in flight with `shutdown`, aborting it in the engine."""
        for chunk in self.table.closing_chunks():
            self._abort_in_engine(self.table.engine_id(chunk.request_id), "shutdown")
            self._end(chunk.request_id, chunk)

    def _publish(self, reply: str, data: bytes, direct: DirectReply | None = None) -> None:
        """Send one message of a stream: straight to its frontend if it asked and the
        stream goes direct (see `actors.streams.direct`), else through NATS."""
        assert self.link is not None
        if direct is not None and self.link.direct.send(direct, reply, data):
            return
        if self._outbox is not None:
            self._outbox.append((reply, data, ""))
        else:
            self.link.publish(reply, data)

    def _forget_route(self, reply: str) -> None:
        if self.link is not None:
            self.link.direct.forget(reply)

    def _reject(
        self, reply: str, request_id: str, code: ErrorCode, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        data = encode_json(error_chunk(request_id, 0, code, message, field_name))
        self._publish(reply, data)
        self.table.refused(request_id, data, self.context.clock.now())


def _observe(progress: Progress) -> None:
    """The node's metrics for one engine output."""
    if progress.ttft is not None:
        node_metrics.TTFT.observe(progress.ttft)
    if progress.itl is not None:
        node_metrics.ITL.observe(progress.itl)
    if progress.tokens:
        node_metrics.TOKENS_OUT.inc(progress.tokens)
    if progress.ended is not None:
        ended = progress.ended
        _count_end(ended.outcome, ended.seconds, ended.usage)


def _count_end(outcome: str, seconds: float, usage: Any) -> None:
    node_metrics.REQUESTS.labels(outcome).inc()
    node_metrics.E2E.observe(seconds)
    if usage is not None:
        node_metrics.TOKENS_IN.inc(usage.prompt_tokens)
        node_metrics.CACHED_TOKENS.inc(usage.cached_tokens)
