"""Run every benchmark in turn: `python -m tests.benchmarks` (about 40 minutes)."""

from tests.benchmarks import (
    cluster_model,
    kv_relay,
    plane,
    recovery,
    request_path,
    routing,
    scale,
    ttft_idle,
)

for bench in (plane, kv_relay, recovery, scale, cluster_model, routing, request_path, ttft_idle):
    bench.main()
