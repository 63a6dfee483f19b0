"""The node's Prometheus metrics, defined once per process in one registry.

Actors restart; metrics must not be registered twice, so they live here at module level.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY"]

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "sgl_node_requests",
    "Requests by how they ended (finish reason or error code)",
    ["outcome"],
    registry=REGISTRY,
)
RESUMES = Counter(
    "sgl_node_stream_resumes",
    "Resume requests answered (chunks lost in transit sent again), by the stream's state",
    ["state"],
    registry=REGISTRY,
)
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
    "sgl_node_kv_cache_usage", "KV cache usage, 0..1", ["dp_rank"], registry=REGISTRY
)
PREFIX_HIT = Gauge(
    "sgl_node_prefix_hit_rate",
    "Prefix cache hit rate of the last prefill",
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

NATS_PUBLISHED = Gauge(
    "sgl_node_nats_published", "Messages published on NATS by this node", registry=REGISTRY
)
NATS_DROPPED = Gauge(
    "sgl_node_nats_dropped", "Publishes dropped (disconnected, buffer full)", registry=REGISTRY
)
NATS_RECONNECTS = Gauge("sgl_node_nats_reconnects", "NATS reconnects", registry=REGISTRY)
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
