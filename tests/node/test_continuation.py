"""Streams that outlive their handler or a stuck engine, on a real sim node: each fault is a
pause, and the client's stream goes on to exactly the tokens of an uninterrupted run.

The engine host's kill -9 is in test_node_lifecycle.py; the lost DP follower in
test_multinode.py; the continuation core in tests/cores/test_stream_table.py."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host.sim import SimTokenizer, expected_output
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.frontend.harness import node_metric
from tests.node.harness import NatsServer, NodeProcess, admin_request, start_node

TOKEN = "continue-" + uuid.uuid4().hex
PROMPT = "carry on"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    proc = start_node(
        tmp_path,
        engine__sim={"decode_time_per_step": 0.01},
        handlers={"count": 1},  # every stream on the one handler that the test crashes
        engine__health={"stall_timeout": 2.0},
        admin={"enabled": True, "token_file": str(token)},
        chaos={"enabled": True},
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()


def _request(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=PROMPT, stop=StopConditions(max_tokens=max_tokens)
    )


async def _streams_through(
    node: NodeProcess, count: int, tokens: int, fault: dict[str, Any]
) -> list[list[StreamChunk]]:
    """`count` streams of `tokens` each; the fault is injected once every one has a token."""
    async with NodeClient(node.url) as client:
        started = [asyncio.Event() for _ in range(count)]

        async def stream(req: GenerateRequest, first: asyncio.Event) -> list[StreamChunk]:
            chunks = []
            async for chunk in client.generate(req, idle_timeout=60):
                chunks.append(chunk)
                first.set()
            return chunks

        tasks = [asyncio.create_task(stream(_request(tokens), e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
        reply = await admin_request(node, TOKEN, "chaos", **fault)
        assert reply.ok, reply
        return await asyncio.gather(*tasks)


def _assert_exact(results: list[list[StreamChunk]], tokens: int) -> None:
    expected = expected_output(SimTokenizer.encode(PROMPT), tokens)
    for chunks in results:
        assert chunks[-1].finish_reason == "length", chunks[-1]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert [t for c in chunks for t in c.token_ids] == expected
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens == tokens


def test_a_handler_crash_mid_stream_is_a_pause_every_stream_completes_exactly(
    node: NodeProcess,
) -> None:
    tokens = 200
    fault = {"fault": "crash_actor", "target": "core/handlers/handler-1"}
    results = asyncio.run(_streams_through(node, 4, tokens, fault))
    _assert_exact(results, tokens)
    # The next incarnation adopted the streams (the supervisor kept them) and continued
    # them on the engine: one seam each.
    assert all(chunks[-1].migrations == 1 for chunks in results)
    assert node_metric(node, "sgl_node_migrations_total", {"reason": "handler_crash"}) == 4
    node.wait_log(lambda r: r.get("event") == "child exited" and r.get("child") == "handler-1")


def test_an_engine_stuck_past_its_stall_timeout_is_restarted_and_the_streams_complete(
    node: NodeProcess,
) -> None:
    tokens = 200
    # SIGSTOP for longer than the 2 s stall timeout: the node declares the engine stuck,
    # restarts it, and continues each stream on the new one.
    fault = {"fault": "stop_engine_host", "duration": 8.0}
    results = asyncio.run(_streams_through(node, 3, tokens, fault))
    _assert_exact(results, tokens)
    assert all(chunks[-1].migrations == 1 for chunks in results)
    assert node_metric(node, "sgl_node_migrations_total", {"reason": "engine_lost"}) == 3


# --- two nodes: a stream moves to the other one --------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[NatsServer, list[NodeProcess]]]:
    server = NatsServer(tmp_path)
    nodes: list[NodeProcess] = []
    try:
        for name in ("a", "b"):
            nodes.append(
                start_node(
                    tmp_path,
                    name=name,
                    embedded_nats=False,
                    nats_url=server.url,
                    engine__sim={"decode_time_per_step": 0.01},
                    shutdown={"drain_timeout": 1.0},
                )
            )
        for node in nodes:
            node.wait_ready(60)
        yield server, nodes
    finally:
        for node in nodes:
            node.kill()
        server.stop()


async def _spread(
    server: NatsServer, nodes: list[NodeProcess], tokens: int, fault: Callable[[NodeProcess], None]
) -> tuple[list[list[StreamChunk]], NodeProcess]:
    """Streams on both nodes (each pinned to one); `fault` hits the first node once every
    stream has a token; the client library carries them through it."""
    async with NodeClient(server.url) as client:
        started = [asyncio.Event() for _ in range(6)]

        async def stream(i: int) -> list[StreamChunk]:
            target = nodes[i % 2].instance_id
            chunks = []
            async for chunk in client.generate(_request(tokens), instance_id=target):
                chunks.append(chunk)
                started[i].set()
            return chunks

        tasks = [asyncio.create_task(stream(i)) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
        fault(nodes[0])
        return await asyncio.gather(*tasks), nodes[1]


def test_a_node_killed_mid_stream_its_streams_continue_on_the_other_through_the_client(
    pair: tuple[NatsServer, list[NodeProcess]],
) -> None:
    server, nodes = pair
    tokens = 400  # 4 s: the client decides the node is lost well before the end
    results, survivor = asyncio.run(_spread(server, nodes, tokens, lambda n: n.kill()))
    _assert_exact(results, tokens)
    moved = results[0::2]  # the killed node's streams
    assert all(chunks[-1].migrations == 1 for chunks in moved)
    assert all(chunks[-1].migrations == 0 for chunks in results[1::2])
    # the survivor took them on as continuations
    assert node_metric(survivor, "sgl_node_migrations_total", {"reason": "taken_over"}) == 3


def test_a_node_stopped_mid_stream_hands_its_streams_over_at_the_drain_deadline(
    pair: tuple[NatsServer, list[NodeProcess]],
) -> None:
    server, nodes = pair
    tokens = 400
    stop = lambda n: n.proc.send_signal(signal.SIGTERM)  # noqa: E731
    results, survivor = asyncio.run(_spread(server, nodes, tokens, stop))
    _assert_exact(results, tokens)
    assert all(chunks[-1].migrations == 1 for chunks in results[0::2])
    assert nodes[0].proc.wait(30) == 0
    assert node_metric(survivor, "sgl_node_migrations_total", {"reason": "taken_over"}) == 3
