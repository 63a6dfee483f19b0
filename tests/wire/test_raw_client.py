"""The README's wire protocol, as a third party implements it: `raw_client.py` (nats-py and
the standard library only, written from the README) against a sim node. Each test checks
one promise of the README's "Wire protocol" section."""

from __future__ import annotations

import ast
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.node.harness import NodeProcess, start_node
from tests.wire.raw_client import RawClient, block_hash_ids, new_request_id, sim_bytes_ids

T = TypeVar("T")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(
        tmp_path_factory.mktemp("raw-client"), engine__sim={"decode_time_per_step": 0.005}
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.stop()
        proc.kill()


def with_client(node: NodeProcess, work: Callable[[RawClient], Awaitable[T]]) -> T:
    async def go() -> T:
        client = await RawClient.connect(node.url)
        try:
            return await work(client)
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def record(node: NodeProcess) -> dict[str, Any]:
    async def find(client: RawClient) -> dict[str, Any]:
        [found] = await client.instances()
        return found

    return with_client(node, find)


def test_the_client_imports_nothing_of_the_project() -> None:
    tree = ast.parse((HERE / "raw_client.py").read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    roots = {name.split(".")[0] for name in imported}
    assert roots <= set(sys.stdlib_module_names) | {"nats", "__future__"}, roots


def test_the_discovery_record_has_every_documented_field(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    assert set(record) >= {"instance_id", "namespace", "component", "endpoint", "subjects"}
    assert set(record) >= {"model", "host", "pid", "started_at", "version"}
    ns, component, endpoint = record["namespace"], record["component"], record["endpoint"]
    subjects = record["subjects"]
    assert subjects["generate"] == f"{ns}.{component}.{endpoint}"
    assert subjects["instance"] == f"{ns}.{component}.{endpoint}.{record['instance_id']}"
    assert subjects["cancel"] == f"{ns}.{component}.cancel"
    assert subjects["resume"] == f"{ns}.{component}.resume"
    assert subjects["admin"] == ""  # [admin] is off
    assert {"kv_events", "load_metrics", "tree"} <= set(subjects)
    model = record["model"]
    assert model["tokenizer"] == "sim-bytes"
    assert model["mode"] == "aggregated"
    assert model["kv_block_size"] == 16
    assert set(model) >= {"name", "context_length", "total_kv_blocks", "max_batch_size"}
    assert set(model) >= {"dp_size", "backend", "model_type", "runtime_config"}


def test_a_stream_ends_with_a_finish_reason_and_usage_and_every_input_form_agrees(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    subject = record["subjects"]["instance"]
    prompt = "What is the capital of France?"
    forms = [
        {"prompt": prompt},
        {"token_ids": sim_bytes_ids(prompt)},
        {"messages": [{"role": "user", "content": prompt}]},
    ]

    async def ask(client: RawClient) -> list[list[dict[str, Any]]]:
        return [
            await client.generate(
                subject, {"request_id": new_request_id(), "stop": {"max_tokens": 12}, **form}
            )
            for form in forms
        ]

    by_prompt, by_ids, by_messages = with_client(node, ask)
    for chunks in (by_prompt, by_ids, by_messages):
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        last = chunks[-1]
        assert last["finish_reason"] == "length"
        assert last["token_ids"]  # the final chunk carries the last token
        assert last["usage"]["completion_tokens"] == 12
        assert sum(len(c.get("token_ids", [])) for c in chunks) == 12
        assert "error" not in last  # defaults (nulls) are omitted
    text = "".join(c.get("text", "") for c in by_prompt)
    assert text == "".join(c.get("text", "") for c in by_ids)
    assert by_prompt[-1]["usage"]["prompt_tokens"] == len(sim_bytes_ids(prompt))
    assert by_messages[-1]["usage"]["prompt_tokens"] > len(sim_bytes_ids(prompt))  # template


def test_a_stop_token_is_streamed_and_counted_but_its_text_is_left_out(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    subject = record["subjects"]["instance"]
    base = {"prompt": "stop tokens", "stop": {"max_tokens": 10}}

    async def ask(client: RawClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        free = await client.generate(subject, {"request_id": new_request_id(), **base})
        third = [t for c in free for t in c.get("token_ids", [])][2]
        stop = {"max_tokens": 10, "stop_token_ids": [third]}
        stopped = await client.generate(
            subject, {**base, "request_id": new_request_id(), "stop": stop}
        )
        return free, stopped

    free, stopped = with_client(node, ask)
    ids = [t for c in stopped for t in c.get("token_ids", [])]
    full_ids = [t for c in free for t in c.get("token_ids", [])]
    assert stopped[-1]["finish_reason"] == "stop"
    assert ids == full_ids[:3]  # the stop token is streamed...
    assert stopped[-1]["usage"]["completion_tokens"] == 3  # ...and counted...
    text = "".join(c.get("text", "") for c in stopped)
    assert text == bytes(t - 3 for t in full_ids[:2]).decode()  # ...but not in the text


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{not json", ""),
        (b'{"request_id": "has space", "prompt": "x"}', "request_id"),
        (b'{"request_id": "r", "prompt": "x", "stop": {"max_tokens": 100000}}', "stop.max_tokens"),
        (b'{"request_id": "r", "messages": []}', "messages"),
        (b'{"request_id": "r", "prompt": "x", "dp_rank": 3}', "dp_rank"),
        (b'{"request_id": "r", "prompt": "x", "sampling": {"regex": "("}}', "sampling.regex"),
        (b'{"request_id": "r", "prompt": "' + b"x" * 1_500_000 + b'"}', ""),  # > 1 MiB
    ],
)
def test_a_refusal_is_one_chunk_with_the_documented_error(
    node: NodeProcess, record: dict[str, Any], payload: bytes, field: str
) -> None:
    chunks = with_client(
        node, lambda client: client.generate(record["subjects"]["instance"], payload)
    )
    assert len(chunks) == 1
    [chunk] = chunks
    assert chunk.get("index", 0) == 0  # omitted: it is the default
    assert chunk["finish_reason"] == "error"
    error = chunk["error"]
    assert error["code"] == "invalid_request"
    assert error.get("field", "") == field
    assert "retryable" not in error  # false: omitted
    assert error["message"]


def test_a_subject_nobody_serves_answers_no_responders(node: NodeProcess) -> None:
    request = {"request_id": new_request_id(), "prompt": "x"}
    chunks = with_client(node, lambda client: client.generate("nobody.serves.this", request))
    assert chunks == [{"no_responders": True}]


def test_the_queue_group_subject_serves_too(node: NodeProcess, record: dict[str, Any]) -> None:
    request = {"request_id": new_request_id(), "prompt": "any node", "stop": {"max_tokens": 3}}
    chunks = with_client(
        node, lambda client: client.generate(record["subjects"]["generate"], request)
    )
    assert chunks[-1]["finish_reason"] == "length"


def test_a_cancel_ends_the_stream_with_cancelled_and_usage(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    subjects = record["subjects"]
    request_id = new_request_id()
    request = {"request_id": request_id, "prompt": "a long one", "stop": {"max_tokens": 2000}}

    async def ask(client: RawClient) -> list[dict[str, Any]]:
        async def on_chunk(chunk: dict[str, Any]) -> None:
            if chunk.get("index", 0) == 3:
                await client.cancel(subjects["cancel"], request_id)

        return await client.generate(subjects["instance"], request, on_chunk=on_chunk)

    chunks = with_client(node, ask)
    assert chunks[-1]["finish_reason"] == "cancelled"
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < 2000


def test_a_finished_stream_can_be_asked_again_from_an_index(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    subjects = record["subjects"]
    request_id = new_request_id()
    request = {"request_id": request_id, "prompt": "resume me", "stop": {"max_tokens": 6}}

    async def ask(client: RawClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        streamed = await client.generate(subjects["instance"], request)
        asked = {"request_id": request_id, "from_index": 2}
        answer = await client.nc.request(subjects["resume"], json.dumps(asked).encode(), 1.0)
        return streamed, json.loads(answer.data)

    streamed, answer = with_client(node, ask)
    assert answer["request_id"] == request_id
    assert answer["ended"] is True
    assert answer["chunks"] == streamed[2:]


def test_kv_events_carry_the_block_hashes_the_readme_rule_computes(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    subjects, size = record["subjects"], record["model"]["kv_block_size"]
    prompt = sim_bytes_ids("the README's block hashes, computed by a third party " * 2)
    expected = block_hash_ids(prompt, size)
    assert len(expected) >= 3

    async def watch(client: RawClient) -> list[dict[str, Any]]:
        async with client.watch(subjects["kv_events"]) as batches:
            request = {"request_id": new_request_id(), "token_ids": prompt}
            await client.generate(subjects["instance"], {**request, "stop": {"max_tokens": 2}})
            stored: list[dict[str, Any]] = []
            while not {*expected} <= {h for e in stored for h in e["block_hashes"]}:
                batch = await asyncio.wait_for(batches.get(), 10)
                assert batch["instance_id"] == record["instance_id"]
                stored += [e for e in batch["events"] if e["type"] == "BlockStored"]
            return stored

    stored = with_client(node, watch)
    by_hash = {}
    for event in stored:
        pages = event["token_ids"]
        for i, block in enumerate(event["block_hashes"]):
            by_hash[block] = pages[i * size : (i + 1) * size]
    for i, block in enumerate(expected):
        assert by_hash[block] == prompt[i * size : (i + 1) * size]


def test_load_metrics_come_per_rank_with_the_documented_fields(
    node: NodeProcess, record: dict[str, Any]
) -> None:
    async def one(client: RawClient) -> dict[str, Any]:
        async with client.watch(record["subjects"]["load_metrics"]) as samples:
            return await asyncio.wait_for(samples.get(), 10)

    sample = with_client(node, one)
    assert sample["instance_id"] == record["instance_id"]
    assert sample.get("dp_rank", 0) == 0
    assert {"request_total_slots", "kv_total_blocks", "ts"} <= set(sample)
