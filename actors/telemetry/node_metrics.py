"""The node's Prometheus metrics, defined once per process in one registry.

Actors restart; metrics must not be registered twice, so they live here at module level.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from messages.request import ERROR_CODES, FINISH_REASONS

__all__ = ["REGISTRY"]

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "sgl_node_requests",
    "Requests by how they ended (finish reason or error code)",
    ["outcome"],
    registry=REGISTRY,
)
# Every outcome exists at 0 from the start: rate() and increase() miss the first requests
# of a series that appears with them.
for _outcome in (*FINISH_REASONS, *ERROR_CODES):
    REQUESTS.labels(_outcome)
RESUMES = Counter(
    "sgl_node_stream_resumes",
    "Resume requests answered (chunks lost in transit sent again), by the stream's state",
    ["state"],
    registry=REGISTRY,
)
MIGRATIONS = Counter(
    "sgl_node_migrations",
    "Streams continued across a seam, by why: engine_lost (its engine died, stalled or "
    "restarted, or its DP rank was lost), handler_crash, handed_over (to another node on a "
    "drain), taken_over (a continuation this node took from elsewhere)",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("engine_lost", "handler_crash", "handed_over", "taken_over"):
    MIGRATIONS.labels(_reason)
TTFT = Histogram(
    "sgl_node_time_to_first_token_seconds",
    "Request received to first token published",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ITL = Histogram(
    "sgl_node_inter_token_latency_seconds",
    "Time between streamed chunks",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
E2E = Histogram(
    "sgl_node_request_duration_seconds",
    "Request received to last chunk published",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENS_IN = Counter(
    "sgl_node_prompt_tokens", "Prompt tokens of finished requests", registry=REGISTRY
)
TOKENS_OUT = Counter("sgl_node_completion_tokens", "Tokens generated", registry=REGISTRY)
CACHED_TOKENS = Counter(
    "sgl_node_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=REGISTRY
)
INFLIGHT = Gauge("sgl_node_inflight_requests", "Requests in the engine now", registry=REGISTRY)

KV_ACTIVE = Gauge("sgl_node_kv_active_blocks", "KV pages in use", ["dp_rank"], registry=REGISTRY)
KV_TOTAL = Gauge("sgl_node_kv_total_blocks", "KV pages in all", ["dp_rank"], registry=REGISTRY)
WAITING = Gauge(
    "sgl_node_requests_waiting", "Requests queued in the scheduler", ["dp_rank"], registry=REGISTRY
)
RUNNING = Gauge(
    "sgl_node_requests_running", "Requests in the running batch", ["dp_rank"], registry=REGISTRY
)
CACHE_USAGE = Gauge(
    "sgl_node_kv_cache_usage_ratio", "KV cache usage, 0..1", ["dp_rank"], registry=REGISTRY
)
PREFIX_HIT = Gauge(
    "sgl_node_prefix_hit_ratio",
    "Prefix cache hit rate of the last prefill, 0..1",
    ["dp_rank"],
    registry=REGISTRY,
)
SCHEDULER_SAMPLES = Counter(
    "sgl_node_scheduler_metrics_samples",
    "Scheduler metric samples received",
    ["dp_rank"],
    registry=REGISTRY,
)

KV_BATCHES = Counter(
    "sgl_node_kv_event_batches", "KV event batches relayed", ["dp_rank"], registry=REGISTRY
)
KV_EVENTS = Counter(
    "sgl_node_kv_events", "KV events relayed", ["dp_rank", "type"], registry=REGISTRY
)
KV_GAPS = Counter(
    "sgl_node_kv_event_gaps", "Sequence gaps seen by the relay", ["dp_rank"], registry=REGISTRY
)
KV_RESYNCS = Counter(
    "sgl_node_kv_resyncs",
    "Resyncs published (AllBlocksCleared)",
    ["dp_rank", "reason"],
    registry=REGISTRY,
)
ZMQ_DROPPED = Counter(
    "sgl_node_zmq_messages_dropped",
    "Undecodable ZMQ messages dropped",
    ["socket"],
    registry=REGISTRY,
)


class _NatsLinkMetrics(Collector):
    """The node's NATS link, read at scrape time: its counters as Prometheus counters (the
    link counts them itself; a prometheus_client Counter cannot be set) and whether it is
    connected (0 also before the fabric connected)."""

    def __init__(self) -> None:
        self.link: Any = None  # the fabric's NatsLink, once connected

    def collect(self) -> Iterator[Metric]:
        link = self.link
        connected = GaugeMetricFamily(
            "sgl_node_nats_connected", "1 while the node's NATS connection is up"
        )
        connected.add_metric([], 1.0 if link is not None and link.connected.is_set() else 0.0)
        yield connected
        if link is None:
            return
        for name, documentation, value in (
            ("sgl_node_nats_messages_published", "Messages published on NATS", link.published),
            ("sgl_node_nats_publishes_dropped", "Publishes dropped (disconnected, buffer full)",
             link.dropped),
            ("sgl_node_nats_reconnects", "NATS reconnects", link.reconnects),
        ):  # fmt: skip
            yield CounterMetricFamily(name, documentation, value=value)
        direct = link.direct
        connections = GaugeMetricFamily(
            "sgl_node_direct_stream_connections",
            "Connections up to frontends that take chunks straight (not through NATS)",
        )
        connections.add_metric([], float(direct.connections))
        yield connections
        streams = CounterMetricFamily(
            "sgl_node_direct_streams",
            "Streams whose frontend asked for them straight, by the way they went (nats: "
            "the connection was not up when they began)",
            labels=["path"],
        )
        for path, count in direct.streams.items():
            streams.add_metric([path], count)
        yield streams
        yield CounterMetricFamily(
            "sgl_node_direct_chunks", "Chunks sent straight to a frontend", value=direct.sent
        )


NATS_LINK = _NatsLinkMetrics()
REGISTRY.register(NATS_LINK)
# The node's restart intensity (supervision.intensity restarts within supervision.period
# seconds): alerting rules compare the restarts they see with it.
RESTART_INTENSITY = Gauge(
    "sgl_node_restart_intensity",
    "Restarts a supervisor of this node allows within the period",
    registry=REGISTRY,
)
RESTART_PERIOD = Gauge(
    "sgl_node_restart_period_seconds",
    "The period of the restart intensity",
    registry=REGISTRY,
)
REGISTERED = Gauge("sgl_node_registered", "1 while the instance is in discovery", registry=REGISTRY)
FAULTS = Counter(
    "sgl_node_faults_injected",
    "Faults injected on purpose",
    ["fault", "outcome"],
    registry=REGISTRY,
)
ADMIN_REQUESTS = Counter(
    "sgl_node_admin_requests",
    "Admin requests by op and outcome",
    ["op", "outcome"],
    registry=REGISTRY,
)
CANARIES = Counter(
    "sgl_node_engine_canaries", "Engine health canaries by outcome", ["outcome"], registry=REGISTRY
)
