"""`HandlerActor`: the request plane. One of a pool; each takes requests from NATS.

A request is decoded and checked (bad input gets one `invalid_request` chunk naming the
field, and the handler carries on), submitted to the EngineActor, and its output streamed
chunk by chunk to the reply subject. Every accepted request ends with a finish reason:
tokens, `cancelled`, `shutdown`, or `error` with a code. On stop the handler takes no new
requests, lets in-flight ones finish within the drain timeout, then ends the rest with
`shutdown`.

Chunks can be lost in transit (a NATS server restart drops what it was carrying), so the
handler keeps every stream's chunks while it runs and for `handlers.resume_window` seconds
after it ended (within `handlers.resume_buffer_bytes`); a client that sees a gap, or hears
nothing for a while, asks on the resume subject and gets them again.

What to do with each stream is decided by its pure core, `actors.streams.table`; this
actor decodes, calls the core, and carries out what it returns (publish, abort, timers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
import pykka

from actors.nats.link import NatsLink
from actors.streams.modes import shape_request
from actors.streams.table import Progress, StreamTable
from actors.telemetry import node_metrics
from messages.codec import DecodeError, decode_json, encode_json
from messages.engine import HostChunk
from messages.node import (
    AbortGenerate,
    EngineOutputs,
    GetLink,
    IncomingCancel,
    IncomingRequest,
    IncomingResume,
    SubmitEmbed,
    SubmitGenerate,
)
from messages.request import (
    CancelRequest,
    EmbedRequest,
    EmbedResponse,
    ErrorCode,
    GenerateRequest,
    ResumeRequest,
    StreamChunk,
    error_chunk,
    error_info,
)
from supervisor.config import HandlersSection
from supervisor.core import (
    ChildContext,
    ExitReason,
    Shutdown,
    StopRequest,
    SupervisedActor,
    ask,
    whereis,
)
from supervisor.plan import HandlerSettings

__all__ = ["HandlerActor"]

_DEADLINE_GRACE = 1.0  # after aborting a late request, wait this long for the engine to end it
_RESTARTING = "the engine is (re)starting; retry shortly"


@dataclass(frozen=True)
class _Deadline:
    """A stream's timeout ran out: ask the engine to stop it."""

    request_id: str


@dataclass(frozen=True)
class _DeadlineGrace:
    """The engine did not end a late stream in time: end it here."""

    request_id: str


@dataclass(frozen=True)
class _DrainDeadline:
    """The drain timeout ran out: end the streams left with `shutdown`."""


