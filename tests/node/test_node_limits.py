"""Back-pressure, deadlines, the CLI's discovery commands, and surviving a NATS restart."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.frontend.harness import node_metric
from tests.node.harness import ROOT, NatsServer, NodeProcess, start_node


def _request(max_tokens: int, **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt="limits",
        stop=StopConditions(max_tokens=max_tokens),
        **kw,
    )


async def _collect(client: NodeClient, req: GenerateRequest, **kw: Any) -> list[StreamChunk]:
    return [chunk async for chunk in client.generate(req, idle_timeout=30, **kw)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(
        tmp_path_factory.mktemp("limits"),
        engine__sim={"decode_time_per_step": 0.01},
        handlers={"max_inflight": 3},
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()


def test_beyond_max_inflight_the_node_answers_overloaded_at_once(node: NodeProcess) -> None:
    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(node.url) as client:
            streams = (_collect(client, _request(100), retries=0) for _ in range(6))
            return await asyncio.gather(*streams)

    results = asyncio.run(go())
    endings = sorted(
        (chunks[-1].error.code if chunks[-1].error else chunks[-1].finish_reason)
        for chunks in results
    )
    assert endings == ["length"] * 3 + ["overloaded"] * 3
    for chunks in results:
        if chunks[-1].error is not None:
            assert len(chunks) == 1  # refused at once, no tokens
            assert chunks[-1].error.retryable


def test_the_client_sends_a_refused_request_again_until_the_node_takes_it(
    node: NodeProcess,
) -> None:
    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(node.url) as client:
            # 3 over the limit are refused, then sent again 0.2, 0.6, 1.4 s later: the
            # first three (1 s of decoding) have ended by the last of those.
            return await asyncio.gather(*(_collect(client, _request(100)) for _ in range(6)))

    results = asyncio.run(go())
    assert [chunks[-1].finish_reason for chunks in results] == ["length"] * 6
    refused = node_metric(node, "sgl_node_requests_total", {"outcome": "overloaded"})
    assert refused >= 3  # they were refused first, and the client sent them again


def test_a_request_past_its_timeout_ends_with_deadline_exceeded(node: NodeProcess) -> None:
    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            return await _collect(client, _request(1000, timeout=0.3))

    chunks = asyncio.run(go())
    last = chunks[-1]
    assert last.finish_reason == "error"
    assert last.error is not None
    assert last.error.code == "deadline_exceeded"
    assert sum(len(c.token_ids) for c in chunks) < 1000  # cut by the deadline, however slow


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.client", "--nats", node.url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_cli_lists_instances_and_shows_the_tree(node: NodeProcess) -> None:
    listing = _cli(node, "instances")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith(node.instance_id)
    assert "backend=sim" in listing.stdout
    tree = _cli(node, "tree")
    assert tree.returncode == 0, tree.stderr
    body = json.loads(tree.stdout)
    assert body["instance_id"] == node.instance_id
    assert [c["id"] for c in body["children"]] == ["system", "nats_server", "core"]


def test_generate_to_a_subject_nobody_serves_says_so(node: NodeProcess) -> None:
    result = _cli(node, "--component", "nobody", "generate", "hi")
    assert result.returncode == 1
    assert "no node serves dynamo.nobody.generate" in result.stderr


def test_the_node_survives_a_nats_server_restart_that_lost_its_data_and_registers_again(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path)
    node = start_node(tmp_path, embedded_nats=False, nats_url=server.url)
    try:
        node.wait_ready(60)
        server.stop()
        node.wait_log(
            lambda r: r.get("event") == "nats disconnected; publishes are buffered", timeout=10
        )
        # The new server has an empty store: the discovery bucket and the record are gone.
        server = NatsServer.on_port(tmp_path, server.port, fresh_store=True)
        node.wait_log(lambda r: r.get("event") == "nats reconnected", timeout=30)

        async def go() -> tuple[list[Any], list[StreamChunk]]:
            async with NodeClient(server.url) as client:
                for _ in range(300):  # the record comes back with the next heartbeat
                    records = await client.instances()
                    if records:
                        break
                    await asyncio.sleep(0.2)
                return records, await _collect(client, _request(5))

        records, chunks = asyncio.run(go())
        node.wait_log(lambda r: r.get("event") == "registration restored", timeout=10)
        assert [r.instance_id for r in records] == [node.instance_id]
        assert chunks[-1].finish_reason == "length"
        assert node.stop() == 0
    finally:
        node.kill()
        server.stop()
