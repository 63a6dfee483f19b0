"""`MetricsActor`: scheduler load metrics from ZMQ → NATS and Prometheus.

The engine's schedulers push SGLang's `KvMetrics` (one PUSH socket per DP rank, to
an ipc path this actor binds). Every interval it publishes one `LoadMetrics` per rank on
`{namespace}.{component}.load_metrics`, with KV figures in pages, and sets the gauges.
A rank without a fresh sample is published with `stale = true` (SGLang sends nothing
while idle), so a router can tell "idle" from "unknown". An idle rank (nothing running
or waiting) whose figures are those it last published is published only every
`idle_interval`: the same numbers each second were most of an idle fabric's traffic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from actors.faults.zmq_faults import ZmqFaults
from actors.nats.link import NatsLink
from actors.telemetry import node_metrics
from actors.wake import WakeablePoller
from messages.chaos import ChaosZmq
from messages.codec import DecodeError, encode_json
from messages.engine import EngineInfo
from messages.metrics import LoadMetrics, SchedulerMetrics, decode_scheduler_metrics
from messages.node import GetEngineInfo, GetLink
from supervisor.core import ChildContext, ExitReason, SupervisedActor, ask
from supervisor.plan import MetricsSettings

__all__ = ["MetricsActor"]


@dataclass(frozen=True)
class _Publish:
    """Time to publish the load metrics."""


class MetricsActor(SupervisedActor):
    """Relays scheduler metrics; see the module docstring."""

    def __init__(
        self,
        context: ChildContext,
        settings: MetricsSettings,
    ) -> None:
        super().__init__(context)
        self.fabric_path = settings.fabric
        self.engine_path = settings.engine_actor
        self.instance_id = settings.instance_id
        self.subject = settings.subject
        self.interval = settings.interval
        self.idle_interval = settings.idle_interval
        self._last: dict[int, tuple[LoadMetrics, float]] = {}  # per rank: published, when
        self.link: NatsLink | None = None
        self.info: EngineInfo | None = None
        self._zmq = zmq.Context()
        self._sockets: list[zmq.Socket[bytes]] = []
        self._latest: dict[int, tuple[SchedulerMetrics, float]] = {}
        self._published_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pollers: list[WakeablePoller] = []
        self.faults = ZmqFaults()

    def on_start_up(self) -> None:
        self.link = ask(self.fabric_path, GetLink(), timeout=10)
        self.info = ask(self.engine_path, GetEngineInfo(), timeout=10)
        assert self.info is not None
        for rank, endpoint in enumerate(self.info.metrics_endpoints):
            sock = self._zmq.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
            self._sockets.append(sock)
            poller = WakeablePoller(sock)
            self._pollers.append(poller)
            thread = threading.Thread(
                target=self._read, args=(rank, sock, poller), name=f"metrics-{rank}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self.send_every(self.interval, _Publish())

    def on_exit(self, reason: ExitReason) -> None:
        self._halt.set()
        for poller in self._pollers:
            poller.wake()
        for thread in self._threads:
            thread.join(timeout=2)
        for poller in self._pollers:
            poller.close()
        for sock in self._sockets:
            sock.close(linger=0)
        self._zmq.term()

    def handle(self, message: Any) -> Any:
        match message:
            case _Publish():
                self._publish()
                return None
            case ChaosZmq():
                self.faults.set(message)
                return (
                    True,
                    f"metrics: dropping {message.drop:.0%}, delaying {message.delay_fraction:.0%}",
                )
        return super().handle(message)

    def _read(self, rank: int, sock: zmq.Socket[bytes], poller: WakeablePoller) -> None:
        while not self._halt.is_set():
            if not poller.poll():  # sleeps until a sample comes or on_exit wakes it
                continue
            data = sock.recv()
            if not self.faults.admit():
                continue
            try:
                sample = decode_scheduler_metrics(data)
            except DecodeError as exc:
                node_metrics.ZMQ_DROPPED.labels("scheduler_metrics").inc()
                self.log.warning("undecodable scheduler metrics dropped", error=str(exc))
                continue
            node_metrics.SCHEDULER_SAMPLES.labels(str(rank)).inc()
            with self._lock:
                self._latest[rank] = (sample, self.context.clock.now())

    def _publish(self) -> None:
        assert self.info is not None
        assert self.link is not None
        page = max(1, self.info.page_size)
        for rank in range(self.info.dp_size):
            with self._lock:
                latest = self._latest.get(rank)
            sample, received = latest if latest else (SchedulerMetrics(), 0.0)
            stale = latest is None or received <= self._published_at.get(rank, -1.0)
            self._published_at[rank] = self.context.clock.now()
            load = LoadMetrics(
                instance_id=self.instance_id,
                dp_rank=rank,
                request_active_slots=sample.request_active_slots,
                request_total_slots=sample.request_total_slots or self.info.max_batch_size,
                kv_active_blocks=sample.kv_active_blocks // page,
                kv_total_blocks=(sample.kv_total_blocks // page) or self.info.total_kv_blocks,
                num_requests_waiting=sample.num_requests_waiting,
                cache_usage=sample.gpu_cache_usage_perc,
                prefix_hit_rate=sample.gpu_prefix_cache_hit_rate,
                ts=time.time(),
                stale=stale,
            )
            now = self.context.clock.now()
            if self._unchanged_idle(rank, load, now):
                continue
            self._last[rank] = (load, now)
            self.link.publish(self.subject, encode_json(load))
            label = str(rank)
            node_metrics.KV_ACTIVE.labels(label).set(load.kv_active_blocks)
            node_metrics.KV_TOTAL.labels(label).set(load.kv_total_blocks)
            node_metrics.WAITING.labels(label).set(load.num_requests_waiting)
            node_metrics.RUNNING.labels(label).set(load.request_active_slots)
            node_metrics.CACHE_USAGE.labels(label).set(load.cache_usage)
            node_metrics.PREFIX_HIT.labels(label).set(load.prefix_hit_rate)

    def _unchanged_idle(self, rank: int, load: LoadMetrics, now: float) -> bool:
        """Whether the rank is idle with the figures it last published, published less
        than `idle_interval` ago (its time stamp and freshness aside)."""
        last = self._last.get(rank)
        if last is None or now - last[1] >= self.idle_interval - 1e-3:
            return False
        if load.request_active_slots or load.num_requests_waiting:
            return False
        same = msgspec.structs.replace(last[0], ts=load.ts, stale=load.stale)
        return same == load
