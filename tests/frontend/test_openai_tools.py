"""Tool calls, reasoning content, n > 1, several prompts and the Responses API, through the
official `openai` client, against sim nodes (real NATS, real processes).

The sim answers deterministically from its prompt (`sim_answer`), and with a JSON schema it
answers a document valid against it (guided decoding), so these tests know each answer:
a tool call forced by `tool_choice`, and the answer to a history with the tool's result
(which proves the history went through the template). Model "sim-think" has a reasoning
parser set in the frontend's configuration (DeepSeek-R1's format, which reads everything
before `</think>` as reasoning, so the sim's whole answer is reasoning).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import openai
import pytest

from actors.frontend.openai_formats import ChatCompletionRequest, ChatMessageIn
from actors.frontend.parsers import ToolSpec
from actors.frontend.tokenizers import SimBytesTokenizer
from actors.frontend.tool_calls import ToolPlan, template_input, tool_plan
from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_fleet,
    wait_until,
)
from tests.node.harness import NodeProcess

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-tools")) as fleet:
        fleet.node("sim", dp_size=2, engine__sim={"decode_time_per_step": 0.002})
        fleet.node(
            "think", node={"component": "thinker"}, engine={"served_model_name": "sim-think"}
        )
        fleet.wait_ready()
        frontend = fleet.frontend(frontend={"reasoning_parser": {"sim-think": "deepseek-r1"}})
        frontend.wait_instances(2)
        nodes = list(fleet.nodes.values())
        yield {"frontend": frontend, "server": fleet.server, "nodes": nodes}


@pytest.fixture(scope="module")
def client(fleet: dict[str, Any]) -> openai.OpenAI:
    return fleet["frontend"].client(timeout=120)  # the first tool request loads SGLang's parsers


def sim_prompt(messages: list[dict[str, Any]], plan: ToolPlan) -> list[int]:
    """The token ids the frontend sends for `messages` to a sim model (its template)."""
    typed = [msgspec.convert(m, ChatMessageIn) for m in messages]
    turns, _ = template_input(typed, plan, frontend_writes_tools=True)
    return SimBytesTokenizer().chat(turns)


def weather_plan(choice: str | dict[str, Any]) -> ToolPlan:
    req = msgspec.convert(
        {"model": "sim", "messages": QUESTION, "tools": TOOLS, "tool_choice": choice},
        ChatCompletionRequest,
    )
    return tool_plan(req.tools, req.tool_choice, True)


# --- tool calls ---------------------------------------------------------------------------


def test_a_named_tool_call_round_trip(client: openai.OpenAI) -> None:
    asked = client.chat.completions.create(
        model="sim",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=NAMED,
        max_tokens=200,  # type: ignore[arg-type]
    )
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    answered = client.chat.completions.create(
        model="sim",
        messages=history,
        tools=TOOLS,
        max_tokens=12,  # type: ignore[arg-type]
    )
    # the sim's answer is a function of its prompt: this one is the template of the history
    # with the call and the tool's result in it
    prompt = sim_prompt(history, weather_plan("auto"))
    assert answered.choices[0].message.content == sim_answer(prompt, 12)
    assert answered.choices[0].message.tool_calls is None
    assert answered.usage is not None
    assert answered.usage.prompt_tokens == len(prompt)


def test_streamed_tool_call_deltas_reassemble_into_the_whole_call(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "sim", "messages": QUESTION, "tools": TOOLS}
    kwargs |= {"tool_choice": "required", "max_tokens": 200}
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish, pieces = None, 0
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                pieces += 1
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function.name if delta.function else None) or ""
                call["arguments"] += (delta.function.arguments if delta.function else None) or ""
    assert finish == "tool_calls"
    assert pieces > len(calls)  # the arguments came in pieces
    [expected] = whole.choices[0].message.tool_calls or []
    assert [c["name"] for c in calls.values()] == [expected.function.name]
    assert json.loads(calls[0]["arguments"]) == json.loads(expected.function.arguments)
    assert calls[0]["id"].startswith("call_")


def test_tool_choice_auto_and_none_leave_a_plain_answer_alone(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        answer = client.chat.completions.create(
            model="sim",
            messages=QUESTION,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=10,  # type: ignore[arg-type]
        )
        prompt = sim_prompt(QUESTION, weather_plan(choice))
        assert answer.choices[0].message.content == sim_answer(prompt, 10)
        assert answer.choices[0].finish_reason == "length"
        assert answer.choices[0].message.tool_calls is None
    # "none" shows no tools: the prompt is the plain conversation's
    assert sim_prompt(QUESTION, weather_plan("none")) == SimBytesTokenizer().chat(QUESTION)


# --- reasoning ------------------------------------------------------------------------------


def test_a_reasoning_parser_puts_reasoning_apart_whole_and_streamed(client: openai.OpenAI) -> None:
    text = sim_answer(SimBytesTokenizer().chat(QUESTION), 8)
    whole = client.chat.completions.create(model="sim-think", messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]
    message = whole.choices[0].message
    assert getattr(message, "reasoning_content", None) == text  # no </think>: all reasoning
    assert not message.content
    streamed = ""
    for chunk in client.chat.completions.create(
        model="sim-think",
        messages=QUESTION,
        max_tokens=8,
        stream=True,  # type: ignore[arg-type]
    ):
        if chunk.choices:
            streamed += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            assert not chunk.choices[0].delta.content
    assert streamed == text
    raw = client.chat.completions.create(
        model="sim-think",
        messages=QUESTION,
        max_tokens=8,
        extra_body={"separate_reasoning": False},  # type: ignore[arg-type]
    )
    assert raw.choices[0].message.content == text


# --- n > 1 and several prompts --------------------------------------------------------------


def test_n_3_gives_three_choices_routed_together(
    fleet: dict[str, Any], client: openai.OpenAI
) -> None:
    frontend: Frontend = fleet["frontend"]
    before = frontend.metric("sgl_frontend_routing_decisions_total")
    whole = client.chat.completions.create(model="sim", messages=QUESTION, n=3, max_tokens=6)  # type: ignore[arg-type]
    assert frontend.metric("sgl_frontend_routing_decisions_total") == before + 1  # one route
    expected = sim_answer(SimBytesTokenizer().chat(QUESTION), 6)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == [expected] * 3
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 18
    assert whole.usage.prompt_tokens == len(SimBytesTokenizer().chat(QUESTION))
    texts = ["", "", ""]
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="sim",
        messages=QUESTION,
        n=3,
        max_tokens=6,
        stream=True,  # type: ignore[arg-type]
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [expected] * 3
    assert finishes == {0: "length", 1: "length", 2: "length"}


def test_a_client_that_leaves_an_n_3_stream_cancels_all_three_on_the_node(
    fleet: dict[str, Any], client: openai.OpenAI
) -> None:
    node: NodeProcess = fleet["nodes"][0]
    before = node_metric(node, "sgl_node_requests_total", {"outcome": "cancelled"})
    stream = client.chat.completions.create(
        model="sim",
        messages=QUESTION,
        n=3,
        max_tokens=4000,
        stream=True,  # type: ignore[arg-type]
    )
    for i, _ in enumerate(stream):
        if i == 6:
            break
    stream.close()
    wait_until(
        lambda: (
            node_metric(node, "sgl_node_requests_total", {"outcome": "cancelled"}) >= before + 3
        ),
        10.0,
        "the node cancelled the three abandoned choices",
    )


def test_several_prompts_in_one_completion_request(client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "In a galaxy far away"]
    answer = client.completions.create(model="sim", prompt=prompts, n=2, max_tokens=5)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = [sim_answer([b + 3 for b in p.encode()], 5) for p in prompts]
    assert [c.text for c in answer.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
    assert answer.usage.completion_tokens == 20
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model="sim", prompt=prompts, n=2, max_tokens=5, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in answer.choices]


# --- the Responses API ------------------------------------------------------------------------

RESPONSE_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}
]


def test_a_responses_exchange_with_a_function_tool_and_previous_response_id(
    client: openai.OpenAI,
) -> None:
    first = client.responses.create(
        model="sim",
        input="What is the weather in Paris?",
        instructions="Answer briefly.",
        tools=RESPONSE_TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_output_tokens=200,
    )
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    second = client.responses.create(
        model="sim",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}],
        tools=RESPONSE_TOOLS,  # type: ignore[arg-type]
        max_output_tokens=10,
    )
    assert second.previous_response_id == first.id
    assert second.status == "incomplete"  # max_output_tokens reached
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call.call_id, "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "21 C"},
    ]
    # instructions do not carry over to the follow-up
    offered = ToolPlan((ToolSpec("get_weather", parameters=WEATHER_PARAMETERS),), "auto")
    prompt = sim_prompt(history, offered)
    assert second.output_text == sim_answer(prompt, 10)
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_responses_stream_their_events(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="sim", input="Hello", max_output_tokens=8)
    events = list(
        client.responses.create(model="sim", input="Hello", max_output_tokens=8, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].response.output_text == text  # type: ignore[union-attr]
    calls = list(
        client.responses.create(
            model="sim",
            input="Weather?",
            tools=RESPONSE_TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=200,
            stream=True,
        )
    )
    arguments = "".join(
        e.delta for e in calls if e.type == "response.function_call_arguments.delta"
    )
    [done] = [e for e in calls if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments  # type: ignore[union-attr]
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert calls[-1].type == "response.completed"


# --- refusals -----------------------------------------------------------------------------------


def _refused(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) >= {"message", "type", "param", "code"}  # OpenAI's error shape
    assert body["type"] == "invalid_request_error"
    return caught.value


CHAT_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"n": 17}, "n"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages[0].tool_call_id"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                }
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "messages[0].content",
    ),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), CHAT_REFUSALS, ids=[p for _, p in CHAT_REFUSALS])
def test_each_refused_chat_parameter_is_named(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "sim", "messages": QUESTION, "max_tokens": 4, **fields}
    error = _refused(lambda: client.chat.completions.create(**body))
    assert error.param == param, error.message


COMPLETION_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"prompt": ["a", "b", "c"], "n": 6}, "n"),
    ({"prompt": ["a", ""]}, "prompt"),
]


@pytest.mark.parametrize(
    ("fields", "param"), COMPLETION_REFUSALS, ids=[p for _, p in COMPLETION_REFUSALS]
)
def test_each_refused_completion_parameter_is_named(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "sim", "prompt": "x", "max_tokens": 4, **fields}
    error = _refused(lambda: client.completions.create(**body))
    assert error.param == param, error.message


RESPONSE_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content",
    ),
    ({"input": [{"type": "function_call", "call_id": "c"}]}, "input[0].name"),
    ({"previous_response_id": "resp_nowhere"}, "previous_response_id"),
]


@pytest.mark.parametrize(
    ("fields", "param"), RESPONSE_REFUSALS, ids=[p for _, p in RESPONSE_REFUSALS]
)
def test_each_refused_responses_parameter_is_named(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "sim", "input": "x", "max_output_tokens": 4, **fields}
    error = _refused(lambda: client.responses.create(**body))
    assert error.param == param, error.message
