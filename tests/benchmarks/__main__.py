"""Run every benchmark in turn: `python -m tests.benchmarks` (about 25 minutes)."""

from tests.benchmarks import kv_relay, plane, recovery, request_path, scale

for bench in (plane, kv_relay, recovery, scale, request_path):
    bench.main()
