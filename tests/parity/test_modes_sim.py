"""Serving modes with the sim engine: prefill, decode (with the simulated KV transfer),
the disaggregated flow end to end, embedding, and each mode's health canary."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from messages.request import (
    BootstrapInfo,
    EmbedRequest,
    GenerateRequest,
    StopConditions,
    StreamChunk,
)
from supervisor.client import NodeClient
from tests.node.harness import NatsServer, NodeProcess, free_ports, start_node
from tests.supervision.children import wait_until

CANARY = {"canary_after_idle": 0.3, "canary_timeout": 5.0}
BOOTSTRAP_PORT = free_ports()  # the prefill node's (its engine host listens there)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A prefill node, a decode node and an embedding node on one NATS server."""
    tmp = tmp_path_factory.mktemp("modes")
    server = NatsServer(tmp)
    common: dict[str, Any] = {
        "embedded_nats": False,
        "nats_url": server.url,
        "engine__health": CANARY,
    }
    nodes = {
        "prefill": start_node(
            tmp,
            name="prefill",
            node={"mode": "prefill"},
            disaggregation={"bootstrap_port": BOOTSTRAP_PORT},
            **common,
        ),
        # 1 MB per token at 100 MB/s: a 20-token prompt takes 0.2 s to "transfer"
        "decode": start_node(
            tmp,
            name="decode",
            node={"mode": "decode"},
            disaggregation={"sim_bytes_per_token": 1_000_000, "sim_bandwidth": 100e6},
            **common,
        ),
        "embedding": start_node(
            tmp, name="embedding", node={"mode": "embedding", "component": "embedder"}, **common
        ),
    }
    try:
        for node in nodes.values():
            node.wait_ready(60)
        yield {"server": server, **nodes}
    finally:
        for node in nodes.values():
            node.kill()
        server.stop()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _request(prompt: str = "twenty tokens of text", **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, stop=StopConditions(max_tokens=8), **kw
    )


async def _stream(url: str, component: str, request: GenerateRequest) -> list[StreamChunk]:
    async with NodeClient(url, component=component) as client:
        return [c async for c in client.generate(request)]


def test_a_prefill_node_answers_first_with_its_bootstrap_info_then_prefills(
    fleet: dict[str, Any],
) -> None:
    chunks = _run(_stream(fleet["server"].url, "prefill", _request()))
    first = chunks[0]
    assert first.bootstrap_info is not None
    assert (first.bootstrap_info.host, first.bootstrap_info.port) == ("127.0.0.1", BOOTSTRAP_PORT)
    assert sum(len(c.token_ids) for c in chunks) == 1  # only the prefill's token
    assert chunks[-1].finish_reason == "length"
    assert fleet["prefill"].wait_log(lambda r: r.get("event") == "prefill warm-up done")


def test_a_prefill_node_keeps_a_routers_bootstrap_info(fleet: dict[str, Any]) -> None:
    given = BootstrapInfo(host="10.0.0.7", port=8998, room=424242)
    chunks = _run(_stream(fleet["server"].url, "prefill", _request(bootstrap_info=given)))
    assert chunks[0].bootstrap_info == given


def test_a_decode_node_refuses_a_request_without_bootstrap_info(fleet: dict[str, Any]) -> None:
    [chunk] = _run(_stream(fleet["server"].url, "backend", _request()))
    assert chunk.error is not None
    assert (chunk.error.code, chunk.error.field) == ("invalid_request", "bootstrap_info")
    assert "prefill" in chunk.error.message


def test_the_disaggregated_flow_end_to_end_with_the_simulated_transfer(
    fleet: dict[str, Any],
) -> None:
    async def go() -> tuple[list[StreamChunk], float]:
        prefill = await _stream(fleet["server"].url, "prefill", _request())
        info = prefill[0].bootstrap_info
        assert info is not None
        started = time.monotonic()
        decoded = await _stream(fleet["server"].url, "backend", _request(bootstrap_info=info))
        return decoded, time.monotonic() - started

    decoded, took = _run(go())
    assert sum(len(c.token_ids) for c in decoded) == 8
    assert decoded[-1].finish_reason == "length"
    assert took >= 0.2  # 21 prompt tokens × 1 MB at 100 MB/s, before the first token


def test_discovery_shows_each_modes_card(fleet: dict[str, Any]) -> None:
    async def go() -> dict[str, Any]:
        cards = {}
        for component in ("prefill", "backend", "embedder"):
            async with NodeClient(fleet["server"].url, component=component) as client:
                [record] = await client.instances()
                cards[component] = record
        return cards

    cards = _run(go())
    assert (cards["prefill"].model.mode, cards["prefill"].subjects.generate) == (
        "prefill",
        "dynamo.prefill.generate",
    )
    assert cards["prefill"].model.runtime_config["bootstrap_port"] == BOOTSTRAP_PORT
    assert cards["backend"].model.mode == "decode"
    assert (cards["embedder"].model.mode, cards["embedder"].model.model_type) == (
        "embedding",
        "embedding",
    )


def _embed(fleet: dict[str, Any], value: Any) -> Any:
    async def go() -> Any:
        async with NodeClient(fleet["server"].url, component="embedder") as client:
            return await client.embed(EmbedRequest(request_id=uuid.uuid4().hex, input=value))

    return _run(go())


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("one sentence", 1),
        (["two", "sentences"], 2),
        ([101, 2023, 102], 1),
        ([[1, 2], [3, 4, 5]], 2),
    ],
)
def test_an_embedding_node_returns_unit_vectors_and_usage(
    fleet: dict[str, Any], value: Any, count: int
) -> None:
    answer = _embed(fleet, value)
    assert answer.error is None
    assert len(answer.embeddings) == count
    assert all(
        len(v) == 384 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-6)
        for v in answer.embeddings
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0


def test_embedding_input_errors_are_named(fleet: dict[str, Any]) -> None:
    for value in ("", [], [1.5], [["a"]]):
        answer = _embed(fleet, value)
        assert answer.error is not None
        assert answer.error.code == "invalid_request"
    generate = _run(_stream(fleet["server"].url, "embedder", _request()))
    assert generate[0].error is not None  # a generate request is refused by an embedding node


def _canaries_ok(node: NodeProcess) -> float:
    _, body = node.http("/metrics")
    prefix = 'sgl_node_engine_canaries_total{outcome="ok"}'
    ok = [line for line in body.decode().splitlines() if line.startswith(prefix)]
    return float(ok[0].rsplit(" ", 1)[1]) if ok else 0.0


def test_each_modes_health_canary_passes(fleet: dict[str, Any]) -> None:
    for name in ("prefill", "decode", "embedding"):
        node: NodeProcess = fleet[name]
        # idle for canary_after_idle (0.3 s), each mode sends its canary and passes it
        assert wait_until(lambda n=node: _canaries_ok(n) >= 1, timeout=60), name
        assert not any(r.get("event") == "engine canary failed" for r in node.records), name
