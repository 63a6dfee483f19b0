"""The whole node on a real fabric with the sim engine: one OS process per node, real
nats-server, real ZMQ, clients over NATS (in-process and as a separate process)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from actors.engine_host.sim import SimTokenizer, expected_output
from messages.kv import BlockRemoved, BlockStored, KvEventBatch, block_hashes
from messages.metrics import LoadMetrics
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient, NoRespondersError
from tests.node.harness import ROOT, NodeProcess, start_node, until, watching

TOKENIZER = SimTokenizer()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(
    client: NodeClient, request: GenerateRequest | bytes, **kw: Any
) -> list[StreamChunk]:
    return [chunk async for chunk in client.generate(request, **kw)]


def request(prompt: str, max_tokens: int = 16, **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, stop=StopConditions(max_tokens=max_tokens), **kw
    )


def expected_text(prompt: str, n: int) -> str:
    return TOKENIZER.decode(expected_output(TOKENIZER.encode(prompt), n))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("sim-node")
    proc = start_node(
        tmp,
        dp_size=2,
        engine__sim={"num_blocks": 64, "decode_time_per_step": 0.002},
        handlers={"count": 2, "max_inflight": 200, "max_request_bytes": 100_000},
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()


def test_the_instance_appears_in_discovery_and_ready_flips_only_then(node: NodeProcess) -> None:
    async def go() -> list[Any]:
        async with NodeClient(node.url) as client:
            return await client.instances()

    records = run(go())
    assert [r.instance_id for r in records] == [node.instance_id]
    card = records[0].model
    assert (card.backend, card.dp_size, card.kv_block_size, card.total_kv_blocks) == (
        "sim",
        2,
        16,
        64,
    )
    assert records[0].subjects.instance.endswith(node.instance_id)
    registered = node.wait_log(lambda r: r.get("event") == "registered")[0]
    registered_at = datetime.fromisoformat(registered["timestamp"]).timestamp()
    status, body = node.http("/ready")
    assert status == 200
    assert json.loads(body)["registered"] is True
    # The fixture polled /ready from the node's first moments: no 200 before registration.
    assert node.ready_history[0][1] != 200
    first_ok = min(t for t, code in node.ready_history if code == 200)
    assert first_ok >= registered_at


def test_listing_instances_leaves_no_consumers_behind(node: NodeProcess) -> None:
    async def go() -> tuple[int, int]:
        async with NodeClient(node.url) as client:
            for _ in range(50):
                assert [r.instance_id for r in await client.instances()] == [node.instance_id]
            js = client._nc().jetstream()
            info = await js.stream_info(f"KV_{client.bucket}")
            return info.state.consumer_count, len(await client.instances())

    consumers, listed = run(go())
    assert (consumers, listed) == (0, 1)


def test_a_client_streams_a_completion_with_the_expected_tokens(node: NodeProcess) -> None:
    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            return await collect(client, request("hello world", max_tokens=12))

    chunks = run(go())
    # A chunk per token, unless the node's link was behind and merged some (coalesce):
    # the tokens, not the chunk count, are what the client is owed.
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected_output(TOKENIZER.encode("hello world"), 12)
    assert "".join(c.text for c in chunks) == expected_text("hello world", 12)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 12)


def test_fifty_concurrent_streams_all_complete(node: NodeProcess) -> None:
    async def go() -> list[list[StreamChunk]]:
        async with NodeClient(node.url) as client:
            return await asyncio.gather(
                *(collect(client, request(f"prompt {i}", max_tokens=20)) for i in range(50))
            )

    results = run(go())
    for i, chunks in enumerate(results):
        assert chunks[-1].finish_reason == "length", chunks[-1]
        assert "".join(c.text for c in chunks) == expected_text(f"prompt {i}", 20)


def test_the_cli_client_in_its_own_process_streams_an_answer(node: NodeProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor.client",
            "--nats",
            node.url,
            "generate",
            "--raw",
            "--max-tokens",
            "8",
            "abc",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_text("abc", 8).strip()
    assert "[length; 8 tokens" in result.stderr


def test_cancel_mid_stream_ends_it_cancelled_and_the_engine_aborts(node: NodeProcess) -> None:
    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            req = request("a long one", max_tokens=800)
            chunks: list[StreamChunk] = []
            async for chunk in client.generate(req):
                chunks.append(chunk)
                if len(chunks) == 5:
                    await client.cancel(req.request_id)
            return chunks

    chunks = run(go())
    # the engine acknowledged the abort (its `cancelled` end) before generating them all
    assert chunks[-1].finish_reason == "cancelled"
    assert sum(len(c.token_ids) for c in chunks) < 800


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        (b"{not json", "", "malformed"),
        (
            b'{"request_id": "r1", "prompt": "x", "stop": {"max_tokens": "many"}}',
            "stop.max_tokens",
            "expected `int`",
        ),
        (b'{"request_id": "r1", "prompt": "x", "colour": 1}', "colour", "unknown field"),
        (b'{"prompt": "x"}', "request_id", "required"),
        (b'{"request_id": "r1"}', "", "exactly one of"),  # no single field at fault
        (b'{"request_id": "r1", "messages": []}', "messages", "messages is empty"),
        # refusals made in the engine host name their field too
        (b'{"request_id": "r1", "prompt": "x", "dp_rank": 5}', "dp_rank", "out of range"),
        (b'{"request_id": "r1", "token_ids": [1, 40000]}', "token_ids", "vocabulary"),
        (b'{"request_id": "r1", "prompt": "' + b"x" * 2000 + b'"}', "prompt", "KV pages"),
        (
            b'{"request_id": "r1", "prompt": "' + b"x" * 900 + b'", "stop": {"max_tokens": 500}}',
            "stop.max_tokens",
            "KV pages",
        ),
        (
            b'{"request_id": "r1", "token_ids": ' + str([5] * 8000).encode() + b","
            b'"stop": {"max_tokens": 500}}',
            "stop.max_tokens",
            "context length",
        ),
        (
            b'{"request_id": "r1", "prompt": "x", "sampling": {"json_schema": "{not json"}}',
            "sampling.json_schema",
            "not JSON",
        ),
        (
            b'{"request_id": "r1", "prompt": "x", "sampling": {"regex": "(unclosed"}}',
            "sampling.regex",
            "does not compile",
        ),
        (b'{"request_id": "r1", "prompt": "x", "lora": "absent"}', "lora", "not loaded"),
        (
            b'{"request_id": "r1", "prompt": "x", "stop": {"max_tokens": 100000}}',
            "stop.max_tokens",
            "exceeds the limit",
        ),
        (b'{"request_id": "r1", "token_ids": [1, -5]}', "token_ids[1]", ">= 0"),
        (b'{"request_id": "r1", "prompt": "\xff\xfe"}', "", "malformed"),
        (b'{"request_id": "r1", "prompt": "' + b"x" * 200_000 + b'"}', "", "limit is"),
        # over NATS's default max_payload (1 MiB) but not the embedded server's: the node's
        # own error, not a failure in the client's NATS library
        (b'{"request_id": "r1", "prompt": "' + b"x" * 2_000_000 + b'"}', "", "limit is"),
        (b'{"request_id": "r1", "prompt": "x", "stop": {"max_tokens": 5', "", "malformed"),
    ],
)
def test_bad_requests_get_one_error_naming_the_problem(
    node: NodeProcess, payload: bytes, field: str, words: str
) -> None:
    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            return await collect(client, payload)

    chunks = run(go())
    assert len(chunks) == 1
    error = chunks[0].error
    assert chunks[0].finish_reason == "error"
    assert error is not None
    assert error.code == "invalid_request"
    assert error.field == field
    assert words in error.message


def test_the_client_asks_for_the_tree_and_says_when_nobody_or_nothing_answers(
    node: NodeProcess,
) -> None:
    """`NodeClient.tree` and `embed` ask through the connection's reply inboxes: the
    answer, `NoRespondersError` for a subject nobody serves, a timeout for one whose
    server stays silent, and a cancel while it waits ends the wait (the cancel that lands
    with an answer: `tests/reliability/test_reply_mux.py`)."""

    async def go() -> tuple[Any, str, str, bool]:
        async with NodeClient(node.url) as client:
            tree = await client.tree(node.instance_id)
            try:
                await client.tree("no-such-instance")
                nobody = "answered"
            except NoRespondersError as exc:
                nobody = str(exc)
            nc = client._nc()
            silent = await nc.subscribe(f"{client.base}.tree.silent")  # never answers
            try:
                await client.tree("silent", timeout=0.3)
                late = "answered"
            except nats.errors.TimeoutError:
                late = "timeout"
            asking = asyncio.ensure_future(client.tree("silent", timeout=5.0))
            await asyncio.sleep(0.1)
            asking.cancel()
            try:
                await asking
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            await silent.unsubscribe()
            return tree, nobody, late, cancelled

    tree, nobody, late, cancelled = run(go())
    assert [r["id"] for r in tree["children"]] == ["system", "nats_server", "core"]
    assert nobody == "no node serves dynamo.backend.tree.no-such-instance"
    assert late == "timeout"
    assert cancelled


def test_the_node_kept_serving_with_zero_restarts(node: NodeProcess) -> None:
    status, body = node.http("/tree")
    assert status == 200

    def restarts(rows: list[dict[str, Any]]) -> int:
        return sum(r["restarts"] + restarts(r.get("children", [])) for r in rows)

    rows = json.loads(body)["children"]
    assert [r["id"] for r in rows] == ["system", "nats_server", "core"]
    core = {r["id"]: r for r in rows[2]["children"]}
    assert list(core) == ["fabric", "engine", "handlers", "registrar"]
    engine = [r["id"] for r in core["engine"]["children"]]
    assert engine == ["engine_host", "engine_actor", "metrics", "kv_relay_0", "kv_relay_1"]
    assert all(r["state"] == "running" for r in core.values())
    assert restarts(rows) == 0
    assert node.http("/health")[0] == 200


def _batches(
    node: NodeProcess, action: Any, seen: Callable[[list[KvEventBatch]], bool], what: str
) -> list[KvEventBatch]:
    """The KV event batches published while `action` runs, until `seen` holds of them."""

    async def go() -> list[KvEventBatch]:
        async with NodeClient(node.url) as client, watching(node.url, "kv-events") as got:
            await action(client)
            await until(lambda: seen(got), 30, what)
            return list(got)

    return run(go())


def _stored(batches: list[KvEventBatch], rank: int) -> list[BlockStored]:
    return [e for b in batches if b.dp_rank == rank for e in b.events if isinstance(e, BlockStored)]


def test_kv_events_on_nats_follow_the_engines_blocks_on_both_ranks(node: NodeProcess) -> None:
    prompt = "the quick brown fox jumps over the lazy dog " * 2  # 88 tokens: 5 full pages

    async def action(client: NodeClient) -> None:
        for rank in (0, 1):
            await collect(client, request(prompt, max_tokens=4, dp_rank=rank))

    tokens = TOKENIZER.encode(prompt)
    pages = [h for h, _ in block_hashes(tokens, 16)]

    def both(batches: list[KvEventBatch]) -> bool:
        return all(any(e.block_hashes == pages for e in _stored(batches, rank)) for rank in (0, 1))

    batches = _batches(node, action, both, "the prompt's pages stored on both ranks")
    for rank in (0, 1):
        # the prompt's event (another test's stream may still be storing pages meanwhile)
        first = next(e for e in _stored(batches, rank) if e.block_hashes[0] == pages[0])
        assert first.block_hashes == pages
        assert first.parent_block_hash is None
        assert first.token_ids == tokens[: 16 * len(pages)]
        assert all(b.instance_id == node.instance_id for b in batches)


def test_eviction_shows_as_block_removed(node: NodeProcess) -> None:
    async def action(client: NodeClient) -> None:
        # 20 new 5-page prompts overflow rank 0's 64 blocks even from an empty cache
        tag = uuid.uuid4().hex[:8]
        for i in range(20):
            await collect(client, request(f"{tag}{i:03d} " + "z" * 80, max_tokens=1, dp_rank=0))

    def removed(batches: list[KvEventBatch]) -> bool:
        return any(isinstance(e, BlockRemoved) for b in batches if b.dp_rank == 0 for e in b.events)

    assert removed(_batches(node, action, removed, "a BlockRemoved on rank 0"))


def test_an_idle_rank_is_published_every_idle_interval_and_a_busy_one_every_interval(
    tmp_path: Path,
) -> None:
    """Unchanged figures of an idle rank go out every 5 s (metrics.idle_interval), not
    every second; a rank running a request is published every second again at once."""
    proc = start_node(tmp_path, dp_size=2, engine__sim={"decode_time_per_step": 0.02})

    async def go() -> tuple[list[LoadMetrics], list[LoadMetrics]]:
        async with watching(proc.url, "metrics") as idle:
            await asyncio.sleep(7.5)
        async with NodeClient(proc.url) as client, watching(proc.url, "metrics") as busy:
            long = request("busy", max_tokens=200, dp_rank=0)  # 4 s at 20 ms a step
            task = asyncio.create_task(collect(client, long, idle_timeout=60))
            await until(lambda: any(m.request_active_slots for m in busy), 3, "a busy sample")
            first = len(busy)
            await asyncio.sleep(1.6)
            seen = busy[first - 1 :]
            chunks = await task
            assert chunks[-1].finish_reason == "length", chunks[-1]
        return idle, seen

    try:
        proc.wait_ready(60)
        idle, busy = run(go())
    finally:
        proc.kill()
    for rank in (0, 1):
        samples = [m for m in idle if m.dp_rank == rank]
        assert 1 <= len(samples) <= 2, [round(m.ts, 1) for m in samples]  # 7-8 at 1 s
        assert all(not m.request_active_slots for m in samples)
    running = [m for m in busy if m.dp_rank == 0]
    assert len(running) >= 2, busy  # the next second's sample came, changed or not
    assert running[0].request_active_slots >= 1


def test_load_metrics_arrive_on_nats_and_prometheus_scrapes(node: NodeProcess) -> None:
    async def go() -> list[LoadMetrics]:
        async with NodeClient(node.url) as client:
            got: list[LoadMetrics] = []
            async for item in client.watch("metrics"):
                assert isinstance(item, LoadMetrics)
                got.append(item)
                if {m.dp_rank for m in got} == {0, 1}:
                    return got
            return got

    metrics = run(asyncio.wait_for(go(), 10))
    assert all(m.instance_id == node.instance_id and m.kv_total_blocks == 64 for m in metrics)
    status, body = node.http("/metrics")
    text = body.decode()
    assert status == 200
    for name in (
        "sgl_node_requests_total",
        "sgl_node_time_to_first_token_seconds_bucket",
        "sgl_node_kv_total_blocks",
        "sgl_node_child_restarts_total",
        "sgl_node_inflight_requests",
        "sgl_node_kv_event_batches_total",
    ):
        assert name in text, name
