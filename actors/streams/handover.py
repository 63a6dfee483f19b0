"""Handing a stream over to another instance, when its node stops before it finished.

The draining node sends the stream's continuation (the client's request, what the client
already has, and the client's subject in `continuation.reply_to`) as a request on the
generate subject: the queue group gives it to another instance (the draining node left
the group when it began to drain). That instance answers whether it took the stream
(`HandoverReply`) and streams the rest to the client, whose chunks go on from the next
index. No responder, a refusal or no answer: the stream is not handed over.
"""

from __future__ import annotations

from typing import Any

from messages.codec import DecodeError, decode_json, encode_json
from messages.request import GenerateRequest, HandoverReply

__all__ = ["offer_handover"]

_ANSWER_TIMEOUT = 2.0  # a node that takes the stream answers at once


async def offer_handover(nc: Any, subject: str, request: GenerateRequest) -> HandoverReply | None:
    """Offer `request` (a continuation with `reply_to`) on `subject` over the NATS client
    `nc` (on its loop); the taker's answer, or None when nobody answered (no other
    instance, or it did not answer in time)."""
    if nc is None:
        return None
    data = encode_json(request)
    try:
        message = await nc.request(subject, data, timeout=_ANSWER_TIMEOUT)
        return decode_json(message.data, HandoverReply)
    except (DecodeError, TimeoutError, OSError):
        return None
    except Exception as exc:
        if type(exc).__name__ in ("NoRespondersError", "TimeoutError", "ConnectionClosedError"):
            return None
        raise
