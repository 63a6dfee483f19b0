"""Embeddings with the real engine: a node in `embedding` mode running SGLang on the CPU
with the built-in all-MiniLM-L6-v2, asked over NATS and through the frontend with the
official `openai` client; the vectors are checked against the model run by `transformers`
(SGLang pools BERT models by their [CLS] token, then normalises)."""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from actors.engine_host.builtin_model import resolve_model_path
from messages.request import EmbedRequest
from supervisor.client import NodeClient
from tests.frontend.harness import Frontend
from tests.node.harness import NodeProcess, free_ports, start_node

TEXTS = ["The capital of France is Paris.", "Paris is in France.", "I like turtles."]
MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Frontend]]:
    port = free_ports()
    node = start_node(
        tmp_path_factory.mktemp("embed-sglang"),
        backend="sglang",
        node={"mode": "embedding"},
        engine={"model_path": f"builtin:{MODEL}", "served_model_name": MODEL},
        frontend={"enabled": True, "port": port},
    )
    try:
        node.wait_ready(600)
        frontend = Frontend(node, port)
        frontend.wait_instances(1)
        yield node, frontend
    finally:
        node.kill()


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[float]], list[int]]:
    """[CLS] vectors (normalised) and token counts from `transformers` on the same files."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(f"builtin:{MODEL}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    vectors, counts = [], []
    for text in TEXTS:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            cls = model(**encoded).last_hidden_state[0, 0]
        vectors.append(torch.nn.functional.normalize(cls, dim=0).tolist())
        counts.append(int(encoded["input_ids"].shape[1]))
    return vectors, counts


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_the_node_embeds_as_the_model_does(
    embedder: tuple[NodeProcess, Frontend], reference: tuple[list[list[float]], list[int]]
) -> None:
    node, _ = embedder

    async def go() -> Any:
        async with NodeClient(node.url) as client:
            return await client.embed(EmbedRequest(request_id=uuid.uuid4().hex, input=TEXTS))

    answer = asyncio.run(go())
    assert answer.error is None
    vectors, counts = reference
    assert [len(v) for v in answer.embeddings] == [384] * 3
    for got, want in zip(answer.embeddings, vectors, strict=True):
        assert cosine(got, want) > 0.999  # bf16 on the CPU against float32
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(counts)
    paris, france, turtles = answer.embeddings
    assert cosine(paris, france) > cosine(paris, turtles) + 0.2


def test_the_openai_client_gets_the_same_vectors_through_the_frontend(
    embedder: tuple[NodeProcess, Frontend], reference: tuple[list[list[float]], list[int]]
) -> None:
    _, frontend = embedder
    client = frontend.client()
    assert MODEL in {m.id for m in client.models.list()}
    answer = client.embeddings.create(model=MODEL, input=TEXTS)
    vectors, counts = reference
    assert [d.index for d in answer.data] == [0, 1, 2]
    for item, want in zip(answer.data, vectors, strict=True):
        assert cosine(item.embedding, want) > 0.999
    assert answer.usage.prompt_tokens == sum(counts)
    encoded = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
    raw = base64.b64decode(str(encoded.data[0].embedding))  # asked for: left to us to decode
    assert cosine(list(struct.unpack(f"<{len(raw) // 4}f", raw)), vectors[0]) > 0.999
