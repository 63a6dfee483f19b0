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

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import msgspec
import pykka

from actors.nats.link import NatsLink
from actors.streams.handover import offer_handover
from actors.streams.modes import shape_request
from actors.streams.table import Ending, Progress, StreamTable
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
    HandoverReply,
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
_RETRY_EVERY = 0.2  # while streams wait for an engine, look for one this often


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
    """The drain timeout ran out: hand the streams left over, or end them with `shutdown`."""


@dataclass(frozen=True)
class _Retry:
    """Streams wait for an engine: submit them if one runs again."""


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
        self._retry: Any = None  # the armed _Retry timer

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
        if self._adopted:
            self._continue_adopted()
        for message in self.context.handover.pop("pending", []):
            self.actor_ref.tell(message)  # requests the crashed incarnation never read

    def _continue_adopted(self) -> None:
        """The previous incarnation crashed with streams in flight: abandon their engine
        attempts (their chunks may have been lost with it) and continue each from what its
        client has, with its deadline."""
        now = self.context.clock.now()
        for request_id, stream in list(self.table.streams.items()):
            old = self.table.suspend(request_id)
            if old:
                self._abort_in_engine(old, "shutdown")
            node_metrics.MIGRATIONS.labels("handler_crash").inc()
            self._stream_timer(
                request_id, max(0.0, stream.deadline_at - now), _Deadline(request_id)
            )
        self.log.warning("continuing the crashed incarnation's streams", streams=len(self.table))
        self._retry_soon(0.0)

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
        if isinstance(reason, Shutdown):
            self._close_all()
            self.context.handover.pop("table", None)
            return
        # A crash: the streams stay in the handover for the next incarnation, which
        # continues them; nothing is said to their clients, who only see a pause.
        self._crashed = True
        self.log.warning(
            "handler crashed; its streams wait for its restart", streams=len(self.table)
        )

    def on_undelivered(self, message: Any) -> None:
        if not isinstance(message, IncomingRequest):
            return
        if self._crashed:  # the next incarnation reads it
            self.context.handover.setdefault("pending", []).append(message)
        elif message.reply:
            why = "the node is stopping; send the request elsewhere"
            self._reject(message.reply, _request_id_of(message.data), "not_ready", why)

    def _close_all(self) -> None:
        """End every stream in flight with `shutdown`, aborting it in the engine."""
        for chunk in self.table.closing_chunks():
            self._abort_in_engine(self.table.engine_id(chunk.request_id), "shutdown")
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
                self._stop_stream(request_id, "deadline_exceeded")
            case _DeadlineGrace(request_id=request_id):
                late = self.table.stopped_chunk(request_id)
                if late is not None:
                    self._end(request_id, late)
            case _Retry():
                self._retry = None
                self._submit_waiting()
            case _DrainDeadline():
                self._drain_deadline()
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
        cont = request.continuation
        # A stream handed over by a draining node streams to its client's subject, and the
        # node that handed it over hears whether it was taken.
        handover = cont is not None and bool(cont.reply_to)
        stream_to = cont.reply_to if cont is not None and cont.reply_to else reply
        answer_to = reply if handover else ""
        engine = self._admissible(stream_to, request, answer_to)
        if engine is None:
            return
        stream = self._open(request, stream_to, message.received_at)
        if answer_to:
            self._publish(answer_to, encode_json(HandoverReply(accepted=True)))
        if cont is not None:
            node_metrics.MIGRATIONS.labels("taken_over").inc()
            self.log.info(
                "continuing a stream begun elsewhere",
                request_id=request.request_id,
                from_index=cont.next_index,
                tokens=len(cont.token_ids),
                migrations=cont.migrations,
            )
        if shaped.first is not None:
            self._publish(stream.reply, self.table.send(stream, shaped.first))
        self._submit(request.request_id, engine)

    def _admissible(self, reply: str, request: GenerateRequest, answer_to: str) -> Any:
        """The engine actor to submit to, or None after refusing the request (a duplicate
        id in flight, or no engine now). A continuation of a stream this handler still
        holds at fewer migrations replaces it (its client moved it here)."""
        request_id = request.request_id
        held = self.table.streams.get(request_id)
        cont = request.continuation
        if held is not None and cont is not None and held.migrations < cont.migrations:
            self._abort_in_engine(
                self.table.handed_over(request_id, self.context.clock.now()), "cancelled"
            )
            self._after_end(request_id)
        elif held is not None:
            why = "request_id is already in flight"
            self._refuse(reply, request_id, answer_to, ("invalid_request", why, "request_id"))
            return None
        engine = whereis(self.engine_path)
        if engine is None:
            self._refuse(reply, request_id, answer_to, ("engine_restarting", _RESTARTING, ""))
        return engine

    def _refuse(
        self, reply: str, request_id: str, answer_to: str, why: tuple[ErrorCode, str, str]
    ) -> None:
        """Refuse a request: to its client, or, for a handover, to the node handing it."""
        if not answer_to:
            self._reject(reply, request_id, *why)
            return
        code, message, field_name = why
        node_metrics.REQUESTS.labels(code).inc()
        refusal = HandoverReply(accepted=False, error=error_info(code, message, field_name))
        self._publish(answer_to, encode_json(refusal))

    def _open(self, request: GenerateRequest | EmbedRequest, reply: str, received_at: float) -> Any:
        stream = self.table.open(request, reply, received_at)
        remaining = stream.deadline_at - self.context.clock.now()
        self._stream_timer(request.request_id, max(0.0, remaining), _Deadline(request.request_id))
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
                error_message=_RESTARTING,
            )
            self._on_output(gone)

    def _retry_soon(self, delay: float = _RETRY_EVERY) -> None:
        if self._retry is None:
            self._retry = self.send_after(delay, _Retry())

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
        self._open(request, message.reply, message.received_at)
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
            return  # a late chunk: its attempt was abandoned, or its stream ended
        if progress.waits:  # its engine went away: the stream continues on the next one
            if progress.seam:
                node_metrics.MIGRATIONS.labels("engine_lost").inc()
            self._retry_soon()
            return
        _observe(progress)
        self._publish(progress.stream.reply, progress.data)
        if progress.ended is not None:
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
                    self._stream_timer(request_id, _DEADLINE_GRACE, _DeadlineGrace(request_id))
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
        self._publish(ended.reply, ended.data)
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

    # --- a stop: streams handed over, or ended ---------------------------------------------

    def _drain_deadline(self) -> None:
        """The drain timeout ran out with streams still running: hand each over to another
        instance (a continuation that streams to the same client), else end it."""
        if self.table and self.limits.handover_on_drain:
            moved = self._hand_over_all()
            if moved:
                self.log.info("streams handed over to another instance", streams=moved)
        if self.table:
            self.log.warning(
                "drain timeout: ending the rest with shutdown", remaining=len(self.table)
            )
        self._close_all()
        self.exit(Shutdown(detail="drained"))

    def _hand_over_all(self) -> int:
        assert self.link is not None
        moved = 0
        for request_id in list(self.table.streams):
            stream = self.table.streams[request_id]
            if not isinstance(stream.request, GenerateRequest) or stream.ending:
                continue
            request = self.table.handover_request(request_id)
            if stream.migrations >= self.limits.migration_limit:
                continue
            answer = offer_handover(self.link, self.subjects.generate, request)
            if answer is None or not answer.accepted:
                break  # no instance takes streams now: the rest end here
            engine_id = self.table.handed_over(request_id, self.context.clock.now())
            self._abort_in_engine(engine_id, "shutdown")
            self._after_end(request_id, exiting=True)
            node_metrics.MIGRATIONS.labels("handed_over").inc()
            moved += 1
        return moved

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
