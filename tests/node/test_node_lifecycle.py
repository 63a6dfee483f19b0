"""Ordered stop under load and engine-host death, on a real node with the sim engine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host.sim import SimTokenizer, expected_output
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.frontend.harness import node_metric
from tests.node.harness import NodeProcess, descendants, start_node
from tests.supervision.children import pid_alive, wait_until


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeProcess]:
    # The node's run directory under a temporary directory of its own, which already holds
    # the run directory of a node that was killed -9 (its pid gone) and of a live one. (A
    # short path: the engine's unix sockets live there, and pytest's paths are too long.)
    run_base = Path(tempfile.mkdtemp(prefix="sgl-run-"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_base / f"sgl-node-0badc0de-0-{gone.pid}").mkdir()
    (run_base / f"sgl-node-0badc0de-0-{os.getpid()}").mkdir()
    monkeypatch.setenv("TMPDIR", str(run_base))
    proc = start_node(
        tmp_path, engine__sim={"decode_time_per_step": 0.01}, shutdown={"drain_timeout": 4.0}
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()
        shutil.rmtree(run_base, ignore_errors=True)


def _ts(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def _request(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt="stream me", stop=StopConditions(max_tokens=max_tokens)
    )


async def _stream(
    client: NodeClient,
    req: GenerateRequest,
    started: asyncio.Event | None = None,
    retries: int = 3,
) -> list[StreamChunk]:
    chunks = []
    async for chunk in client.generate(req, idle_timeout=30, retries=retries):
        chunks.append(chunk)
        if started is not None and not started.is_set():
            started.set()
    return chunks


def test_sigterm_during_20_streams_ends_each_with_tokens_or_shutdown_and_stops_in_order(
    node: NodeProcess,
) -> None:
    pids = descendants(node.proc.pid)
    assert pids  # nats-server and the engine host at least
    run_base = Path(os.environ["TMPDIR"])
    own = run_base / f"sgl-node-{node.instance_id}-0-{node.proc.pid}"
    # The dead node's run directory was swept at start; the live one's was left alone.
    assert sorted(p.name for p in run_base.iterdir()) == sorted(
        [own.name, f"sgl-node-0badc0de-0-{os.getpid()}"]
    )
    assert (own / "engine-cmd").is_socket()

    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(node.url) as client:
            # 10 short streams finish within the 4 s drain (4 tokens left, 0.01 s a step:
            # far inside it even on a loaded machine); 10 long ones, which need at least
            # 10 s by the sim's step time, are cut by it.
            reqs = [_request(5) for _ in range(10)] + [_request(1000) for _ in range(10)]
            events = [asyncio.Event() for _ in reqs]
            # no retries: with no other node (and the node's embedded NATS server gone),
            # the client would only look for one in vain before giving the node's ending
            tasks = [
                asyncio.create_task(_stream(client, r, e, retries=0))
                for r, e in zip(reqs, events, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
            node.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    endings = [chunks[-1].finish_reason for chunks in results]
    assert endings[:10] == ["length"] * 10
    assert endings[10:] == ["shutdown"] * 10
    assert all(len(chunks) > 1 for chunks in results)  # every stream had tokens first
    assert node.proc.wait(30) == 0
    deregistered = node.wait_log(lambda r: r.get("event") == "deregistered")[0]
    host_exit = node.wait_log(
        lambda r: r.get("event") == "child exited" and r.get("child") == "engine_host"
    )[0]
    nats_exit = node.wait_log(
        lambda r: r.get("event") == "child exited" and r.get("child") == "nats_server"
    )[0]
    assert _ts(deregistered) <= _ts(host_exit) <= _ts(nats_exit)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)
    assert not own.exists()  # the node removes its run directory when it exits


def test_kill_9_of_the_engine_host_mid_stream_is_a_pause_the_streams_complete_exactly(
    node: NodeProcess,
) -> None:
    host = node.wait_log(
        lambda r: (
            r.get("event") == "process spawned" and r.get("path") == "node/core/engine/engine_host"
        )
    )[0]
    tokens = 300

    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(node.url) as client:
            reqs = [_request(tokens) for _ in range(5)]
            events = [asyncio.Event() for _ in reqs]
            tasks = [
                asyncio.create_task(_stream(client, r, e))
                for r, e in zip(reqs, events, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
            import os

            os.kill(host["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    # Each stream goes on from where it was on the restarted engine: the client sees one
    # stream, its tokens exactly those of an uninterrupted run, one seam in its chunks.
    expected = expected_output(SimTokenizer.encode("stream me"), tokens)
    for chunks in results:
        assert chunks[-1].finish_reason == "length", chunks[-1]
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert [t for c in chunks for t in c.token_ids] == expected
        assert chunks[-1].migrations == 1
        assert chunks[0].migrations == 0
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (9, tokens)
    assert node_metric(node, "sgl_node_migrations_total", {"reason": "engine_lost"}) == 5
    # The engine subtree restarted and the instance is registered again.
    node.wait_log(lambda r: r.get("event") == "registered", count=2, timeout=60)
    node.wait_ready(60)

    async def again() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            return await _stream(client, _request(5))

    assert asyncio.run(again())[-1].finish_reason == "length"
    status, body = node.http("/tree")
    assert status == 200
    rows = {r["id"]: r for r in json.loads(body)["children"]}
    engine = {r["id"]: r for r in rows["core"]["children"]}["engine"]
    host_row = {r["id"]: r for r in engine["children"]}["engine_host"]
    assert host_row["restarts"] == 1
    assert "killed by signal 9" in host_row["last_exit"]


def test_a_restart_of_the_embedded_nats_server_does_not_interrupt_streams(
    node: NodeProcess,
) -> None:
    server = node.wait_log(
        lambda r: r.get("event") == "process spawned" and r.get("path") == "node/nats_server"
    )[0]

    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(
            node.url, connect_options={"max_reconnect_attempts": -1, "reconnect_time_wait": 0.2}
        ) as client:
            reqs = [_request(200) for _ in range(4)]
            events = [asyncio.Event() for _ in reqs]
            tasks = [
                asyncio.create_task(_stream(client, r, e))
                for r, e in zip(reqs, events, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
            import os

            os.kill(server["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    for chunks in results:
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == 200  # nothing lost across the restart
    node.wait_log(lambda r: r.get("event") == "nats reconnected")
    status, body = node.http("/tree")
    assert status == 200
    rows = {r["id"]: r for r in json.loads(body)["children"]}
    assert rows["nats_server"]["restarts"] == 1
    assert rows["core"]["restarts"] == 0
