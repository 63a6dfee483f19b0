"""One engine over two nodes on one machine (sim): a leader and a follower, each its own
OS process with its own tree, meeting at `node.dist_init_addr`, over one NATS."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host.spec import local_ranks
from messages.kv import BlockStored, KvEventBatch
from messages.metrics import LoadMetrics
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from supervisor.config import ConfigError, loads
from supervisor.plan import plan_node
from tests.node.harness import NodeProcess, free_ports, start_node, until, watching
from tests.node.test_node_sim import expected_text

INSTANCE = "mn-engine"


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.addr = f"127.0.0.1:{free_ports()}"
        self.leader = self._start(0)
        self.follower = self._start(1)

    def _node(self, rank: int) -> dict[str, Any]:
        return {
            "nnodes": 2,
            "node_rank": rank,
            "dist_init_addr": self.addr,
            "instance_id": INSTANCE,
            "join_timeout": 60.0,
        }

    def _start(self, rank: int) -> NodeProcess:
        if rank == 0:
            return start_node(
                self.tmp,
                name="leader",
                dp_size=2,
                node=self._node(0),
                engine__sim={"decode_time_per_step": 0.01},
            )
        return start_node(
            self.tmp,
            name=f"follower-{uuid.uuid4().hex[:4]}",
            dp_size=2,
            embedded_nats=False,
            nats_url=self.leader.url,
            node=self._node(1),
            # The same base port as the leader: each node binds only its own ranks' ports.
            engine={"kv_events_port": self.leader.kv_port},
            engine__sim={"decode_time_per_step": 0.01},
        )

    def restart_follower(self) -> None:
        self.follower.kill()
        self.follower = self._start(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    nodes = Pair(tmp_path_factory.mktemp("multinode"))
    try:
        nodes.leader.wait_ready(90)
        nodes.follower.wait_ready(90)
        yield nodes
    finally:
        nodes.follower.kill()
        nodes.leader.kill()


def _request(prompt: str, rank: int | None, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        stop=StopConditions(max_tokens=max_tokens),
        dp_rank=rank,
    )


async def _collect(client: NodeClient, request: GenerateRequest) -> list[StreamChunk]:
    return [c async for c in client.generate(request, idle_timeout=20)]


def _tree_ids(node: NodeProcess) -> dict[str, list[str]]:
    status, body = node.http("/tree")
    assert status == 200
    tree = json.loads(body)
    core = next(c for c in tree["children"] if c["id"] == "core")
    out = {"core": [c["id"] for c in core["children"]]}
    engine = next(c for c in core["children"] if c["id"] == "engine")
    out["engine"] = [c["id"] for c in engine["children"]]
    return out


def test_the_leader_registers_one_instance_and_the_follower_nothing(pair: Pair) -> None:
    async def go() -> list[Any]:
        async with NodeClient(pair.leader.url) as client:
            return await client.instances()

    records = asyncio.run(go())
    assert [r.instance_id for r in records] == [INSTANCE]
    assert records[0].model.dp_size == 2
    assert _tree_ids(pair.leader) == {
        "core": ["fabric", "engine", "handlers", "registrar"],
        "engine": ["engine_host", "engine_actor", "metrics", "kv_relay_0"],
    }
    assert _tree_ids(pair.follower) == {
        "core": ["fabric", "engine"],
        "engine": ["engine_host", "engine_actor", "kv_relay_1"],
    }
    status, body = pair.follower.http("/ready")
    assert status == 200, body
    assert json.loads(body)["registered"] is False


def test_requests_run_on_both_nodes_ranks_and_their_kv_events_and_metrics_arrive(
    pair: Pair,
) -> None:
    prompt = "spread over two nodes " * 4  # 88 tokens: 5 full pages

    def stored(batches: list[KvEventBatch]) -> set[int]:
        return {b.dp_rank for b in batches if any(isinstance(e, BlockStored) for e in b.events)}

    def served(metrics: list[LoadMetrics]) -> bool:  # both ranks, rank 1 with its cache
        ranks = {m.dp_rank for m in metrics}
        return ranks == {0, 1} and any(m.kv_total_blocks > 0 for m in metrics if m.dp_rank)

    async def go() -> tuple[list[list[StreamChunk]], list[KvEventBatch], list[LoadMetrics]]:
        async with (
            NodeClient(pair.leader.url) as client,
            watching(pair.leader.url, "kv-events") as batches,
            watching(pair.leader.url, "metrics") as metrics,
        ):
            answers = [
                await _collect(client, _request(prompt, rank, max_tokens=12)) for rank in (0, 1)
            ]
            unpinned = await asyncio.gather(
                *(_collect(client, _request(f"free {i}", None)) for i in range(8))
            )
            await until(lambda: stored(batches) == {0, 1}, 60, "pages stored on both ranks")
            await until(lambda: served(metrics), 60, "load metrics of both ranks")
            return answers + list(unpinned), list(batches), list(metrics)

    answers, batches, metrics = asyncio.run(go())
    for chunks in answers[:2]:
        assert chunks[-1].finish_reason == "length"
        assert "".join(c.text for c in chunks) == expected_text(prompt, 12)
    assert all(chunks[-1].finish_reason == "length" for chunks in answers[2:])
    assert stored(batches) == {0, 1}  # rank 1's events come from the follower's relay
    assert {b.instance_id for b in batches} == {INSTANCE}
    assert {m.dp_rank for m in metrics} == {0, 1}  # the follower's rank, via the leader
    assert {m.instance_id for m in metrics} == {INSTANCE}
    assert served(metrics)


def test_a_lost_follower_fails_its_rank_clearly_and_serves_again_when_it_returns(
    pair: Pair,
) -> None:
    pair.follower.kill()
    # The engine host's own log records come through the node's log as events of their own:
    # after 3 s of silence the leader's engine host declares the follower lost.
    assert pair.leader.wait_log(
        lambda r: "follower lost" in r["event"] and r.get("child", "").endswith("engine_host"),
        timeout=60,
    )

    async def during() -> tuple[list[StreamChunk], list[StreamChunk]]:
        async with NodeClient(pair.leader.url) as client:
            pinned = await _collect(client, _request("to the lost rank", 1))
            free = await _collect(client, _request("anywhere", None))
            return pinned, free

    pinned, free = asyncio.run(during())
    # The lost rank refuses the request; the node continues it on a rank that serves (the
    # leader's own): nothing fails.
    assert pinned[-1].finish_reason == "length"
    assert "".join(c.text for c in pinned) == expected_text("to the lost rank", 8)
    assert free[-1].finish_reason == "length"  # the leader's own rank still serves

    pair.restart_follower()
    pair.follower.wait_ready(90)

    async def after() -> list[StreamChunk]:
        async with NodeClient(pair.leader.url) as client:
            return await _collect(client, _request("back again", 1, max_tokens=6))

    again = asyncio.run(after())
    assert again[-1].finish_reason == "length"
    assert "".join(c.text for c in again) == expected_text("back again", 6)


BASE = """
[engine]
backend = "sim"
dp_size = 2
[node]
nnodes = 2
instance_id = "x"
dist_init_addr = "127.0.0.1:29500"
"""


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("node_rank = 0", "node_rank = 2"), "node.node_rank", "below node.nnodes"),
        (
            ('dist_init_addr = "127.0.0.1:29500"', 'dist_init_addr = "nowhere"'),
            "node.dist_init_addr",
            "host:port",
        ),
        (("dp_size = 2", "dp_size = 3"), "engine.dp_size", "multiple of node.nnodes"),
        (('instance_id = "x"', 'instance_id = ""'), "node.instance_id", "leader's"),
    ],
)
def test_multinode_configs_are_checked(change: tuple[str, str], key: str, words: str) -> None:
    text = BASE.replace("nnodes = 2", "nnodes = 2\nnode_rank = 0").replace(*change)
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == key
    assert words in str(info.value)


def test_one_dp_rank_may_span_the_nodes_and_belongs_to_the_leader() -> None:
    # Tensor parallelism across nodes (SGLang's tp_size over nnodes): one DP rank, whose
    # KV events and metrics come from the leader; the followers relay nothing.
    for rank in (0, 1):
        config = loads(BASE.replace("dp_size = 2", "dp_size = 1") + f"node_rank = {rank}\n")
        assert plan_node(config).local_dp_ranks == ([0] if rank == 0 else [])
    assert list(local_ranks(4, 2, 1)) == [2, 3]  # DP ranks split over the nodes
