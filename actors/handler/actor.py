"""`HandlerActor`, the supervised child: start, stop, its match on messages, drain and
hand-over (the request plane as a whole: see `actors.handler`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from actors.handler.admission import RequestAdmission
from actors.handler.streams import DeadlineGrace, RetrySubmit, StreamDeadline
from actors.streams.admission import request_id_of
from actors.streams.coalesce import coalesce
from actors.streams.handover import offer_handover
from actors.telemetry import node_metrics
from messages.node import (
    EngineOutputs,
    GetLink,
    IncomingCancel,
    IncomingRequest,
    IncomingResume,
)
from messages.request import GenerateRequest, HandoverReply
from supervisor.core import ExitReason, LoopHost, Shutdown, StopRequest, ask

__all__ = ["HandlerActor"]


@dataclass(frozen=True)
class _DrainDeadline:
    """The drain timeout ran out: hand the streams left over, or end them with `shutdown`."""


@dataclass(frozen=True)
class _HandoverAnswer:
    """What came of offering a stream to another instance (None: nobody answered)."""

    request_id: str
    answer: HandoverReply | None


class HandlerActor(RequestAdmission):
    """Serves generate requests for the node; see `actors.handler`. Its streams and
    their carrying out are in `HandlerStreams`, the admission of requests in
    `RequestAdmission`; here: start, stop, the match on messages, drain and hand-over."""

    # --- start and stop ------------------------------------------------------------------

    def on_start_up(self) -> None:
        # Runs on a start-up thread: it may block. From ready on, this actor's messages are
        # handled on the NATS link's loop (a LoopActor: see `actors.handler`).
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

    def loop_host(self) -> LoopHost:
        assert self.link is not None
        return self.link

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
                request_id, max(0.0, stream.deadline_at - now), StreamDeadline(request_id)
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
            self._reject(message.reply, request_id_of(message.data), "not_ready", why)

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
                        self._reject(message.reply, request_id_of(message.data), "internal", why)
                    raise
            case EngineOutputs(chunks=chunks) if self._offering:
                self._held.extend(chunks)  # a stream is being offered: its output waits
            case EngineOutputs(chunks=chunks):
                self._outbox = []  # the batch's publishes go out together
                try:
                    for chunk in coalesce(chunks):  # a backlog: a request's steps as one chunk
                        self._on_output(chunk)
                finally:
                    outbox, self._outbox = self._outbox, None
                    if outbox and self.link is not None:
                        self.link.publish_many(outbox)
            case IncomingCancel(data=data):
                self._on_cancel(data)
            case IncomingResume():
                self._on_resume(message)
            case StreamDeadline(request_id=request_id):
                self._stop_stream(request_id, "deadline_exceeded")
            case DeadlineGrace(request_id=request_id):
                late = self.table.stopped_chunk(request_id)
                if late is not None:
                    self._end(request_id, late)
            case RetrySubmit():
                self._retry = None
                self._submit_waiting()
            case _DrainDeadline():
                self._drain_deadline()
            case _HandoverAnswer(request_id=request_id, answer=answer):
                self._handover_answered(request_id, answer)
            case _:
                return super().handle(message)
        return None

    # --- a stop: streams handed over, or ended ---------------------------------------------

    def _drain_deadline(self) -> None:
        """The drain timeout ran out with streams still running: hand each over to another
        instance (a continuation that streams to the same client), else end it. The offers
        go one at a time, each a NATS request in a task of the loop; meanwhile the
        handler's engine output waits (`_held`), so what the client gets from here is what
        the offer said it has."""
        if self.table and self.limits.handover_on_drain:
            self._to_offer = list(self.table.streams)
        self._offer_next()

    def _offer_next(self) -> None:
        assert self.link is not None
        while self._to_offer:
            request_id = self._to_offer.pop(0)
            stream = self.table.streams.get(request_id)
            if stream is None or not isinstance(stream.request, GenerateRequest):
                continue
            if stream.ending or stream.migrations >= self.limits.migration_limit:
                continue
            request = self.table.handover_request(request_id)
            offer = offer_handover(self.link.nc, self.subjects.generate, request)
            self._offering = request_id
            self.spawn(offer, then=functools.partial(_HandoverAnswer, request_id))
            return
        self._end_drain()

    def _handover_answered(self, request_id: str, answer: HandoverReply | None) -> None:
        self._offering = ""
        held, self._held = self._held, []
        if answer is None or not answer.accepted:
            self._to_offer = []  # no instance takes streams now: the rest end here
        elif request_id in self.table.streams:
            engine_id = self.table.handed_over(request_id, self.context.clock.now())
            self._abort_in_engine(engine_id, "shutdown")
            self._after_end(request_id, exiting=True)
            node_metrics.MIGRATIONS.labels("handed_over").inc()
            self._moved += 1
        if held:
            self.handle(EngineOutputs(held))  # late chunks of a stream handed over are dropped
        self._offer_next()

    def _end_drain(self) -> None:
        if self._moved:
            self.log.info("streams handed over to another instance", streams=self._moved)
        if self.table:
            self.log.warning(
                "drain timeout: ending the rest with shutdown", remaining=len(self.table)
            )
        self._close_all()
        self.exit(Shutdown(detail="drained"))
