"""The frontend's pure decisions about tools, parsers and stored responses: no processes,
no SGLang import (parser names are read from its source)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors.frontend.errors import FrontendError
from actors.frontend.openai_formats import ChatCompletionRequest, ChatMessageIn
from actors.frontend.parsers import HERMES, check_parser_config, model_parsers, parser_names
from actors.frontend.response_store import ResponseStore
from actors.frontend.tool_calls import template_input, tool_plan
from messages.discovery import ModelCard
from supervisor.config import FrontendSection


def card(name: str = "m", **runtime: Any) -> ModelCard:
    return ModelCard(name, 4096, 16, 100, 8, 1, "aggregated", "sglang", runtime_config=runtime)


# --- which parsers a model gets ------------------------------------------------------------


def test_sglangs_parser_names_are_read_without_importing_it() -> None:
    tools, reasoning = parser_names()
    assert {"hermes", "qwen", "llama3"} <= tools
    assert {"deepseek-r1", "qwen3"} <= reasoning


def test_a_template_without_tools_gets_the_frontends_hermes_format() -> None:
    found = model_parsers(FrontendSection(), card(), template_renders_tools=False)
    assert (found.tool_call, found.frontend_writes_tools, found.reasoning) == (HERMES, True, "")


def test_the_cards_parsers_come_next_and_the_frontends_keys_win() -> None:
    detected = card(tool_call_parser="qwen", reasoning_parser="qwen3", force_reasoning=True)
    found = model_parsers(FrontendSection(), detected, template_renders_tools=True)
    assert (found.tool_call, found.reasoning, found.force_reasoning) == ("qwen", "qwen3", True)
    assert not found.frontend_writes_tools
    config = FrontendSection(tool_call_parser={"m": "llama3"}, reasoning_parser="none")
    found = model_parsers(config, detected, template_renders_tools=True)
    assert (found.tool_call, found.reasoning) == ("llama3", "")
    other = model_parsers(config, card("other"), template_renders_tools=True)
    assert other.tool_call == ""  # the table names another model: no parser known


def test_unknown_parser_names_are_refused_naming_the_key() -> None:
    assert check_parser_config(FrontendSection(reasoning_parser="none")) == []
    problems = check_parser_config(
        FrontendSection(tool_call_parser={"m": "hermez"}, reasoning_parser="thinky")
    )
    assert problems[0].startswith("frontend.tool_call_parser.m: unknown parser 'hermez'")
    assert problems[1].startswith("frontend.reasoning_parser: unknown parser 'thinky'")


# --- tool_choice and the history ------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


@pytest.mark.parametrize(
    ("fields", "mode", "named"),
    [
        ({}, "none", None),
        ({"tools": [TOOL]}, "auto", None),
        ({"tools": [TOOL], "tool_choice": "none"}, "none", None),
        ({"tools": [TOOL], "tool_choice": "required"}, "forced", None),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "forced",
            "f",
        ),
    ],
)
def test_tool_choice_decides_how_the_answer_may_use_the_tools(
    fields: dict[str, Any], mode: str, named: str | None
) -> None:
    req = request(**fields)
    plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
    assert (plan.mode, plan.named) == (mode, named)
    assert len(plan.shown) == (0 if mode == "none" else 1)


def test_the_history_is_rendered_for_a_template_with_and_without_tools() -> None:
    messages = [
        msgspec.convert(m, ChatMessageIn)
        for m in [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    ]
    req = request(tools=[TOOL])
    plan = tool_plan(req.tools, req.tool_choice, True)
    turns, tools = template_input(messages, plan, frontend_writes_tools=False)
    assert tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert turns[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "f"}
    turns, tools = template_input(messages, plan, frontend_writes_tools=True)
    assert tools is None
    assert turns[0]["role"] == "system"
    assert "<tools>" in turns[0]["content"]
    assert turns[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert turns[3] == {"role": "tool", "content": "sunny"}


def test_a_tool_call_whose_arguments_are_not_json_is_refused_naming_them() -> None:
    bad = msgspec.convert(
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}],
        },
        ChatMessageIn,
    )
    with pytest.raises(FrontendError) as caught:
        template_input([bad], tool_plan(None, None, True), frontend_writes_tools=True)
    assert caught.value.param == "messages[0].tool_calls[0].function.arguments"


# --- the store of responses --------------------------------------------------------------------


def test_the_response_store_is_bounded_and_expiring() -> None:
    now = [0.0]
    store = ResponseStore(size=2, ttl=10.0, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put(name, {"id": name}, [])
        now[0] += 1.0
    assert store.get("a") is None  # the oldest went first
    assert [store.get(n) is not None for n in ("b", "c")] == [True, True]
    now[0] = 11.5  # b was kept at 1.0, c at 2.0
    assert store.get("b") is None
    assert store.get("c") is not None
    assert store.delete("c")
    assert not store.delete("c")
    assert len(store) == 0


def test_a_store_of_size_0_keeps_nothing() -> None:
    store = ResponseStore(size=0, ttl=10.0)
    assert not store.put("a", {}, [])
    assert store.get("a") is None
