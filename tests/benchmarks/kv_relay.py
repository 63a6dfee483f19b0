"""KV relay throughput and latency: block events/s from a ZMQ publisher in SGLang's format
through one KvRelayActor to a NATS subscriber, p50/p99 relay latency, against a bare
zmq→nats forwarding loop in the same run. Targets: ≥ 100k events/s, ≥ 0.8 of the bare loop.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.kv_relay
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import nats

from messages.codec import decode_json
from messages.kv import KvEventBatch, decode_sglang_batch
from supervisor.client_replies import in_place
from tests.benchmarks._common import median, percentile, python, table, write_section
from tests.node.harness import NatsServer, free_ports

RUNS = 5
SECONDS = 4.0
PER_BATCH = 32


async def measure(url: str, subject: str, endpoint: str, raw: bool) -> dict[str, float]:
    nc = await nats.connect(url, pending_size=256 << 20)
    events = 0
    first = last = 0.0
    latencies: list[float] = []

    async def on(msg: nats.aio.msg.Msg) -> None:
        nonlocal events, first, last
        now = time.time()
        if raw:
            batch = decode_sglang_batch(msg.data)
            n, ts = len(batch.events), batch.ts
        else:
            out = decode_json(msg.data, KvEventBatch)
            if out.resync is not None:
                return
            n, ts = len(out.events), out.ts
        if not events:
            first = time.monotonic()
        events += n
        last = time.monotonic()
        latencies.append(now - ts)

    await nc.subscribe(subject, cb=on, pending_msgs_limit=10_000_000, pending_bytes_limit=2 << 30)
    await in_place(nc)
    producer = python(
        "-m",
        "tests.benchmarks._kv_producer",
        endpoint,
        str(SECONDS),
        str(PER_BATCH),
        stdout=subprocess.PIPE,
    )
    loop = asyncio.get_running_loop()
    sent_line = await loop.run_in_executor(None, producer.stdout.readline)  # type: ignore[union-attr]
    sent = int(sent_line) * PER_BATCH
    # wait until the pipe drains: no new event for a second
    while True:
        seen = events
        await asyncio.sleep(1.0)
        if events == seen:
            break
    producer.wait(10)
    await nc.close()
    span = max(last - first, 1e-9)
    return {
        "eps": events / span,
        "delivered": events / max(sent, 1),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    server = NatsServer(tmp)
    results: dict[str, list[dict[str, float]]] = {"bare": [], "relay": []}
    try:
        for _ in range(RUNS):
            for name in ("bare", "relay"):
                port = free_ports()
                endpoint = f"tcp://127.0.0.1:{port}"
                subject = f"bench.{name}.kv_events"
                module = (
                    "tests.benchmarks._bare_forwarder"
                    if name == "bare"
                    else "tests.benchmarks._relay_host"
                )
                receiver = python(
                    "-m", module, endpoint, server.url, subject, stdout=subprocess.PIPE
                )
                assert receiver.stdout is not None
                receiver.stdout.readline()
                try:
                    results[name].append(
                        asyncio.run(measure(server.url, subject, endpoint, raw=name == "bare"))
                    )
                finally:
                    receiver.kill()
                    receiver.wait()
        rows = []
        for name in ("bare", "relay"):
            runs = results[name]
            rows.append(
                (
                    name,
                    median([r["eps"] for r in runs]),
                    median([r["delivered"] for r in runs]),
                    median([r["p50_ms"] for r in runs]),
                    median([r["p99_ms"] for r in runs]),
                )
            )
        ratio = rows[1][1] / rows[0][1]
        body = (
            f"A producer process publishes batches of {PER_BATCH} BlockStored events (SGLang's format) as fast as it can "
            f"for {SECONDS:g} s; the receiver (bare forwarder or one KvRelayActor, each in its own process) publishes to NATS; "
            f"a subscriber counts events and the latency from the producer's timestamp. {RUNS} runs each, alternating; medians.\n\n"
            + table(
                ["contender", "events/s", "delivered", "latency p50 ms", "latency p99 ms"], rows
            )
            + f"\n\nrelay / bare: **{ratio:.2f}**; targets ≥ 100,000 events/s and ≥ 0.8 of the bare loop. "
            "(Latency under saturation measures queueing, not the relay's own cost.)"
        )
        write_section("kv_relay", "KV relay", body)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
