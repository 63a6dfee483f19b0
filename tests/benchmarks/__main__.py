"""Run every benchmark in turn: `python -m tests.benchmarks` (about 30 minutes)."""

from tests.benchmarks import kv_relay, plane, recovery, request_path, routing, scale

for bench in (plane, kv_relay, recovery, scale, routing, request_path):
    bench.main()
