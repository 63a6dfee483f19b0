"""`FrontendState`: what the HTTP routes use, living on the frontend's event loop.

It owns the discovery watcher, the KV/load indexer (fed by `{ns}.*.kv_events` and
`{ns}.*.load_metrics`, after a replay of the durable KV event streams; `{ns}.*.kv_events.head`
shows batches lost at the end of a burst), the router, the
tokenizers and the dispatcher, all on the one NATS connection of the frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.frontend import metrics
from actors.frontend.discovery import Discovery
from actors.frontend.dispatch import Dispatcher
from actors.frontend.indexer import KvIndexer
from actors.frontend.parsers import ParserLoader
from actors.frontend.replay import KvReplay
from actors.frontend.response_store import ResponseStore
from actors.frontend.router import Router
from actors.frontend.tokenizers import TokenizerCache
from actors.streams.direct import DirectReceiver
from messages.codec import DecodeError, decode_json, encode_json
from messages.kv import KvEventBatch, KvHead, KvResyncRequest, resync_subject
from messages.metrics import LoadMetrics
from supervisor.client_replies import ReplyMux
from supervisor.config import NodeConfig

__all__ = ["FrontendState"]

PRUNE_INTERVAL = 5.0
PRUNE_GRACE = 30.0  # events of an instance not (yet) in discovery are kept this long
REPLAY_TIMEOUT = 30.0  # reading the durable KV event streams at start
RESYNC_INTERVAL = 2.0  # seconds between two asks for the same rank's view


class FrontendState:
    """The frontend's components on its event loop; see the module docstring."""

    def __init__(self, nc: Client, config: NodeConfig, log: Any) -> None:
        frontend = config.frontend
        self.nc = nc
        self.config = config
        self.log = log
        self.namespace = config.node.namespace
        self.request_timeout = frontend.request_timeout
        self.indexer = KvIndexer()
        self._events_subjects: dict[str, str] = {}  # instance → the subject its events came on
        # rank → when its view was last asked for; until a resync of it comes
        self._resync_asked: dict[tuple[str, int], float] = {}
        self.replay = KvReplay(nc, self.namespace, self._apply_kv, log)
        self.tokenizers = TokenizerCache(log)
        self.parsers = ParserLoader(log)
        self.responses = ResponseStore(frontend.responses_store_size, frontend.responses_ttl)
        self.mux = ReplyMux(nc)
        self.discovery = Discovery(
            nc,
            self.mux,
            config.discovery.bucket,
            self.namespace,
            log,
            self._on_discovery_change,
            heard_at=self.indexer.heard_at,
        )
        self.router = Router(frontend.routing, frontend.kv_block_weight, frontend.load_weight)
        self.dispatcher = Dispatcher(
            nc,
            self.mux,
            self.discovery,
            self.indexer,
            self.router,
            self.spawn,
            log,
            frontend.migration_limit,
        )
        self.direct = (
            DirectReceiver(self.mux.deliver, frontend.direct_host, log)
            if frontend.direct_streams
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Any] = []
        self._pruning: asyncio.Task[None] | None = None
        self.models_seen: set[str] = set()  # for sgl_frontend_model_instances

    async def start(self) -> None:
        """Subscribe to the event plane and start watching discovery."""
        await self.mux.start()
        if self.direct is not None:
            try:
                self.dispatcher.direct = await self.direct.start()
            except OSError as exc:
                msg = (
                    f"frontend.direct_host {self.direct.host!r}: cannot listen for direct"
                    f" streams ({exc.strerror or exc}); give an address of this machine the"
                    " nodes can reach, or set frontend.direct_streams = false"
                )
                raise RuntimeError(msg) from exc
        self._subscriptions = [
            await self.nc.subscribe(f"{self.namespace}.*.kv_events", cb=self._on_kv_events),
            await self.nc.subscribe(f"{self.namespace}.*.kv_events.head", cb=self._on_kv_head),
            await self.nc.subscribe(f"{self.namespace}.*.load_metrics", cb=self._on_metrics),
        ]
        await self.replay.run(REPLAY_TIMEOUT)  # live batches are held meanwhile
        self.discovery.start()
        self._pruning = asyncio.get_running_loop().create_task(self._prune())

    async def close(self) -> None:
        """Stop watching, cancel background work, unsubscribe."""
        await self.discovery.stop()
        if self._pruning is not None:
            self._pruning.cancel()
        if self._tasks:  # e.g. the cancels of streams cut by the stop: let them go out
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await self.mux.stop()
        if self.direct is not None:
            await self.direct.stop()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background (kept referenced until done; failures logged)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.warning("background task failed", error=f"{type(exc).__name__}: {exc}")

    # --- the event plane --------------------------------------------------------------------

    async def _on_kv_events(self, msg: Msg) -> None:
        try:
            batch = decode_json(msg.data, KvEventBatch)
        except DecodeError:
            metrics.KV_BATCHES.labels("undecodable").inc()
            return
        self._events_subjects[batch.instance_id] = msg.subject
        self.replay.live(batch)

    async def _on_kv_head(self, msg: Msg) -> None:
        """A relay's last sequence number: newer than the last batch of the rank that
        reached us means its last batches were lost on the way (no later batch shows it)."""
        try:
            head = decode_json(msg.data, KvHead)
        except DecodeError:
            return
        if self.replay.replaying:
            return  # the replay's end is compared with live batches, not heads
        key = (head.instance_id, head.dp_rank)
        if self.indexer.behind(key, head.seq):
            self._events_subjects[head.instance_id] = msg.subject.removesuffix(".head")
            self._ask_resync(key, asyncio.get_running_loop().time())

    def _apply_kv(self, batch: KvEventBatch) -> None:
        now = asyncio.get_running_loop().time()
        outcome = self.indexer.apply(batch, now)
        metrics.KV_BATCHES.labels(outcome).inc()
        key = (batch.instance_id, batch.dp_rank)
        if outcome == "resync":
            self._resync_asked.pop(key, None)  # the view came again (asked for or not)
        elif outcome in ("gap", "joined", "stale"):
            self._ask_resync(key, now)

    def _ask_resync(self, key: tuple[str, int], now: float) -> None:
        """Batches of this rank were lost on the way (NATS is at most once, e.g. across a
        cluster partition): ask its relay to send the rank's view again, at most once per
        `RESYNC_INTERVAL` seconds, and again (from `_prune`) until a resync of the rank
        comes: the ask itself may be lost. Until then the index is off by what was lost."""
        instance_id, rank = key
        subject = self._events_subjects.get(instance_id)
        if subject is None or now - self._resync_asked.get(key, -RESYNC_INTERVAL) < RESYNC_INTERVAL:
            return
        again = key in self._resync_asked
        self._resync_asked[key] = now
        metrics.KV_RESYNCS_ASKED.inc()
        self.log.info(
            "kv events lost on the way; asked the node for its view again",
            instance_id=instance_id,
            dp_rank=rank,
            again=again,
        )
        request = KvResyncRequest(instance_id=instance_id, dp_rank=rank)
        self.spawn(self.nc.publish(resync_subject(subject, instance_id), encode_json(request)))

    async def _on_metrics(self, msg: Msg) -> None:
        try:
            sample = decode_json(msg.data, LoadMetrics)
        except DecodeError:
            return
        self.indexer.apply_metrics(sample, asyncio.get_running_loop().time())

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            live = {r.instance_id for r in self.discovery.records()}
            now = asyncio.get_running_loop().time()
            self.indexer.expire(now)
            for key in list(self._resync_asked):  # asked, and no resync came yet
                self._ask_resync(key, now)
            for instance_id in self.indexer.prune(live, now, PRUNE_GRACE):
                self._events_subjects.pop(instance_id, None)
                for key in [k for k in self._resync_asked if k[0] == instance_id]:
                    del self._resync_asked[key]
                self.log.info("forgot the KV view of a departed instance", instance_id=instance_id)

    def _on_discovery_change(self) -> None:
        for record in self.discovery.live():
            self.tokenizers.warm(record.model)
            if record.model.runtime_config.get("reasoning_parser"):
                self.parsers.warm()  # its every answer goes through a parser

    # --- reporting --------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        """Set the gauges that describe the current view (before a scrape)."""
        metrics.INSTANCES.clear()
        live = self.discovery.live()
        for _, mode in {(r.instance_id, r.model.mode) for r in live}:
            metrics.INSTANCES.labels(mode).inc()
        # A model seen once stays at 0 when its last instance goes (an alert's signal).
        serving = Counter(name for _, name in {(r.instance_id, r.model.name) for r in live})
        self.models_seen.update(serving)
        for name in self.models_seen:
            metrics.MODEL_INSTANCES.labels(name).set(serving.get(name, 0))
        metrics.DIRECT_CONNECTIONS.set(len(self.direct.transports) if self.direct else 0)
        metrics.INDEXED_BLOCKS.clear()
        for (instance_id, rank), count in self.indexer.block_counts().items():
            metrics.INDEXED_BLOCKS.labels(instance_id, str(rank)).set(count)

    def health(self) -> dict[str, Any]:
        """What `/health` reports."""
        live = self.discovery.live()
        return {
            "status": "ok" if self.nc.is_connected else "nats_disconnected",
            "nats_connected": self.nc.is_connected,
            "instances": len(live),
            "registered": len(self.discovery.records()),
            "models": sorted({r.model.name for r in live}),
            "routing": self.router.policy,
        }
