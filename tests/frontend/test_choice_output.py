"""`ChoiceOutput` with SGLang's real parsers, on canned engine output in the formats of
reasoning and tool-calling models (DeepSeek-R1, Qwen3 with Hermes tool calls, the JSON
array of a forced call): fed whole or one character at a time, the same split comes out,
and it is the split SGLang's own whole-text parsers make."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from actors.frontend.choice_output import ChoiceOutput, OutputPlan
from actors.frontend.parsers import SglangParsers, ToolSpec

WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def parsers() -> SglangParsers:
    return SglangParsers()


def run(output: ChoiceOutput, pieces: Iterator[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """Feed the pieces then finish; (reasoning, content, calls) as the deltas add up."""
    reasoning = content = ""
    calls: dict[int, list[str]] = {}
    for delta in [*(output.feed(p) for p in pieces), output.finish()]:
        reasoning += delta.reasoning
        content += delta.content
        for call in delta.tool_calls:
            name, arguments = calls.setdefault(call.index, ["", ""])
            calls[call.index] = [name + (call.name or ""), arguments + call.arguments]
    assert (reasoning, content) == (output.reasoning, output.content)  # deltas = totals
    return reasoning, content, [(n, a) for n, a in calls.values()]


def both_ways(
    plan: OutputPlan, parsers: SglangParsers, text: str
) -> tuple[str, str, list[tuple[str, str]]]:
    """The split of `text` streamed one character at a time (as the engine's deltas come);
    checked against the whole-text split (SGLang's whole-text parsers)."""
    streamed = run(ChoiceOutput(plan, parsers), iter(text))
    whole = ChoiceOutput(plan, parsers)
    whole.whole(text)
    calls = [(c.name, c.arguments) for c in whole.calls]
    assert (whole.reasoning, whole.content.strip(), calls) == (
        streamed[0],
        streamed[1].strip(),  # SGLang's whole-text parsers strip the text around calls
        streamed[2],
    )
    return streamed


def test_deepseek_r1_reasoning_is_everything_before_the_end_tag(parsers: SglangParsers) -> None:
    text = "The user wants the capital. It is Paris.</think>The capital of France is Paris."
    plan = OutputPlan(reasoning="deepseek-r1", force_reasoning=True)
    reasoning, content, calls = both_ways(plan, parsers, text)
    assert reasoning == "The user wants the capital. It is Paris."
    assert content == "The capital of France is Paris."
    assert calls == []
    assert (reasoning, content) == parsers.reasoning("deepseek-r1", True).parse_non_stream(text)


def test_qwen3_reasoning_in_think_tags_then_the_answer(parsers: SglangParsers) -> None:
    text = "<think>\nParis is the capital.\n</think>\n\nParis."
    reasoning, content, _ = both_ways(OutputPlan(reasoning="qwen3"), parsers, text)
    expected = parsers.reasoning("qwen3", False).parse_non_stream(text)
    assert (reasoning, content) == expected
    assert "Paris is the capital." in reasoning
    assert content.strip() == "Paris."


def test_a_reasoning_model_calls_a_tool_after_thinking(parsers: SglangParsers) -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    text = f"<think>I need the weather.</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
    plan = OutputPlan("qwen3", False, "auto", "hermes", (WEATHER,))
    reasoning, content, calls = both_ways(plan, parsers, text)
    assert reasoning == "I need the weather."
    assert content.strip() == ""
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]
    output = ChoiceOutput(plan, parsers)
    output.feed(text)
    output.finish()
    assert output.finish_reason("stop") == "tool_calls"
    assert output.finish_reason("length") == "length"
    assert output.message_content() is None
    assert output.calls[0].id.startswith("call_")


def test_text_around_hermes_calls_stays_content(parsers: SglangParsers) -> None:
    first = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    second = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})
    text = f"Let me check.\n<tool_call>{first}</tool_call>\n<tool_call>{second}</tool_call>"
    plan = OutputPlan(tool_mode="auto", tool_parser="hermes", tools=(WEATHER,))
    _, content, calls = both_ways(plan, parsers, text)
    assert content.strip() == "Let me check."
    assert [json.loads(a)["city"] for _, a in calls] == ["Paris", "Rome"]


def test_a_forced_call_is_read_from_the_json_array(parsers: SglangParsers) -> None:
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}}])
    plan = OutputPlan(tool_mode="forced", tools=(WEATHER,))
    _, content, calls = both_ways(plan, parsers, text)
    assert content == ""
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]


def test_no_parser_passes_the_text_through() -> None:
    output = ChoiceOutput(OutputPlan(), None)
    assert run(output, iter(["<think>x</think>", "<tool_call>{}</tool_call>"])) == (
        "",
        "<think>x</think><tool_call>{}</tool_call>",
        [],
    )
