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
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka

from actors import node_metrics
from actors.nats_link import NatsLink
from actors.serving_modes import shape_request
from messages.codec import DecodeError, decode_json, encode_json
from messages.control import ExitReason, Shutdown, StopRequest
from messages.discovery import Subjects
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
    Tick,
)
from messages.request import (
    ERROR_CODES,
    CancelRequest,
    EmbedRequest,
    EmbedResponse,
    ErrorInfo,
    GenerateRequest,
    ResumeRequest,
    StreamChunk,
    error_chunk,
)
from supervisor import ChildContext, SupervisedActor, ask, whereis
from supervisor._clock import Timer
from supervisor.config import DisaggregationSection, HandlersSection

__all__ = ["HandlerActor"]

_DEADLINE_GRACE = 1.0  # after aborting a late request, wait this long for the engine to end it


@dataclass
class _Stream:
    request: GenerateRequest | EmbedRequest
    reply: str
    received_at: float
    index: int = 0
    first_token_at: float | None = None
    last_chunk_at: float | None = None
    ending: str = ""  # why we asked the engine to stop it: cancelled | deadline_exceeded | shutdown
    timers: list[Timer] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # the chunks published, for resume


@dataclass
class _Ended:
    """An ended stream's chunks, kept for resume requests."""

    ended_at: float
    sent: list[bytes]
    size: int