class HandlerActor(SupervisedActor):
    """Serves generate requests for the node; see the module docstring."""

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
        self.table = StreamTable(
            self.limits.default_deadline,
            self.limits.resume_window,
            self.limits.resume_buffer_bytes,
        )
        self._timers: dict[str, list[Any]] = {}
        self._outbox: list[tuple[str, bytes, str]] | None = None
        self._draining = False

    # --- start and stop ------------------------------------------------------------------

    def on_start_up(self) -> None:
        self.link = ask(self.fabric_path, GetLink(), timeout=10)
        ref = self.actor_ref
        clock = self.context.clock

        def on_request(subject: str, reply: str, data: bytes) -> None:
            ref.tell(IncomingRequest(subject, reply, data, clock.now()))

        def on_cancel(_subject: str, _reply: str, data: bytes) -> None:
            ref.tell(IncomingCancel(data))

        def on_resume(_subject: str, reply: str, data: bytes) -> None:
            ref.tell(IncomingResume(reply, data))

        assert self.link is not None
        self._subscriptions = [
            self.link.subscribe(self.subjects.generate, on_request, queue=self.subjects.generate),
            self.link.subscribe(self.subjects.instance, on_request, queue=self.subjects.instance),
            self.link.subscribe(self.subjects.cancel, on_cancel),
        ]
        if self.subjects.resume:
            self._subscriptions.append(self.link.subscribe(self.subjects.resume, on_resume))
        max_payload = self.link.nc.max_payload if self.link.nc is not None else 0
        if 0 < max_payload <= self.limits.max_request_bytes:
            self.log.warning(  # an external server's limit: its refusal is what users see
                "requests over the NATS server's max_payload fail in the client's NATS "
                "library before handlers.max_request_bytes can refuse them",
                max_payload=max_payload,
                max_request_bytes=self.limits.max_request_bytes,
            )

    def on_stop_request(self, request: StopRequest) -> None:
        # Not a blocking drain: the actor keeps handling engine output while it drains.
        if request.brutal:
            self.exit(Shutdown(detail=request.reason))
            return
        self._draining = True
        self._unsubscribe()
        if not self.table:
            self.exit(Shutdown(detail=request.reason))
            return
        self.log.info("draining", inflight=len(self.table), timeout=self.drain_timeout)
        self.send_after(self.drain_timeout, _DrainDeadline())

    def on_exit(self, reason: ExitReason) -> None:
        self._unsubscribe()
        error: tuple[ErrorCode, str] | None = None
        if not isinstance(reason, Shutdown):
            error = ("internal", f"handler failed: {reason.describe()}")
        self._close_all(error)

    def _close_all(self, error: tuple[ErrorCode, str] | None) -> None:
        """End every stream in flight (`shutdown`, or `error`), aborting it in the engine."""
        for chunk in self.table.closing_chunks(error):
            self._abort_in_engine(chunk.request_id, "shutdown")
            self._end(chunk.request_id, chunk)

    def _unsubscribe(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        if self.link is not None:
            for subscription in subscriptions:
                self.link.unsubscribe(subscription)

    # --- messages -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case IncomingRequest():
                try:
                    self._on_request(message)
                except Exception as exc:
                    # A bug, not the client's fault: answer before crashing, never leave it waiting.
                    if message.reply:
                        why = f"{type(exc).__name__}: {exc}"
                        self._reject(message.reply, _request_id_of(message.data), "internal", why)
                    raise
            case EngineOutputs(chunks=chunks):
                self._outbox = []  # the batch's publishes go out together
                try:
                    for chunk in chunks:
                        self._on_output(chunk)
                finally:
                    outbox, self._outbox = self._outbox, None
                    if outbox and self.link is not None:
                        self.link.publish_many(outbox)
            case IncomingCancel(data=data):
                self._on_cancel(data)
            case IncomingResume():
                self._on_resume(message)
            case _Deadline(request_id=request_id):
                if self.table.stopping(request_id, "deadline_exceeded"):
                    self._abort_in_engine(request_id, "deadline_exceeded")
                    self._stream_timer(request_id, _DEADLINE_GRACE, _DeadlineGrace(request_id))
            case _DeadlineGrace(request_id=request_id):
                late = self.table.deadline_chunk(request_id)
                if late is not None:
                    self._end(request_id, late)
            case _DrainDeadline():
                if self.table:
                    self.log.warning(
                        "drain timeout: ending the rest with shutdown", remaining=len(self.table)
                    )
                self._close_all(None)
                self.exit(Shutdown(detail="drained"))
            case _:
                return super().handle(message)
        return None

    # --- requests -----------------------------------------------------------------------

    def _on_request(self, message: IncomingRequest) -> None:
        reply = message.reply
        if not reply:
            node_metrics.REQUESTS.labels("no_reply_subject").inc()
            self.log.warning("request without a reply subject dropped", subject=message.subject)
            return
        if self._draining:
            self._reject(reply, "", "not_ready", "the node is stopping; send the request elsewhere")
            return
        size = len(message.data)
        if size > self.limits.max_request_bytes:
            why = (
                f"the request is {size} bytes; the limit is "
                f"{self.limits.max_request_bytes} (handlers.max_request_bytes)"
            )
            self._reject(reply, "", "invalid_request", why)
            return
        if self.mode == "embedding":
            self._on_embed_request(message)
            return
        try:
            request = decode_json(message.data, GenerateRequest)
        except DecodeError as exc:
            rid = _request_id_of(message.data)
            self._reject(reply, rid, "invalid_request", str(exc), exc.field)
            return
        shaped = shape_request(request, self.mode, self.disaggregation)
        problem = _limit_problem(request, self.limits) or shaped.problem
        if problem is not None or shaped.request is None:
            field_name, text = problem or ("", "refused")
            self._reject(reply, request.request_id, "invalid_request", text, field_name)
            return
        request = shaped.request
        engine = self._admissible(reply, request.request_id)
        if engine is None:
            return
        stream = self._open(request, message)
        if shaped.first is not None:
            self._publish(stream.reply, self.table.send(stream, shaped.first))
        submit = SubmitGenerate(
            request, reply_path=self.context.path, max_prompt_tokens=self.limits.max_prompt_tokens
        )
        self._tell_engine(engine, request.request_id, submit)

    def _admissible(self, reply: str, request_id: str) -> Any:
        """The engine actor to submit to, or None after refusing the request (a duplicate
        id in flight, or no engine now)."""
        if request_id in self.table:
            why = "request_id is already in flight"
            self._reject(reply, request_id, "invalid_request", why, "request_id")
            return None
        engine = whereis(self.engine_path)
        if engine is None:
            self._reject(reply, request_id, "engine_restarting", _RESTARTING)
        return engine

    def _open(self, request: GenerateRequest | EmbedRequest, message: IncomingRequest) -> Any:
        stream = self.table.open(request, message.reply, message.received_at)
        remaining = stream.deadline_at - self.context.clock.now()
        self._stream_timer(request.request_id, max(0.0, remaining), _Deadline(request.request_id))
        return stream

    def _tell_engine(
        self, engine: Any, request_id: str, message: SubmitGenerate | SubmitEmbed
    ) -> None:
        try:
            engine.tell(message)
        except pykka.ActorDeadError:  # it stopped between the lookup and the tell
            gone = HostChunk(
                request_id,
                finish_reason="error",
                error_code="engine_restarting",
                error_message=_RESTARTING,
            )
            self._on_output(gone)

    def _on_embed_request(self, message: IncomingRequest) -> None:
        try:
            request = decode_json(message.data, EmbedRequest)
        except DecodeError as exc:
            try:  # a generate request sent here by mistake: answer in its own format
                generate = decode_json(message.data, GenerateRequest)
            except DecodeError:
                pass
            else:
                why = "this is an embedding node: send an EmbedRequest (input)"
                self._reject(message.reply, generate.request_id, "invalid_request", why)
                return
            rid = _request_id_of(message.data)
            self._reject_embed(message.reply, rid, "invalid_request", str(exc), exc.field)
            return
        texts, token_ids, problem = request.normalized()
        if problem is not None:
            rid = request.request_id
            self._reject_embed(message.reply, rid, "invalid_request", problem, "input")
            return
        engine = whereis(self.engine_path)
        if engine is None or request.request_id in self.table:
            code: ErrorCode = "engine_restarting" if engine is None else "invalid_request"
            why = _RESTARTING if engine is None else "request_id is already in flight"
            self._reject_embed(message.reply, request.request_id, code, why)
            return
        self._open(request, message)
        submit = SubmitEmbed(
            request,
            texts,
            token_ids,
            reply_path=self.context.path,
            max_prompt_tokens=self.limits.max_prompt_tokens,
        )
        self._tell_engine(engine, request.request_id, submit)

    # --- engine output, cancel, resume ----------------------------------------------------

    def _on_output(self, chunk: HostChunk) -> None:
        progress = self.table.output(chunk, self.context.clock.now())
        if progress is None:
            return  # a late chunk for a request already ended (deadline, shutdown)
        _observe(progress)
        self._publish(progress.stream.reply, progress.data)
        if progress.ended is not None:
            self._after_end(progress.ended.request_id)

    def _on_cancel(self, data: bytes) -> None:
        try:
            cancel = decode_json(data, CancelRequest)
        except DecodeError:
            return  # another node's business to complain; ours only if we know the id
        if self.table.stopping(cancel.request_id, "cancelled"):
            self._abort_in_engine(cancel.request_id, "cancelled")

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
        self._publish(ended.reply, ended.data)
        self._after_end(request_id)

    def _after_end(self, request_id: str) -> None:
        for timer in self._timers.pop(request_id, []):
            timer.cancel()
        if self._draining and not self.table:
            self.exit(Shutdown(detail="drained"))

    def _stream_timer(self, request_id: str, delay: float, message: Any) -> None:
        self._timers.setdefault(request_id, []).append(self.send_after(delay, message))

    def _abort_in_engine(self, request_id: str, reason: str) -> None:
        engine = whereis(self.engine_path)
        if engine is not None:
            engine.tell(AbortGenerate(request_id, reason))

    def _publish(self, reply: str, data: bytes) -> None:
        assert self.link is not None
        if self._outbox is not None:
            self._outbox.append((reply, data, ""))
        else:
            self.link.publish(reply, data)

    def _reject(
        self, reply: str, request_id: str, code: ErrorCode, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        data = encode_json(error_chunk(request_id, 0, code, message, field_name))
        self._publish(reply, data)
        self.table.refused(request_id, data, self.context.clock.now())

    def _reject_embed(
        self, reply: str, request_id: str, code: ErrorCode, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        error = error_info(code, message, field_name)
        self._publish(reply, encode_json(EmbedResponse(request_id=request_id, error=error)))


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


def _limit_problem(request: GenerateRequest, limits: HandlersSection) -> tuple[str, str] | None:
    """The first limit the request breaks: (field, message), or None."""
    problem = request.input_problem()
    if problem is not None:
        return request.input_field(), problem
    if request.stop.max_tokens > limits.max_tokens_limit:
        return "stop.max_tokens", (
            f"max_tokens {request.stop.max_tokens} exceeds the limit "
            f"{limits.max_tokens_limit} (handlers.max_tokens_limit)"
        )
    if request.stop.min_tokens > request.stop.max_tokens:
        return "stop.min_tokens", "min_tokens exceeds max_tokens"
    if request.token_ids is not None and len(request.token_ids) > limits.max_prompt_tokens:
        return "token_ids", (
            f"the prompt has {len(request.token_ids)} tokens; the limit is "
            f"{limits.max_prompt_tokens} (handlers.max_prompt_tokens)"
        )
    return None


def _request_id_of(data: bytes) -> str:
    """Best effort: the request_id of a request that did not decode, to label the error."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # malformed, invalid UTF-8, absurdly deep
        return ""
    rid = value.get("request_id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else ""
