"""The real engine behind the frontend: SmolLM2-135M-Instruct through SGLang on the CPU,
asked through the official `openai` client. The frontend tokenizes with the model's own
tokenizer and chat template (from the card's model directory), so its prompt must be the
one the engine builds itself from the same messages. Tool calls are forced where the test
needs certainty (a 135M model rarely calls a tool by itself): tool_choice named or
required, enforced by the engine's guided decoding."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import pytest

from actors.frontend.openai_formats import ChatMessageIn
from actors.frontend.tool_calls import ToolPlan, template_input
from messages.request import ChatMessage, GenerateRequest, SamplingOptions, StopConditions
from supervisor.client import NodeClient
from tests.frontend.harness import node_metric, start_frontend, wait_until
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
    node: NodeProcess = fleet["node"]
    wait_until(  # the first request to the node opened its direct-stream connection
        lambda: node_metric(node, "sgl_node_direct_stream_connections") >= 1,
        10,
        "the node connected to the frontend",
    )
    straight = node_metric(node, "sgl_node_direct_streams_total", {"path": "direct"})
    stream = client.chat.completions.create(
        model=model.id,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=32,
        temperature=0.0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    # ... and the stream came straight from the node, not through the NATS server
    assert node_metric(node, "sgl_node_direct_streams_total", {"path": "direct"}) == straight + 1

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


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_tool_call_round_trip_on_the_real_engine(fleet: dict[str, Any]) -> None:
    client = fleet["frontend"].client(timeout=120)
    asked = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,  # one call (it makes two, celsius and fahrenheit, else)
        max_tokens=100,
        temperature=0.0,
    )
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    history = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees celsius, sunny"},
    ]
    answered = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=history,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        max_tokens=24,
        temperature=0.0,
    )
    text = answered.choices[0].message.content or ""
    assert text
    # SmolLM2's template renders no tools: the frontend writes the call and the result into
    # the messages; the engine, given those messages, builds the same prompt and answer
    turns, _ = template_input(
        [msgspec.convert(m, ChatMessageIn) for m in history],
        ToolPlan(mode="none"),
        frontend_writes_tools=True,
    )
    assert any("21 degrees" in t["content"] for t in turns)
    engine_text, engine_prompt = _engine_answer(fleet, turns, 24)
    assert answered.usage is not None
    assert answered.usage.prompt_tokens == engine_prompt
    assert text == engine_text


def _engine_answer(
    fleet: dict[str, Any], turns: list[dict[str, Any]], max_tokens: int
) -> tuple[str, int]:
    async def ask() -> tuple[str, int]:
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            messages=[ChatMessage(role=t["role"], content=t["content"]) for t in turns],
            sampling=SamplingOptions(temperature=0.0),
            stop=StopConditions(max_tokens=max_tokens),
        )
        async with NodeClient(fleet["server"].url) as node_client:
            chunks = [c async for c in node_client.generate(request, idle_timeout=120)]
        usage = chunks[-1].usage
        assert usage is not None
        return "".join(c.text for c in chunks), usage.prompt_tokens

    return asyncio.run(ask())


def test_streamed_tool_call_deltas_are_valid_json_on_the_real_engine(
    fleet: dict[str, Any],
) -> None:
    client = fleet["frontend"].client(timeout=120)
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    for chunk in client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=120,
        temperature=0.0,
        stream=True,
    ):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                function = delta.function
                names[delta.index] = names.get(delta.index, "") + (
                    (function and function.name) or ""
                )
                arguments[delta.index] = arguments.get(delta.index, "") + (
                    (function and function.arguments) or ""
                )
    assert finish == "tool_calls"
    assert set(names.values()) == {"get_weather"}
    for text in arguments.values():
        jsonschema.validate(json.loads(text), WEATHER)


def test_n_3_on_the_real_engine(fleet: dict[str, Any]) -> None:
    client = fleet["frontend"].client(timeout=120)
    answer = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": QUESTION}],
        n=3,
        max_tokens=8,
        temperature=1.0,
        seed=7,
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content for c in answer.choices)
    assert answer.usage is not None
    assert 3 <= answer.usage.completion_tokens <= 24


def test_a_responses_exchange_with_a_function_tool_on_the_real_engine(
    fleet: dict[str, Any],
) -> None:
    client = fleet["frontend"].client(timeout=120)
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    first = client.responses.create(
        model="smollm2-135m-instruct",
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=100,
        temperature=0.0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    second = client.responses.create(
        model="smollm2-135m-instruct",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}],
        tools=tools,
        tool_choice="none",
        max_output_tokens=24,
        temperature=0.0,
    )
    assert second.output_text
    alone = client.responses.create(
        model="smollm2-135m-instruct",
        input="What is the weather in Paris?",
        max_output_tokens=1,
    )
    assert second.usage is not None
    assert alone.usage is not None
    # the question, the call and its result: more than the question alone
    assert second.usage.input_tokens > alone.usage.input_tokens + 10
