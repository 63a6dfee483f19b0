"""KV event batches lost between a node and the frontend are made good.

NATS delivers at most once: a frontend cut off from its server misses the batches a node
publishes meanwhile (in a cluster, a partition does the same). The next batch shows the
frontend a gap in the rank's sequence; when no batch follows, the relay's head (`KvHead`,
its last sequence number, published after a quiet second and then at growing intervals)
shows it. The frontend asks the rank's relay for its view again (`KvResyncRequest`), and
the relay publishes a resync and the publisher's history up to what it relayed: the
frontend's index again holds exactly the blocks the engine caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from actors.nats.proxy import NatsCutProxy
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.frontend.harness import Frontend, start_frontend
from tests.node.harness import NatsServer, NodeProcess, admin_request, start_node
from tests.supervision.children import wait_until

TOKEN = "resync-" + uuid.uuid4().hex
PROMPT = " ".join(f"word{i}" for i in range(80))  # several pages of the sim's cache


def _ask(url: str, tag: str) -> None:
    """One request straight to the node (not through the frontend): new cached pages."""
    request = GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=f"{tag} {PROMPT}", stop=StopConditions(max_tokens=4)
    )

    async def go() -> None:
        async with NodeClient(url) as client:
            chunks = [c async for c in client.generate(request)]
            assert chunks[-1].finish_reason == "length", chunks[-1]

    asyncio.run(go())


def _cached(node: NodeProcess) -> int:
    reply = asyncio.run(admin_request(node, TOKEN, "kv_view"))
    assert reply.ok, reply
    (blocks,) = reply.data["ranks"]
    return len(blocks)


def _indexed(frontend: Frontend, node: NodeProcess) -> float:
    labels = {"instance_id": node.instance_id, "dp_rank": "0"}
    return frontend.metric("sgl_frontend_kv_indexed_blocks", labels)


def _lose_batches(
    proxy: NatsCutProxy, frontend: Frontend, url: str, node: NodeProcess, tags: tuple[str, ...]
) -> None:
    """Cut the frontend off, make new cached pages (batches it never gets), reconnect it."""
    proxy.cut(3.0)
    assert wait_until(lambda: not frontend.health().get("nats_connected"), timeout=10)
    before = _cached(node)
    for tag in tags:
        _ask(url, tag)
    assert _cached(node) > before
    assert wait_until(lambda: frontend.health().get("nats_connected") is True, timeout=30)


def _caught_up(frontend: Frontend, node: NodeProcess) -> None:
    """The frontend's index of the node's rank comes to hold what the engine caches."""
    assert wait_until(lambda: _indexed(frontend, node) == _cached(node), timeout=30), (
        _indexed(frontend, node),
        _cached(node),
    )


@contextlib.contextmanager
def _fabric(
    tmp_path: Path, cut_off: Literal["frontend", "node"], **node_sections: dict[str, Any]
) -> Iterator[tuple[NatsServer, NatsCutProxy, NodeProcess, Frontend]]:
    """A NATS server, a node (admin on) and a frontend, `cut_off` reaching the server
    through a proxy that can sever it; the node has cached a first prompt and the
    frontend indexed it."""
    server = NatsServer(tmp_path)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    proxy = NatsCutProxy("127.0.0.1", server.port)
    through_proxy = f"nats://127.0.0.1:{proxy.start()}"
    node, frontend = None, None
    try:
        node = start_node(
            tmp_path,
            embedded_nats=False,
            nats_url=through_proxy if cut_off == "node" else server.url,
            admin={"enabled": True, "token_file": str(token)},
            **node_sections,
        )
        node.wait_ready(60)
        frontend = start_frontend(tmp_path, through_proxy if cut_off == "frontend" else server.url)
        frontend.wait_instances(1)
        _ask(server.url, "first")
        _caught_up(frontend, node)
        assert _cached(node) > 0
        yield server, proxy, node, frontend
    finally:
        if frontend is not None:
            frontend.kill()
        proxy.close()
        if node is not None:
            node.kill()
        server.stop()


def test_kv_events_lost_on_the_way_to_the_frontend_are_made_good_by_a_resync(
    tmp_path: Path,
) -> None:
    with _fabric(tmp_path, "frontend") as (server, proxy, node, frontend):
        # 1. The last batches of a burst lost: no later batch shows the gap; the head does.
        _lose_batches(proxy, frontend, server.url, node, ("while", "the", "frontend"))
        _caught_up(frontend, node)
        assert frontend.metric("sgl_frontend_kv_event_batches_total", {"outcome": "gap"}) == 0
        assert frontend.metric("sgl_frontend_kv_resyncs_asked_total") >= 1
        rebuilt = "kv events were lost on the way; the subscribers' view rebuilt"
        node.wait_log(lambda r: r.get("event") == rebuilt and r.get("reason") == "subscriber_gap")
        # 2. Batches lost, then another one comes at once: its sequence number shows the gap.
        asked = frontend.metric("sgl_frontend_kv_resyncs_asked_total")
        _lose_batches(proxy, frontend, server.url, node, ("is", "away", "again"))
        _ask(server.url, "back")
        _caught_up(frontend, node)
        assert frontend.metric("sgl_frontend_kv_resyncs_asked_total") > asked


def test_kv_events_the_nodes_own_link_dropped_at_the_tail_are_rebuilt_by_the_relay(
    tmp_path: Path,
) -> None:
    """The relay's NATS link drops what it cannot hold while NATS is away (here it holds
    nothing): a stream's last pages, cached while its node is cut off, never leave the
    node, and no batch follows. The relay sees its link's drop count move when it next
    looks at its head, once publishes flow again (not before: that rebuild would be
    dropped too), and rebuilds the subscribers' view itself; the frontend never asks."""
    with _fabric(
        tmp_path,
        "node",
        nats={"reconnect_buffer_bytes": 0},
        engine__sim={"decode_time_per_step": 0.01},
    ) as (server, proxy, node, frontend):
        before = _cached(node)
        asked = frontend.metric("sgl_frontend_kv_resyncs_asked_total")

        async def cut_mid_stream() -> list[StreamChunk]:
            request = GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompt=f"cut {PROMPT}",
                stop=StopConditions(max_tokens=150),  # 1.5 s, all of it while cut off
            )
            async with NodeClient(server.url) as client:
                chunks = []
                async for chunk in client.generate(request, idle_timeout=60):
                    if not chunks:
                        proxy.cut(4.0)  # its prompt's pages went out; the rest will not
                    chunks.append(chunk)
                return chunks

        chunks = asyncio.run(cut_mid_stream())
        assert chunks[-1].finish_reason == "length", chunks[-1]
        dropped = "publish dropped: disconnected and the buffer is full"
        node.wait_log(lambda r: r.get("event") == dropped)
        assert _cached(node) > before
        _caught_up(frontend, node)
        rebuilt = "kv events were lost on the way; the subscribers' view rebuilt"
        rebuilds = node.wait_log(lambda r: r.get("event") == rebuilt and r.get("reason") == "gap")
        assert len(rebuilds) == 1  # once NATS was back: none lost to the outage itself
        assert frontend.metric("sgl_frontend_kv_resyncs_asked_total") == asked
