"""The real engine behind the frontend: SmolLM2-135M-Instruct through SGLang on the CPU,
asked through the official `openai` client. The frontend tokenizes with the model's own
tokenizer and chat template (from the card's model directory), so its prompt must be the
one the engine builds itself from the same messages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from messages.request import ChatMessage, GenerateRequest, SamplingOptions, StopConditions
from supervisor.client import NodeClient
from tests.frontend.harness import start_frontend
from tests.node.harness import NatsServer, NodeProcess

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def fleet(
    sglang_fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The session's real-engine node and its NATS server, and a frontend on that server."""
    node: NodeProcess = sglang_fleet["node"]
    server: NatsServer = sglang_fleet["server"]
    frontend = start_frontend(tmp_path_factory.mktemp("frontend-sglang"), server.url)
    try:
        node.wait_ready(300)
        frontend.wait_instances(1, timeout=10)
        yield {"server": server, "node": node, "frontend": frontend}
    finally:
        frontend.kill()


def test_the_real_engine_answers_paris_through_the_openai_client(fleet: dict[str, Any]) -> None:
    client = fleet["frontend"].client(timeout=120)
    [model] = client.models.list()
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(
        model=model.id,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=32,
        temperature=0.0,
    )
    text = answer.choices[0].message.content or ""
    assert "Paris" in text
    stream = client.chat.completions.create(
        model=model.id,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=32,
        temperature=0.0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

    async def engine_side() -> tuple[str, int]:
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            messages=[ChatMessage(role="user", content=QUESTION)],
            sampling=SamplingOptions(temperature=0.0),
            stop=StopConditions(max_tokens=32),
        )
        async with NodeClient(fleet["server"].url) as node_client:
            chunks = [c async for c in node_client.generate(request, idle_timeout=120)]
        usage = chunks[-1].usage
        assert usage is not None
        return "".join(c.text for c in chunks), usage.prompt_tokens

    engine_text, engine_prompt_tokens = asyncio.run(engine_side())
    # the same prompt tokens (the frontend's template = the engine's) and the same answer
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == engine_prompt_tokens
    assert text == engine_text
