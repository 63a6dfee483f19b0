"""The frontend's own Prometheus metrics (served on its `/metrics`), in one registry.

Defined once per process at module level: the FrontendActor restarts, metrics must not
be registered twice. Gauges that describe the current view (instances, indexed blocks)
are refreshed from the state when `/metrics` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY"]

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "sgl_frontend_requests",
    "HTTP requests by route and outcome status (for streams: the status of the error that "
    "ended them, or 200)",
    ["route", "status"],
    registry=REGISTRY,
)
TTFT = Histogram(
    "sgl_frontend_time_to_first_token_seconds",
    "HTTP request received to its first token",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DURATION = Histogram(
    "sgl_frontend_request_duration_seconds",
    "HTTP request received to its last token (generate routes)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ROUTING = Counter(
    "sgl_frontend_routing_decisions",
    "Instances chosen, by routing policy and the instance's serving mode",
    ["policy", "mode"],
    registry=REGISTRY,
)
HIT_BLOCKS = Counter(
    "sgl_frontend_cache_hit_blocks",
    "Prompt KV blocks already cached on the chosen rank, per the frontend's KV index",
    registry=REGISTRY,
)
PROMPT_BLOCKS = Counter(
    "sgl_frontend_prompt_blocks",
    "Full KV blocks of the prompts routed",
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "sgl_frontend_prompt_tokens",
    "Prompt tokens of finished requests (as the engines counted them)",
    registry=REGISTRY,
)
CACHED_TOKENS = Counter(
    "sgl_frontend_cached_tokens",
    "Prompt tokens the engines found in their prefix cache",
    registry=REGISTRY,
)
COMPLETION_TOKENS = Counter(
    "sgl_frontend_completion_tokens",
    "Tokens generated",
    registry=REGISTRY,
)
RESUMED = Counter(
    "sgl_frontend_resumed_streams",
    "Streams whose chunks lost in transit were asked for again and received",
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "sgl_frontend_failovers",
    "Requests sent again to another instance, by why",
    ["reason"],
    registry=REGISTRY,
)
MIGRATIONS = Counter(
    "sgl_frontend_migrations",
    "Streams continued on another instance after their first chunk, by why",
    ["reason"],
    registry=REGISTRY,
)
CANCELS = Counter(
    "sgl_frontend_cancels",
    "Cancel requests sent to nodes (client gone, deadline, abandoned attempt)",
    registry=REGISTRY,
)
KV_BATCHES = Counter(
    "sgl_frontend_kv_event_batches",
    "KV event batches received, by outcome (applied, resync, gap, joined, undecodable)",
    ["outcome"],
    registry=REGISTRY,
)
KV_RESYNCS_ASKED = Counter(
    "sgl_frontend_kv_resyncs_asked",
    "Times a rank's view was asked again after KV event batches were lost on the way",
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "sgl_frontend_inflight_requests",
    "Requests the frontend has in flight to nodes",
    registry=REGISTRY,
)
MODEL_INSTANCES = Gauge(
    "sgl_frontend_model_instances",
    "Live instances in discovery serving each model this frontend has seen (0: none left)",
    ["model"],
    registry=REGISTRY,
)
INSTANCES = Gauge(
    "sgl_frontend_instances",
    "Live instances in discovery, by serving mode",
    ["mode"],
    registry=REGISTRY,
)
DIRECT_CONNECTIONS = Gauge(
    "sgl_frontend_direct_stream_connections",
    "Nodes connected to send their chunks straight here (direct streams)",
    registry=REGISTRY,
)
INDEXED_BLOCKS = Gauge(
    "sgl_frontend_kv_indexed_blocks",
    "KV blocks the frontend believes cached, per instance and DP rank",
    ["instance_id", "dp_rank"],
    registry=REGISTRY,
)
