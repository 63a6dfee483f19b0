"""`Dispatcher`: routes a request, sends it to the chosen instance, follows its stream.

- **Routing**: aggregated instances of the model, each DP rank a candidate, weighed by the
  `Router` with the KV index; when the model has both prefill and decode instances, one
  of each (prefill by KV cost, decode by load) and the disaggregated flow.
- **Failover**: an attempt that fails before any token was received (no responders, the
  instance was lost, or a retryable error: overloaded, engine restarting, stopping) is sent
  again to another instance, up to `MAX_ATTEMPTS`; each attempt has its own request id so
  a cancel for one never hits another. After a token, a lost instance ends the stream
  with a `node_lost` error chunk.
- **Lost instances**: a stream quiet for `PROBE_AFTER` seconds asks `Discovery.is_lost`.
- **Lost chunks**: a gap in a stream's indices, or a quiet stream, asks the node on its
  resume subject for the chunks since the last one received (a NATS server restart drops
  what it carries); duplicates are dropped by index.
- **Cancel**: a stream abandoned before its last chunk (client gone, deadline) gets a
  `CancelRequest` on its instance's cancel subject.
- **Disaggregated**: a random 63-bit bootstrap room; the prefill request and the decode
  request both carry the prefill card's bootstrap host/port and the room; the decode
  stream is the answer (with the prefill's cached-token count), a prefill failure before
  the first token fails the attempt over.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client

from actors.frontend import metrics
from actors.frontend.discovery import Discovery, ModelPool
from actors.frontend.errors import FrontendError, unknown_model
from actors.frontend.indexer import KvIndexer, RankKey
from actors.frontend.replies import ReplyMux, is_no_responders
from actors.frontend.router import Candidate, Decision, Router
from actors.frontend.streams import PrefillOutcome, Retry, follow_prefill, retry_of
from messages.codec import DecodeError, decode_json, encode_json
from messages.discovery import InstanceRecord
from messages.kv import block_hashes
from messages.request import (
    BootstrapInfo,
    CancelRequest,
    GenerateRequest,
    StreamChunk,
    error_chunk,
)
from supervisor.client import ask_resume, next_within

__all__ = ["Dispatcher", "Route"]

PROBE_AFTER = 1.0  # seconds without a chunk before asking whether the instance is lost
RESUME_INTERVAL = 1.0  # at most one resume request per stream this often
RESUME_TIMEOUT = 1.0
DEADLINE_GRACE = 5.0  # past the request's own timeout (which the node enforces)
MAX_ATTEMPTS = 4
PREFILL_USAGE_WAIT = 1.0  # a decode that ends first waits this long for the prefill's usage

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(frozen=True)
class Route:
    """Where one attempt goes: an aggregated (or decode) rank, and a prefill rank."""

    main: Decision
    prefill: Decision | None = None


@dataclass
class RouteGroup:
    """Requests routed together (the choices of one `n > 1` request): the first attempt of
    each goes where the first request was routed, so the engine shares their prefix."""

    route: Route | None = None


class Dispatcher:
    """Sends requests to instances; see the module docstring."""

    def __init__(
        self,
        nc: Client,
        mux: ReplyMux,
        discovery: Discovery,
        indexer: KvIndexer,
        router: Router,
        spawn: Spawn,
        log: Any,
    ) -> None:
        self.nc = nc
        self.mux = mux
        self.discovery = discovery
        self.indexer = indexer
        self.router = router
        self.spawn = spawn
        self.log = log
        self.inflight: Counter[RankKey] = Counter()

    # --- generate -------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, group: RouteGroup | None = None
    ) -> AsyncGenerator[StreamChunk, None]:
        """The chunks of `request` (token ids set) until the one with a finish reason.

        Raises `FrontendError` when it cannot start (unknown model, nothing left to try,
        a refusal before any token); after a token, problems end the stream with an
        error chunk instead. Requests of one `group` go to the same rank first."""
        tried: set[str] = set()
        last: FrontendError | None = None
        for attempt in range(MAX_ATTEMPTS):
            pool = self.discovery.pool(request.model)
            if pool is None:
                raise unknown_model(request.model)
            route = self._grouped(pool, group) if attempt == 0 else None
            route = route or self._route(pool, request, tried)
            if route is None:
                raise last or pool.unavailable()
            if group is not None and group.route is None:
                group.route = route
            rid = request.request_id if attempt == 0 else f"{request.request_id}.{attempt}"
            attempt_request = msgspec.structs.replace(request, request_id=rid)
            try:
                async with contextlib.aclosing(self._follow(route, attempt_request)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except Retry as retry:
                tried.add(retry.instance_id)
                last = retry.error
                metrics.FAILOVERS.labels(retry.reason).inc()
                self.log.info(
                    "failing over",
                    request_id=request.request_id,
                    instance_id=retry.instance_id,
                    reason=retry.reason,
                    detail=retry.error.message,
                )
        raise last or FrontendError.of_code("no_instances", "no instance could take the request")

    @staticmethod
    def _grouped(pool: ModelPool, group: RouteGroup | None) -> Route | None:
        """The group's route, if its instances are still live."""
        route = group.route if group is not None else None
        if route is None:
            return None
        live = {r.instance_id for r in pool.live}
        chosen = [route.main] + ([route.prefill] if route.prefill is not None else [])
        return route if all(d.candidate.instance_id in live for d in chosen) else None

    def _route(self, pool: ModelPool, request: GenerateRequest, tried: set[str]) -> Route | None:
        token_ids = request.token_ids or []
        hashes: dict[int, list[int]] = {}

        def candidates(records: Sequence[InstanceRecord], use_kv: bool) -> list[Candidate]:
            out = []
            for record in records:
                if record.instance_id in tried:
                    continue
                size = record.model.kv_block_size
                if use_kv and size not in hashes:
                    hashes[size] = [h for h, _ in block_hashes(token_ids, size)] if size > 0 else []
                prompt = hashes.get(size, [])
                for rank in range(max(1, record.model.dp_size)):
                    out.append(self.candidate(record, rank, prompt))
            return out

        def decide(found: list[Candidate], mode: str, use_kv: bool) -> Decision:
            blocks = max(len(hashes.get(c.record.model.kv_block_size, [])) for c in found)
            decision = self.router.choose(found, blocks, f"{pool.name}/{mode}", use_kv=use_kv)
            metrics.ROUTING.labels(decision.policy, mode).inc()
            chosen = decision.candidate
            if use_kv:
                metrics.HIT_BLOCKS.inc(chosen.matched_blocks)
                metrics.PROMPT_BLOCKS.inc(decision.prompt_blocks)
                prompt = hashes.get(chosen.record.model.kv_block_size, [])
                self.indexer.predict(chosen.instance_id, chosen.dp_rank, prompt, self._now())
            self.log.debug(
                "routed",
                request_id=request.request_id,
                mode=mode,
                instance_id=chosen.instance_id,
                dp_rank=chosen.dp_rank,
                matched_blocks=chosen.matched_blocks,
                prompt_blocks=decision.prompt_blocks,
                load=chosen.load,
                cost=decision.cost,
            )
            return decision

        prefill = candidates(pool.of_mode("prefill"), use_kv=True)
        decode = candidates(pool.of_mode("decode"), use_kv=False)
        if prefill and decode:
            return Route(decide(decode, "decode", False), decide(prefill, "prefill", True))
        aggregated = candidates(pool.of_mode("aggregated"), use_kv=True)
        if aggregated:
            return Route(decide(aggregated, "aggregated", True))
        return None

    def candidate(self, record: InstanceRecord, rank: int, prompt: list[int]) -> Candidate:
        iid = record.instance_id
        matched = self.indexer.matched_blocks(iid, rank, prompt, self._now()) if prompt else 0
        load = max(self.indexer.load(iid, rank), self.inflight[(iid, rank)])
        return Candidate(record, rank, matched, load)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _follow(
        self, route: Route, request: GenerateRequest
    ) -> AsyncGenerator[StreamChunk, None]:
        if route.prefill is None:
            async with contextlib.aclosing(self._stream(route.main.candidate, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        prefill, decode = route.prefill.candidate, route.main.candidate
        card = prefill.record.model
        host = card.runtime_config.get("bootstrap_host")
        port = card.runtime_config.get("bootstrap_port")
        if not isinstance(host, str) or not isinstance(port, int):
            why = f"prefill instance {prefill.instance_id} advertises no bootstrap_host/port"
            raise Retry(prefill.instance_id, "bad_card", FrontendError.of_code("no_instances", why))
        info = BootstrapInfo(host=host, port=port, room=secrets.randbits(63))
        outcome = PrefillOutcome()
        prefill_request = msgspec.structs.replace(
            request, request_id=f"{request.request_id}.prefill", bootstrap_info=info
        )
        task = asyncio.get_running_loop().create_task(
            follow_prefill(self._stream(prefill, prefill_request), prefill.instance_id, outcome)
        )
        decode_request = msgspec.structs.replace(request, bootstrap_info=info)
        stream = self._stream(decode, decode_request, abort=outcome.failed)
        try:
            async for chunk in stream:
                if chunk.finish_reason is not None and not task.done():
                    # the cache figure is the prefill's (it finished first with a real transfer)
                    await asyncio.wait({task}, timeout=PREFILL_USAGE_WAIT)
                usage = chunk.usage
                if usage is not None and outcome.usage is not None:
                    cached = outcome.usage.cached_tokens
                    usage = msgspec.structs.replace(usage, cached_tokens=cached)
                    yield msgspec.structs.replace(chunk, usage=usage)
                else:
                    yield chunk
        finally:
            await stream.aclose()
            if not task.done():
                task.cancel()

    async def _stream(
        self,
        candidate: Candidate,
        request: GenerateRequest,
        abort: Callable[[], Exception | None] | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """One attempt on one rank; raises `Retry` when another instance should try."""
        record, iid = candidate.record, candidate.instance_id
        wire = msgspec.structs.replace(request, dp_rank=candidate.dp_rank, model=record.model.name)
        key = (iid, candidate.dp_rank)
        reply, queue = self.mux.open()
        self.inflight[key] += 1
        metrics.INFLIGHT.inc()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + (request.timeout or 300.0) + DEADLINE_GRACE
        ended = False  # the node ended the stream, or is gone: nothing to cancel
        tokens = 0
        index = 0  # of the next chunk to yield
        early: dict[int, StreamChunk] = {}  # chunks that came after a gap
        heard_at = probed_at = loop.time()
        try:
            data = encode_json(wire)
            if len(data) > self.nc.max_payload:
                ended = True  # never sent: nothing to cancel
                why = (
                    f"the request is {len(data)} bytes on the wire, over the NATS server's "
                    f"max_payload ({self.nc.max_payload})"
                )
                raise FrontendError(413, why, code="request_too_large")
            await self.nc.publish(record.subjects.instance, data, reply=reply)
            while True:
                msg = await next_within(queue, PROBE_AFTER)
                if msg is not None and is_no_responders(msg):
                    ended = True
                    self.discovery.mark_down(iid, "no responders on its subject")
                    why = f"instance {iid} does not answer (no responders)"
                    raise Retry(iid, "no_responders", FrontendError.of_code("node_lost", why))
                if msg is not None:
                    try:
                        chunk = decode_json(msg.data, StreamChunk)
                    except DecodeError as exc:
                        self.log.error("undecodable chunk", instance_id=iid, error=str(exc))
                        yield error_chunk(
                            wire.request_id, index, "internal", f"instance {iid}: {exc}"
                        )
                        return
                    heard_at = loop.time()
                    if chunk.index >= index:
                        early[chunk.index] = chunk
                while index in early:
                    chunk = early.pop(index)
                    ended = chunk.finish_reason is not None
                    index = chunk.index + 1
                    if not tokens:
                        retry = retry_of(chunk, iid)
                        if retry is not None:
                            raise retry
                    tokens += len(chunk.token_ids)
                    yield chunk
                    if ended:
                        return
                now = loop.time()
                silent = now - heard_at >= PROBE_AFTER
                if not early and not silent:
                    continue
                # A gap in the indices, or silence: ask the node for what it sent since.
                if record.subjects.resume and now - probed_at >= RESUME_INTERVAL:
                    probed_at = now
                    answer = await ask_resume(
                        self.nc, record.subjects.resume, wire.request_id, index, RESUME_TIMEOUT
                    )
                    if answer is not None:
                        if answer.chunks:
                            metrics.RESUMED.inc()
                        for chunk in answer.chunks:
                            if chunk.index >= index:
                                early[chunk.index] = chunk
                        if early:
                            heard_at = loop.time()
                            continue
                if not silent:
                    continue
                failure = abort() if abort is not None and not tokens else None
                if failure is not None:
                    raise failure from None
                if loop.time() > give_up_at:
                    why = f"no answer from instance {iid} within the request's deadline"
                    if not tokens:
                        raise FrontendError.of_code("deadline_exceeded", why) from None
                    yield error_chunk(wire.request_id, index, "deadline_exceeded", why)
                    return
                if await self.discovery.is_lost(record, self.indexer.heard_at(iid)):
                    ended = True
                    why = f"instance {iid} was lost"
                    if not tokens:
                        raise Retry(
                            iid, "node_lost", FrontendError.of_code("node_lost", why)
                        ) from None
                    why += f" mid-stream, after {tokens} tokens"
                    yield error_chunk(wire.request_id, index, "node_lost", why)
                    return
        finally:
            self.inflight[key] -= 1
            if self.inflight[key] <= 0:
                del self.inflight[key]
            metrics.INFLIGHT.dec()
            self.mux.close(reply)
            if not ended:
                self.spawn(self._cancel(record, wire.request_id))

    async def _cancel(self, record: InstanceRecord, request_id: str) -> None:
        metrics.CANCELS.inc()
        self.log.info("cancelling", request_id=request_id, instance_id=record.instance_id)
        await self.nc.publish(record.subjects.cancel, encode_json(CancelRequest(request_id)))
