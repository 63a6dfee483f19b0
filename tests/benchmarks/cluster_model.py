"""The fabric's control-plane load per instance, on one server and on a 3-server cluster:
many lightweight fake instances (registration + heartbeats + KV events, no engine) to
check the 1,000-node model's rates at a few hundred instances on this machine.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.cluster_model

Each fake instance is what a node is to NATS, without an engine: one connection, the
node's subscriptions (generate in the queue group, its own subject, cancel, resume,
tree), its record put in the discovery bucket at start and every `HEARTBEAT` s, and a
KV-event batch every `EVENT_EVERY` s. One watcher follows the bucket (as a frontend does)
and one subscriber the KV events. Measured: the time until every record is written, the
heartbeat put latency, the rates the watcher and subscriber see against those sent, and
the servers' subscriptions and memory.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from supervisor.nats_cluster import NatsCluster
from tests.benchmarks._common import table, write_section

SIZES = (100, 300)
HEARTBEAT = 2.0
EVENT_EVERY = 0.5
WINDOW = 10.0  # seconds of steady state measured
RECORD = b"x" * 700  # an InstanceRecord with its model card is ~0.7 KB of JSON
BATCH = b"y" * 220  # a KvEventBatch of a few stored blocks
SUBJECTS = ("generate", "generate.{i}", "cancel", "resume", "tree.{i}")


class Fleet:
    """N fake instances and their counters."""

    def __init__(self, urls: list[str], size: int, bucket: str) -> None:
        self.urls, self.size, self.bucket = urls, size, bucket
        self.conns: list[Client] = []
        self.latencies: list[float] = []
        self.put_errors = 0
        self.sent_batches = 0
        self.stop = asyncio.Event()

    async def start(self, replicas: int) -> float:
        """Connect and subscribe every instance, make the bucket, write every record;
        the seconds the writes took (all N registered)."""
        for i in range(self.size):
            nc = await nats.connect(self.urls, name=f"fake-{i}")
            for subject in SUBJECTS:
                queue = "q" if subject == "generate" else ""
                await nc.subscribe(f"model.backend.{subject.format(i=i)}", queue=queue)
            self.conns.append(nc)
        js = self.conns[0].jetstream()
        await js.create_key_value(bucket=self.bucket, ttl=10.0, history=1, replicas=replicas)
        started = time.monotonic()
        await asyncio.gather(*(self._put(i) for i in range(self.size)))
        return time.monotonic() - started

    async def _put(self, i: int) -> None:
        kv = await self.conns[i].jetstream().key_value(self.bucket)
        at = time.monotonic()
        try:
            await kv.put(f"model.backend.generate.{i}", RECORD)
            self.latencies.append(time.monotonic() - at)
        except Exception:  # noqa: BLE001 - counted: a lost heartbeat
            self.put_errors += 1

    async def instance(self, i: int) -> None:
        """Heartbeats and KV events of instance i until stopped (phases spread)."""
        await asyncio.sleep(HEARTBEAT * i / self.size)
        next_beat = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                next_beat += HEARTBEAT
                asyncio.get_running_loop().create_task(self._put(i))
            await self.conns[i].publish("model.backend.kv_events", BATCH)
            self.sent_batches += 1
            await asyncio.sleep(EVENT_EVERY)

    async def close(self) -> None:
        for nc in self.conns:
            await nc.close()


async def _count(nc: Client, subject: str, counter: list[int]) -> Any:
    async def on(_msg: Any) -> None:
        counter[0] += 1

    return await nc.subscribe(subject, cb=on)


def _varz(cluster: NatsCluster) -> tuple[int, float]:
    subs = mem = 0.0
    for server in cluster.servers:
        varz = server.monitor("/varz") or {}
        subs += varz.get("subscriptions", 0)
        mem += varz.get("mem", 0) / 2**20
    return int(subs), mem


async def measure(cluster: NatsCluster, size: int, replicas: int) -> list[object]:
    fleet = Fleet(cluster.urls, size, f"model{size}r{replicas}")
    watcher = await nats.connect(cluster.urls)
    updates, batches = [0], [0]
    await _count(watcher, f"$KV.{fleet.bucket}.>", updates)
    await _count(watcher, "model.backend.kv_events", batches)
    registered = await fleet.start(replicas)
    fleet.latencies.clear()
    tasks = [asyncio.create_task(fleet.instance(i)) for i in range(size)]
    await asyncio.sleep(HEARTBEAT)  # every phase started
    u0, b0, s0 = updates[0], batches[0], fleet.sent_batches
    await asyncio.sleep(WINDOW)
    rates = (updates[0] - u0) / WINDOW, (batches[0] - b0) / WINDOW
    sent = (fleet.sent_batches - s0) / WINDOW
    subs, mem = _varz(cluster)
    fleet.stop.set()
    await asyncio.gather(*tasks)
    lat = sorted(fleet.latencies) or [float("nan")]
    await fleet.close()
    await watcher.close()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    servers = len(cluster.servers)
    return [
        f"{servers} server{'s' if servers > 1 else ''}, R{replicas}",
        size,
        registered,
        statistics.median(lat) * 1000,
        p99 * 1000,
        fleet.put_errors,
        rates[0],
        size / HEARTBEAT,
        rates[1],
        sent,
        subs,
        mem,
    ]


def main() -> None:
    rows: list[list[object]] = []
    for servers, replicas in ((1, 1), (3, 3)):
        for size in SIZES:
            with NatsCluster(Path(tempfile.mkdtemp(prefix="bench-model-")), size=servers) as c:
                rows.append(asyncio.run(measure(c, size, replicas)))
                print(rows[-1], flush=True)
    body = (
        "Fake instances (no engine; one NATS connection each, a node's 5 subscriptions, its "
        f"0.7 KB record put at start and every {HEARTBEAT:g} s, a 220-byte KV-event batch "
        f"every {EVENT_EVERY:g} s), all in one Python process on this {os.cpu_count()}-core "
        "machine with the servers. *Registered*: all N first puts acknowledged, in parallel. "
        f"Rates over {WINDOW:g} s of steady state, as a frontend's watcher of the bucket and a "
        "subscriber of the KV events see them, against what was sent. Subscriptions and "
        "memory: summed over the servers (/varz).\n\n"
        + table(
            [
                "fabric",
                "instances",
                "all registered after s",
                "heartbeat put p50 ms",
                "p99 ms",
                "put errors",
                "bucket updates/s seen",
                "sent",
                "KV batches/s seen",
                "sent",
                "subscriptions",
                "server MiB",
            ],
            rows,
        )
    )
    write_section(
        "cluster_model", "Control plane per instance, one server vs a 3-server cluster", body
    )


if __name__ == "__main__":
    main()