class HandlerActor(SupervisedActor):
    """Serves generate requests for the node; see the module docstring."""

    def __init__(
        self,
        context: ChildContext,
        fabric_path: str,
        engine_path: str,
        subjects: Subjects,
        limits: HandlersSection,
        drain_timeout: float,
        mode: str = "aggregated",
        disaggregation: DisaggregationSection | None = None,
    ) -> None:
        super().__init__(context)
        self.mode = mode
        self.disaggregation = disaggregation or DisaggregationSection()
        self.fabric_path = fabric_path
        self.engine_path = engine_path
        self.subjects = subjects
        self.limits = limits
        self.drain_timeout = drain_timeout
        self.link: NatsLink | None = None
        self._subscriptions: list[Any] = []
        self._streams: dict[str, _Stream] = {}
        self._outbox: list[tuple[str, bytes, str]] | None = None
        self._draining = False
        self._ended: collections.OrderedDict[str, _Ended] = collections.OrderedDict()
        self._ended_bytes = 0

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
        if not self._streams:
            self.exit(Shutdown(detail=request.reason))
            return
        self.log.info("draining", inflight=len(self._streams), timeout=self.drain_timeout)
        self._later(self.drain_timeout, Tick("drain_deadline"))

    def on_exit(self, reason: ExitReason) -> None:
        self._unsubscribe()
        why = (
            "the node is stopping"
            if isinstance(reason, Shutdown)
            else f"handler failed: {reason.describe()}"
        )
        for request_id in list(self._streams):
            self._abort_in_engine(request_id, "shutdown")
            if isinstance(reason, Shutdown):
                self._end_stream(
                    request_id,
                    StreamChunk(
                        request_id, self._streams[request_id].index, finish_reason="shutdown"
                    ),
                )
            else:
                self._end_stream(
                    request_id,
                    error_chunk(request_id, self._streams[request_id].index, "internal", why),
                )

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
            case Tick(kind=kind) if kind.startswith("deadline:"):
                self._on_deadline(kind.removeprefix("deadline:"))
            case Tick(kind=kind) if kind.startswith("deadline_grace:"):
                self._on_deadline_grace(kind.removeprefix("deadline_grace:"))
            case Tick(kind="drain_deadline"):
                self._on_drain_deadline()
            case _:
                return super().handle(message)
        return None

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
            self._reject(
                reply,
                "",
                "invalid_request",
                f"the request is {size} bytes; the limit is "
                f"{self.limits.max_request_bytes} (handlers.max_request_bytes)",
            )
            return
        if self.mode == "embedding":
            self._on_embed_request(message)
            return
        try:
            request = decode_json(message.data, GenerateRequest)
        except DecodeError as exc:
            self._reject(
                reply, _request_id_of(message.data), "invalid_request", str(exc), exc.field
            )
            return
        shaped = shape_request(request, self.mode, self.disaggregation)
        problem = _limit_problem(request, self.limits) or shaped.problem
        if problem is not None or shaped.request is None:
            field_name, text = problem or ("", "refused")
            self._reject(reply, request.request_id, "invalid_request", text, field_name)
            return
        request = shaped.request
        if request.request_id in self._streams:
            self._reject(
                reply,
                request.request_id,
                "invalid_request",
                "request_id is already in flight",
                "request_id",
            )
            return
        engine = whereis(self.engine_path)
        if engine is None:
            self._reject(
                reply,
                request.request_id,
                "engine_restarting",
                "the engine is (re)starting; retry shortly",
            )
            return
        stream = self._open_stream(request, message)
        if shaped.first is not None:
            self._publish(stream, shaped.first)
        self._tell_engine(
            engine,
            request.request_id,
            SubmitGenerate(
                request,
                reply_path=self.context.path,
                max_prompt_tokens=self.limits.max_prompt_tokens,
            ),
        )

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
                error_message="the engine is (re)starting; retry shortly",
            )
            self._on_output(gone)

    def _open_stream(
        self, request: GenerateRequest | EmbedRequest, message: IncomingRequest
    ) -> _Stream:
        stream = _Stream(request=request, reply=message.reply, received_at=message.received_at)
        self._streams[request.request_id] = stream
        timeout = request.timeout or self.limits.default_deadline
        remaining = timeout - (self.context.clock.now() - message.received_at)
        stream.timers.append(
            self._later(max(0.0, remaining), Tick(f"deadline:{request.request_id}"))
        )
        return stream

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
            self._reject_embed(
                message.reply, _request_id_of(message.data), "invalid_request", str(exc), exc.field
            )
            return
        texts, token_ids, problem = request.normalized()
        if problem is not None:
            self._reject_embed(
                message.reply, request.request_id, "invalid_request", problem, "input"
            )
            return
        engine = whereis(self.engine_path)
        if engine is None or request.request_id in self._streams:
            code = "engine_restarting" if engine is None else "invalid_request"
            why = (
                "the engine is (re)starting; retry shortly"
                if engine is None
                else "request_id is already in flight"
            )
            self._reject_embed(message.reply, request.request_id, code, why)
            return
        self._open_stream(request, message)
        self._tell_engine(
            engine,
            request.request_id,
            SubmitEmbed(
                request,
                texts,
                token_ids,
                reply_path=self.context.path,
                max_prompt_tokens=self.limits.max_prompt_tokens,
            ),
        )

    def _reject_embed(
        self, reply: str, request_id: str, code: str, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        error = ErrorInfo(
            code=code, message=message, retryable=ERROR_CODES.get(code, False), field=field_name
        )
        assert self.link is not None
        self.link.publish(reply, encode_json(EmbedResponse(request_id=request_id, error=error)))

    def _on_output(self, chunk: HostChunk) -> None:
        stream = self._streams.get(chunk.request_id)
        if stream is None:
            return  # a late chunk for a request already ended (deadline, shutdown)
        if chunk.embeddings is not None:
            final = StreamChunk(
                request_id=chunk.request_id, index=0, finish_reason="stop", usage=chunk.usage
            )
            self._end_stream(chunk.request_id, final, chunk.embeddings)
            return
        now = self.context.clock.now()
        if chunk.token_ids:
            if stream.first_token_at is None:
                stream.first_token_at = now
                node_metrics.TTFT.observe(now - stream.received_at)
            elif stream.last_chunk_at is not None:
                node_metrics.ITL.observe(now - stream.last_chunk_at)
            stream.last_chunk_at = now
            node_metrics.TOKENS_OUT.inc(len(chunk.token_ids))
        finish = chunk.finish_reason
        error = None
        if finish == "cancelled" and stream.ending in ("deadline_exceeded", "shutdown"):
            finish = "error" if stream.ending == "deadline_exceeded" else "shutdown"
            if stream.ending == "deadline_exceeded":
                error = _deadline_error(stream)
        elif finish == "error":
            code = chunk.error_code or "engine_error"
            error = ErrorInfo(
                code=code,
                message=chunk.error_message,
                retryable=ERROR_CODES.get(code, False),
                field=chunk.error_field,
            )
        out = StreamChunk(
            request_id=chunk.request_id,
            index=stream.index,
            token_ids=chunk.token_ids,
            text=chunk.text,
            finish_reason=finish,  # type: ignore[arg-type]
            error=error,
            usage=chunk.usage,
            logprobs=chunk.logprobs,
        )
        if finish is None:
            self._publish(stream, out)
        else:
            self._end_stream(chunk.request_id, out)

    def _on_cancel(self, data: bytes) -> None:
        try:
            cancel = decode_json(data, CancelRequest)
        except DecodeError:
            return  # another node's business to complain; ours only if we know the id
        stream = self._streams.get(cancel.request_id)
        if stream is not None and not stream.ending:
            stream.ending = "cancelled"
            self._abort_in_engine(cancel.request_id, "cancelled")

    def _on_resume(self, message: IncomingResume) -> None:
        if not message.reply:
            return  # nowhere to answer
        try:
            asked = decode_json(message.data, ResumeRequest)
        except DecodeError:
            return  # not ours to answer: nobody knows who should
        self._prune_ended()
        stream = self._streams.get(asked.request_id)
        if stream is not None:
            sent, ended = stream.sent, False
        else:
            kept = self._ended.get(asked.request_id)
            if kept is None:
                return  # another handler's or node's, or forgotten: the client hears silence
            sent, ended = kept.sent, True
        answer = {
            "request_id": asked.request_id,
            "chunks": [msgspec.Raw(chunk) for chunk in sent[asked.from_index :]],
            "ended": ended,
        }
        node_metrics.RESUMES.labels("ended" if ended else "running").inc()
        self.log.info(
            "stream resumed",
            request_id=asked.request_id,
            from_index=asked.from_index,
            chunks=len(sent) - min(asked.from_index, len(sent)),
            ended=ended,
        )
        assert self.link is not None
        self.link.publish(message.reply, msgspec.json.encode(answer))

    def _keep_ended(self, request_id: str, sent: list[bytes]) -> None:
        kept = _Ended(self.context.clock.now(), sent, sum(len(chunk) for chunk in sent))
        self._ended[request_id] = kept
        self._ended_bytes += kept.size
        self._prune_ended()

    def _prune_ended(self) -> None:
        now = self.context.clock.now()
        while self._ended:
            oldest = next(iter(self._ended.values()))
            expired = now - oldest.ended_at > self.limits.resume_window
            if not expired and self._ended_bytes <= self.limits.resume_buffer_bytes:
                break
            self._ended_bytes -= self._ended.popitem(last=False)[1].size

    def _on_deadline(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.ending:
            return
        stream.ending = "deadline_exceeded"
        self._abort_in_engine(request_id, "deadline_exceeded")
        stream.timers.append(self._later(_DEADLINE_GRACE, Tick(f"deadline_grace:{request_id}")))

    def _on_deadline_grace(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:  # the engine did not end it in time: end it here
            self._end_stream(
                request_id,
                StreamChunk(
                    request_id, stream.index, finish_reason="error", error=_deadline_error(stream)
                ),
            )

    def _on_drain_deadline(self) -> None:
        if self._streams:
            self.log.warning(
                "drain timeout: ending the rest with shutdown", remaining=len(self._streams)
            )
        for request_id in list(self._streams):
            self._abort_in_engine(request_id, "shutdown")
            self._end_stream(
                request_id,
                StreamChunk(request_id, self._streams[request_id].index, finish_reason="shutdown"),
            )
        self.exit(Shutdown(detail="drained"))

    # --- helpers --------------------------------------------------------------------------

    def _abort_in_engine(self, request_id: str, reason: str) -> None:
        engine = whereis(self.engine_path)
        if engine is not None:
            engine.tell(AbortGenerate(request_id, reason))

    def _publish(self, stream: _Stream, chunk: StreamChunk) -> None:
        assert self.link is not None
        data = encode_json(chunk)
        if self._outbox is not None:
            self._outbox.append((stream.reply, data, ""))
        else:
            self.link.publish(stream.reply, data)
        stream.sent.append(data)
        stream.index += 1

    def _end_stream(
        self, request_id: str, chunk: StreamChunk, vectors: list[list[float]] | None = None
    ) -> None:
        stream = self._streams.pop(request_id)
        for timer in stream.timers:
            timer.cancel()
        if isinstance(stream.request, EmbedRequest):
            error = chunk.error
            if error is None and chunk.finish_reason not in ("stop", "length"):
                why = f"the request ended: {chunk.finish_reason}"
                error = ErrorInfo(
                    code="not_ready" if chunk.finish_reason == "shutdown" else "engine_error",
                    message=why,
                )
            answer = EmbedResponse(
                request_id=request_id, embeddings=vectors or [], usage=chunk.usage, error=error
            )
            assert self.link is not None
            self.link.publish(stream.reply, encode_json(answer))
        else:
            self._publish(stream, chunk)
            self._keep_ended(request_id, stream.sent)
        outcome = chunk.error.code if chunk.error else (chunk.finish_reason or "unknown")
        node_metrics.REQUESTS.labels(outcome).inc()
        node_metrics.E2E.observe(self.context.clock.now() - stream.received_at)
        if chunk.usage is not None:
            node_metrics.TOKENS_IN.inc(chunk.usage.prompt_tokens)
            node_metrics.CACHED_TOKENS.inc(chunk.usage.cached_tokens)
        if self._draining and not self._streams:
            self.exit(Shutdown(detail="drained"))

    def _reject(
        self, reply: str, request_id: str, code: str, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        assert self.link is not None
        data = encode_json(error_chunk(request_id, 0, code, message, field_name))
        self.link.publish(reply, data)
        if request_id and request_id not in self._streams and request_id not in self._ended:
            self._keep_ended(request_id, [data])

    def _later(self, delay: float, tick: Tick) -> Timer:
        ref = self.actor_ref

        def fire() -> None:
            if ref.is_alive():
                ref.tell(tick)

        return self.context.clock.call_later(delay, fire)


def _deadline_error(stream: _Stream) -> ErrorInfo:
    timeout = stream.request.timeout
    return ErrorInfo(
        code="deadline_exceeded",
        message=f"the request did not finish within its timeout ({timeout:g}s)"
        if timeout
        else "the request did not finish within the default deadline",
        retryable=False,
    )


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
