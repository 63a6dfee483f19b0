"""`Dispatcher`: routes a request, sends it to the chosen instance, follows its stream.

- **Routing**: aggregated instances of the model, each DP rank a candidate, weighed by the
  `Router` with the KV index; when the model has both prefill and decode instances, one
  of each (prefill by KV cost, decode by load) and the disaggregated flow.
- **Failover**: an attempt that fails before any chunk was received (no responders, the
  instance was lost, or a retryable error: overloaded, engine restarting, stopping) is sent
  again to another instance, up to `MAX_ATTEMPTS` (when every instance is marked down, it
  waits up to `ALL_DOWN_WAIT` for one to be heard from again); each attempt has its own
  request id so a cancel for one never hits another.
- **Migration**: after a chunk, the same failures send the stream on to another instance
  as a continuation (`Progress`: the tokens the client has, the next chunk index), up to
  `migration_limit` seams; the client's stream goes on with a pause. A disaggregated
  stream goes on as a new pair: a prefill of the prompt and the tokens so far on a prefill
  instance, the rest decoded on a decode instance other than the lost one. A stream past
  the limit ends with the error instead.
- **Lost instances, lost chunks, cancel**: see `attempt.py`.
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
from actors.frontend.attempt import run_attempt
from actors.frontend.discovery import Discovery, ModelPool
from actors.frontend.errors import FrontendError, unknown_model
from actors.frontend.indexer import KvIndexer, RankKey
from actors.frontend.router import Candidate, Decision, Router
from actors.frontend.streams import PrefillOutcome, Progress, Retry, follow_prefill
from messages.codec import encode_json
from messages.discovery import InstanceRecord
from messages.kv import block_hashes
from messages.request import (
    BootstrapInfo,
    CancelRequest,
    DirectReply,
    GenerateRequest,
    StreamChunk,
    error_chunk,
)
from supervisor.client_replies import ReplyMux

__all__ = ["Dispatcher", "Route"]

MAX_ATTEMPTS = 4
ALL_DOWN_WAIT = 3.0  # seconds a request waits for an instance when all are marked down
DOWN_POLL = 0.1
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
        migration_limit: int = 3,
    ) -> None:
        self.nc = nc
        self.migration_limit = migration_limit
        self.mux = mux
        self.discovery = discovery
        self.indexer = indexer
        self.router = router
        self.spawn = spawn
        self.log = log
        self.inflight: Counter[RankKey] = Counter()
        # where nodes that can send chunks straight here (set once the listener runs)
        self.direct: DirectReply | None = None

    # --- generate -------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, group: RouteGroup | None = None
    ) -> AsyncGenerator[StreamChunk, None]:
        """The chunks of `request` (token ids set) until the one with a finish reason.

        Raises `FrontendError` when it cannot start (unknown model, nothing left to try,
        a refusal before any token). After a chunk, a lost or stopping instance sends the
        stream on to another as a continuation (up to `migration_limit` seams), and what
        cannot go on ends with an error chunk. Requests of one `group` go to the same rank
        first."""
        tried: set[str] = set()
        last: FrontendError | None = None
        progress = Progress(prompt_tokens=len(request.token_ids or []))
        for attempt in range(MAX_ATTEMPTS + self.migration_limit):
            route = self._next_route(request, group, tried, attempt)
            if route is None and await self._back_soon(request.model, tried):
                route = self._next_route(request, group, tried, attempt)
            if route is None:
                error = last or self._unavailable(request.model)
                if not progress.started:
                    raise error
                yield Retry("", "no_instances", error).ending(
                    request.request_id, progress.next_index
                )
                return
            rid = request.request_id if attempt == 0 else f"{request.request_id}.{attempt}"
            try:
                attempt_request = progress.attempt(request, rid)
                async with contextlib.aclosing(self._follow(route, attempt_request)) as chunks:
                    async for chunk in chunks:
                        progress.saw(chunk)
                        yield chunk
                return
            except Retry as retry:
                tried.add(retry.instance_id)
                last = retry.error
                if not progress.started and attempt + 1 >= MAX_ATTEMPTS:
                    break
                refusal = self._go_on(request, route, retry, progress)
                if refusal is not None:
                    yield refusal
                    return
        if progress.started:
            yield error_chunk(
                request.request_id, progress.next_index, "node_lost", "no instance took it on"
            )
            return
        raise last or FrontendError.of_code("no_instances", "no instance could take the request")

    def _next_route(
        self, request: GenerateRequest, group: RouteGroup | None, tried: set[str], attempt: int
    ) -> Route | None:
        pool = self.discovery.pool(request.model)
        if pool is None:
            return None
        route = self._grouped(pool, group) if attempt == 0 else None
        route = route or self._route(pool, request, tried)
        if group is not None and group.route is None:
            group.route = route
        return route

    async def _back_soon(self, model: str, tried: set[str]) -> bool:
        """Every instance of `model` is marked down (a "no responders" each: e.g. in a
        rolling restart of the NATS servers, while the nodes reconnect and their interest
        spreads again): wait up to `ALL_DOWN_WAIT` s for one to show it is alive (a newer
        record revision, within a heartbeat). True if one did; it is tried again even if
        this request had tried it. A pause instead of a burst of 503s."""
        pool = self.discovery.pool(model)
        if pool is None or pool.live or not pool.registered:
            return False
        loop = asyncio.get_running_loop()
        until = loop.time() + ALL_DOWN_WAIT
        while loop.time() < until:
            await asyncio.sleep(DOWN_POLL)
            pool = self.discovery.pool(model)
            if pool is None:
                return False
            if pool.live:
                tried.difference_update(r.instance_id for r in pool.live)
                return True
        return False

    def _unavailable(self, model: str) -> FrontendError:
        pool = self.discovery.pool(model)
        return unknown_model(model) if pool is None else pool.unavailable()

    def _go_on(
        self, request: GenerateRequest, route: Route, retry: Retry, progress: Progress
    ) -> StreamChunk | None:
        """Whether a failed attempt goes on elsewhere: None if so (counted and logged),
        else the chunk that ends the stream."""
        fields = {"request_id": request.request_id, "instance_id": retry.instance_id}
        if not progress.started:
            metrics.FAILOVERS.labels(retry.reason).inc()
            self.log.info("failing over", reason=retry.reason, detail=retry.error.message, **fields)
            return None
        if progress.migrations >= self.migration_limit:
            why_not = f"its {progress.migrations} seams reached migration_limit"
            self.log.warning("stream not continued", reason=retry.reason, why=why_not, **fields)
            return retry.ending(request.request_id, progress.next_index)
        metrics.MIGRATIONS.labels(retry.reason).inc()
        self.log.info(
            "continuing elsewhere",
            reason=retry.reason,
            tokens=len(progress.token_ids),
            next_index=progress.next_index,
            disaggregated=route.prefill is not None,
            **fields,
        )
        return None

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

    def _follow(self, route: Route, request: GenerateRequest) -> AsyncGenerator[StreamChunk, None]:
        """The attempt's chunks: from one instance, or a prefill and a decode instance."""
        if route.prefill is None:  # no generator around it: one turn less per token
            return run_attempt(self, route.main.candidate, request)
        return self._follow_pair(route, request)

    async def _follow_pair(
        self, route: Route, request: GenerateRequest
    ) -> AsyncGenerator[StreamChunk, None]:
        assert route.prefill is not None
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
            follow_prefill(
                run_attempt(self, prefill, prefill_request), prefill.instance_id, outcome
            )
        )
        decode_request = msgspec.structs.replace(request, bootstrap_info=info)
        stream = run_attempt(self, decode, decode_request, abort=outcome.failed)
        blamed = _prefill_blamed(stream, prefill.instance_id)
        try:
            async for chunk in blamed:
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
            await blamed.aclose()
            await stream.aclose()
            if not task.done():
                task.cancel()

    async def cancel(self, record: InstanceRecord, request_id: str) -> None:
        metrics.CANCELS.inc()
        self.log.info("cancelling", request_id=request_id, instance_id=record.instance_id)
        await self.nc.publish(record.subjects.cancel, encode_json(CancelRequest(request_id)))


async def _prefill_blamed(
    stream: AsyncGenerator[StreamChunk, None], prefill_id: str
) -> AsyncGenerator[StreamChunk, None]:
    """The decode stream, where a decode that could not get its KV cache from the prefill
    instance (`kv_transfer_failed`: the prefill node is gone or never finished) fails the
    pair over with the *prefill* instance excluded: the decode instance is sound."""
    try:
        async for chunk in stream:
            yield chunk
    except Retry as retry:
        final = retry.final
        if final is None or final.error is None or final.error.code != "kv_transfer_failed":
            raise
        raise Retry(prefill_id, "prefill_lost", retry.error, final) from None
