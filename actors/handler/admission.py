"""Admission of the handler's requests: the checks a request passes before its stream opens.

A generate request is refused (one error chunk naming the field) when it is too big,
does not decode, breaks a limit or the serving mode, reuses an id in flight, or finds no
engine; a stream handed over by a draining node is answered on the handing node's
subject instead. An embedding node admits `EmbedRequest`s the same way and answers in
their format. `RequestAdmission` is a base of `actors.handler.actor.HandlerActor`.
"""

from __future__ import annotations

from typing import Any

from actors.handler.streams import RESTARTING, HandlerStreams
from actors.streams.admission import limit_problem, request_id_of
from actors.streams.modes import shape_request
from actors.telemetry import node_metrics
from messages.codec import DecodeError, decode_json, encode_json
from messages.node import IncomingRequest, SubmitEmbed
from messages.request import (
    EmbedRequest,
    EmbedResponse,
    ErrorCode,
    GenerateRequest,
    HandoverReply,
    error_info,
)
from supervisor.core import whereis

__all__ = ["RequestAdmission"]


class RequestAdmission(HandlerStreams):
    """Admits or refuses the requests a handler reads (see the module docstring)."""

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
            rid = request_id_of(message.data)
            self._reject(reply, rid, "invalid_request", str(exc), exc.field)
            return
        shaped = shape_request(request, self.mode, self.disaggregation)
        problem = limit_problem(request, self.limits) or shaped.problem
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
            self._publish(stream.reply, self.table.send(stream, shaped.first), stream.direct)
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
            self._refuse(reply, request_id, answer_to, ("engine_restarting", RESTARTING, ""))
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
            rid = request_id_of(message.data)
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
            why = RESTARTING if engine is None else "request_id is already in flight"
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

    def _reject_embed(
        self, reply: str, request_id: str, code: ErrorCode, message: str, field_name: str = ""
    ) -> None:
        node_metrics.REQUESTS.labels(code).inc()
        error = error_info(code, message, field_name)
        self._publish(reply, encode_json(EmbedResponse(request_id=request_id, error=error)))
