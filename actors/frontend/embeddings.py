"""`send_embedding`: an `EmbedRequest` to an embedding-mode instance of its model, by the
router's policy (load only: no KV reuse across embeddings), with the same failover as
generation: no responders, a retryable error, or the instance lost while it works on the
request (nothing heard from it and no answer to a probe, as for a quiet stream) → the
request again, on another instance."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
from nats.aio.msg import Msg

from actors.frontend import metrics
from actors.frontend.attempt import DEADLINE_GRACE, PROBE_AFTER
from actors.frontend.dispatch import MAX_ATTEMPTS, Dispatcher
from actors.frontend.errors import FrontendError, from_node_error, unknown_model
from messages.codec import DecodeError, decode_json, encode_json
from messages.discovery import InstanceRecord
from messages.request import EmbedRequest, EmbedResponse

__all__ = ["send_embedding"]


async def send_embedding(dispatcher: Dispatcher, request: EmbedRequest) -> EmbedResponse:
    """Send an embedding request to an embedding instance of its model (with failover)."""
    d = dispatcher
    tried: set[str] = set()
    last: FrontendError | None = None
    for attempt in range(MAX_ATTEMPTS):
        pool = d.discovery.pool(request.model)
        if pool is None:
            raise unknown_model(request.model)
        records = [r for r in pool.of_mode("embedding") if r.instance_id not in tried]
        if not records:
            if last is not None:
                raise last
            if not any(r.model.mode == "embedding" for r in pool.registered):
                why = f"model {request.model!r} does not serve embeddings"
                raise FrontendError(400, why, param="model", code="not_an_embedding_model")
            raise pool.unavailable()
        decision = d.router.choose(
            [d.candidate(r, 0, []) for r in records], 0, f"{pool.name}/embedding", False
        )
        metrics.ROUTING.labels(decision.policy, "embedding").inc()
        record = decision.candidate.record
        rid = request.request_id if attempt == 0 else f"{request.request_id}.{attempt}"
        wire = msgspec.structs.replace(request, request_id=rid)
        key = (record.instance_id, 0)
        d.inflight[key] += 1
        try:
            msg = await _ask(
                d, record, encode_json(wire), (request.timeout or 300.0) + DEADLINE_GRACE
            )
        except _InstanceLost:
            tried.add(record.instance_id)
            why = f"instance {record.instance_id} was lost while it computed the embeddings"
            last = FrontendError.of_code("node_lost", why)
            metrics.FAILOVERS.labels("node_lost").inc()
            continue
        except nats.errors.NoRespondersError:
            d.discovery.mark_down(record.instance_id, "no responders on its subject")
            tried.add(record.instance_id)
            why = f"instance {record.instance_id} does not answer (no responders)"
            last = FrontendError.of_code("node_lost", why)
            metrics.FAILOVERS.labels("no_responders").inc()
            continue
        except nats.errors.TimeoutError:
            why = "the embedding request did not finish within its deadline"
            raise FrontendError.of_code("deadline_exceeded", why) from None
        finally:
            d.inflight[key] -= 1
            if d.inflight[key] <= 0:
                del d.inflight[key]
        try:
            answer = decode_json(msg.data, EmbedResponse)
        except DecodeError as exc:
            raise FrontendError.of_code("internal", f"undecodable answer: {exc}") from None
        if answer.error is not None:
            if answer.error.retryable:
                tried.add(record.instance_id)
                last = from_node_error(answer.error, input_param="input")
                metrics.FAILOVERS.labels(answer.error.code).inc()
                continue
            raise from_node_error(answer.error, input_param="input")
        return answer
    raise last or FrontendError.of_code("no_instances", "no instance could take the request")


class _InstanceLost(Exception):
    """The instance was lost while the request waited for its answer."""


async def _ask(d: Dispatcher, record: InstanceRecord, data: bytes, timeout: float) -> Msg:
    """The instance's answer to `data`; raises `_InstanceLost` when, while waiting, the
    instance turns out to be gone (a node killed with the request in hand never answers:
    without this the request waited for its whole deadline)."""
    answer = asyncio.ensure_future(d.nc.request(record.subjects.instance, data, timeout=timeout))
    try:
        while True:
            done, _ = await asyncio.wait({answer}, timeout=PROBE_AFTER)
            if done:
                return answer.result()
            heard_at = d.indexer.heard_at(record.instance_id)
            if await d.discovery.is_lost(record, heard_at):
                raise _InstanceLost
    finally:
        if not answer.done():
            answer.cancel()
