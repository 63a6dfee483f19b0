"""The OpenAI frontend on a three-server NATS cluster, under load from the official client,
through the loss of its own server (kill -9), an ordered restart of a node's server, a
partition of that server (8 s) and a rolling restart of all three: every streamed answer
completes, the frontend still sees both instances after, and its
KV index holds as many blocks per rank as each node's engine caches.

A request the frontend publishes as its server dies never reaches a node; the frontend
finds no node holding it (resume probes) and sends it again. The nodes keep the default
lease (10 s): the restarted server may have led the discovery bucket, and its new
leader can take ~5 s to be elected and caught up, during which no heartbeat is written
(with a 5 s lease both records expired then, and for 0.1 s the frontend had no instance
of the model: 404)."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import nats

from messages.chaos import AdminReply, AdminRequest
from messages.codec import decode_json, encode_json
from supervisor.chaos_nodes import NatsAccess, NodeUnderTest
from supervisor.nats_cluster import NatsCluster
from tests.frontend.harness import parse_metric, start_frontend
from tests.supervision.children import wait_until


def _batch_counts(nodes: list[NodeUnderTest], frontend: Any) -> dict[str, float]:
    """Batches each node's relays published per rank, and what the frontend did with the
    batches it received (applied, resync, gap)."""
    counts: dict[str, float] = {}
    for node in nodes:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.system_port}/metrics") as reply:
            text = reply.read().decode()
        for rank in ("0", "1"):
            name = "sgl_node_kv_event_batches"
            counts[f"{node.instance_id}/{rank}"] = parse_metric(text, name, {"dp_rank": rank})
    for outcome in ("applied", "resync", "gap"):
        name = "sgl_frontend_kv_event_batches"
        counts[f"frontend/{outcome}"] = frontend.metric(name, {"outcome": outcome})
    return counts


def _load(
    client: object, stop: threading.Event, outcomes: Counter[str], lock: threading.Lock
) -> None:
    while not stop.is_set():
        try:
            stream = client.chat.completions.create(  # type: ignore[attr-defined]
                model="sim",
                messages=[{"role": "user", "content": "hello cluster"}],
                max_tokens=48,
                stream=True,
            )
            reasons = [c.choices[0].finish_reason for c in stream if c.choices]
            outcome = reasons[-1] if reasons and reasons[-1] else "no finish reason"
        except Exception as exc:  # noqa: BLE001 - counted and reported
            outcome = f"{type(exc).__name__}: {exc}"[:120]
        with lock:
            outcomes[outcome] += 1


async def _kv_view(node: NodeUnderTest, token: str) -> list[list[int]]:
    """The blocks the node's engine caches, per DP rank (admin `kv_view`, sim engine)."""
    nc = await nats.connect(node.url)
    try:
        msg = await nc.request(
            f"dynamo.backend.admin.{node.instance_id}",
            encode_json(AdminRequest(token=token, op="kv_view")),
            timeout=20,
        )
    finally:
        await nc.close()
    reply = decode_json(msg.data, AdminReply)
    assert reply.ok, reply
    return [list(rank) for rank in reply.data["ranks"]]


def test_the_frontend_rides_through_server_loss_restart_partition_and_a_rolling_restart(
    tmp_path: Path,
) -> None:
    token = secrets.token_hex(16)
    cluster = NatsCluster(tmp_path / "fabric", partitionable=True).start()
    nodes: list[NodeUnderTest] = []
    frontend = None
    try:
        for k in (0, 1):
            access = NatsAccess.cluster(cluster.urls, k, replicas=3)
            name = f"node{k}-{secrets.token_hex(3)}"
            nodes.append(
                NodeUnderTest("configs/sim.toml", tmp_path, access, name, admin_token=token)
            )
        for node in nodes:
            node.wait_ready(120)
        urls = cluster.urls
        frontend = start_frontend(
            tmp_path, urls[2], nats={"url": urls[2:] + urls[:2], "randomize": False}
        )
        frontend.wait_instances(2, timeout=60)
        stop, lock, outcomes = threading.Event(), threading.Lock(), Counter[str]()
        client = frontend.client(timeout=60)
        threads = [
            threading.Thread(target=_load, args=(client, stop, outcomes, lock)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: outcomes["length"] >= 10, timeout=60)
        cluster.kill(2)  # the frontend's own server
        assert wait_until(lambda: outcomes["length"] >= 30, timeout=60)
        cluster.start_server(2)
        cluster.wait_formed(60)
        cluster.stop_server(0)  # node 0's server, in order
        cluster.start_server(0)
        cluster.wait_formed(60)
        done = outcomes["length"]
        assert wait_until(lambda: outcomes["length"] >= done + 20, timeout=60)
        # node 0's server cut off from the others for 8 s: the frontend cannot reach node 0
        # (its streams there pause, then continue on node 1)
        cluster.partition(0)
        cut = time.monotonic()
        done = outcomes["length"]
        assert wait_until(lambda: outcomes["length"] >= done + 10, timeout=60)
        time.sleep(max(0.0, 8.0 - (time.monotonic() - cut)))
        cluster.heal(0)
        cluster.wait_formed(60)
        for i in (0, 1, 2):  # a rolling restart, one server after another
            cluster.stop_server(i)
            cluster.start_server(i)
            cluster.wait_formed(60)
        done = outcomes["length"]
        assert wait_until(lambda: outcomes["length"] >= done + 20, timeout=60)
        stop.set()
        for thread in threads:
            thread.join(90)
        print(dict(outcomes))
        assert set(outcomes) == {"length"}, dict(outcomes)
        frontend.wait_instances(2, timeout=60)
        # The frontend's KV index, after all that, holds per rank as many blocks as each
        # node's engine actually caches (events lost in a fault are made good by a resync).
        views: dict[str, list[list[int]]] = {}

        def index_matches() -> bool:
            for node in nodes:
                views[node.instance_id] = asyncio.run(_kv_view(node, token))
            return all(
                frontend.metric(
                    "sgl_frontend_kv_indexed_blocks",
                    {"instance_id": instance_id, "dp_rank": str(rank)},
                )
                == len(blocks)
                for instance_id, ranks in views.items()
                for rank, blocks in enumerate(ranks)
            )

        matched = wait_until(index_matches, timeout=30, interval=0.5)
        indexed = {
            (i, r): frontend.metric(
                "sgl_frontend_kv_indexed_blocks", {"instance_id": i, "dp_rank": str(r)}
            )
            for i, ranks in views.items()
            for r in range(len(ranks))
        }
        assert matched, (
            {(i, r): len(b) for i, ranks in views.items() for r, b in enumerate(ranks)},
            indexed,
            frontend.metric("sgl_frontend_kv_event_batches", {"outcome": "gap"}),
            _batch_counts(nodes, frontend),  # where batches went missing, if they did
        )
        print("KV index resyncs asked:", frontend.metric("sgl_frontend_kv_resyncs_asked_total"))
        assert all(blocks for ranks in views.values() for blocks in ranks), views
    finally:
        if frontend is not None:
            frontend.kill()
        for node in nodes:
            node.kill()
        cluster.close()
