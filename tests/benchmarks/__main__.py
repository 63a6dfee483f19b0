"""Run every benchmark in turn: `python -m tests.benchmarks` (over 40 minutes)."""

from tests.benchmarks import (
    cluster_model,
    idle,
    kv_relay,
    migration,
    plane,
    recovery,
    request_path,
    routing,
    scale,
    ttft_idle,
)

for bench in (
    plane,
    kv_relay,
    recovery,
    scale,
    cluster_model,
    routing,
    migration,
    request_path,
    ttft_idle,
    idle,
):
    bench.main()
