"""One choice's answer split into reasoning, content and tool calls, by SGLang's parsers.

The engine streams text; `ChoiceOutput.feed` passes each delta through the model's
reasoning parser (what is inside the think section becomes `reasoning`), then what is
left through the tool-call parser (the model's format for `tool_choice: "auto"`, or the
JSON array that guided decoding forces for `"required"` / a named function), and returns
what to show now: reasoning text, content text, and tool-call deltas (the first delta of a
call carries its id and name, the next ones pieces of its JSON arguments). `finish` flushes
what the parsers held back.

A whole (non-streamed) answer goes to `whole`, which uses SGLang's whole-text parsers, as
SGLang's own server does: its streaming parsers expect the engine's small deltas (the
Hermes one, given a whole text, leaks a `</tool_call>` that sits next to the following
`<tool_call>` into the content). A forced call's JSON array is read by the streaming
`JsonArrayParser` in either case: it drains a whole text at its end.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.frontend.parsers import SglangParsers, ToolSpec

__all__ = ["ChoiceOutput", "Delta", "OutputPlan", "ToolCall", "ToolCallDelta"]

ToolMode = Literal["none", "auto", "forced"]
_DRAIN_LIMIT = 10_000  # parser steps on empty input at the end (each one emits something)


@dataclass(frozen=True)
class OutputPlan:
    """How a request's answers are parsed."""

    reasoning: str = ""  # SGLang's reasoning parser name; '' = none
    force_reasoning: bool = False
    tool_mode: ToolMode = "none"  # auto: the model's format; forced: the JSON array
    tool_parser: str = ""  # for auto
    tools: tuple[ToolSpec, ...] = ()

    @property
    def needs_parsers(self) -> bool:
        """Whether SGLang's parsers are needed at all."""
        return bool(self.reasoning) or self.tool_mode != "none"


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call: `id` and `name` only on its first piece."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ToolCall:
    """A whole tool call."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Delta:
    """What a piece of the answer adds."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def new_call_id() -> str:
    """An id for a tool call (OpenAI's shape)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ChoiceOutput:
    """The parsers of one choice, and what they produced so far."""

    def __init__(self, plan: OutputPlan, parsers: SglangParsers | None) -> None:
        self.plan = plan
        self.reasoning = ""
        self.content = ""
        self.calls: list[ToolCall] = []
        self._reasoner: Any = None
        self._tool_parser: Any = None
        self._tool_objects: list[Any] = []
        if parsers is None:
            return
        if plan.reasoning:
            self._reasoner = parsers.reasoning(plan.reasoning, plan.force_reasoning)
        if plan.tool_mode == "auto":
            self._tool_parser = parsers.call_parser(plan.tool_parser, plan.tools)
        elif plan.tool_mode == "forced":
            self._tool_parser = parsers.array_parser()
            self._tool_objects = parsers.tools(plan.tools)

    def feed(self, text: str) -> Delta:
        """The parts of the answer that `text` (the next delta) makes showable."""
        delta = Delta()
        normal = text
        if self._reasoner is not None and text:
            reasoning, normal = self._reasoner.parse_stream_chunk(text)
            delta.reasoning = reasoning or ""
            normal = normal or ""
        self._tools(normal, delta)
        return self._keep(delta)

    def finish(self) -> Delta:
        """What the parsers still held when the answer ended."""
        delta = Delta()
        if self._reasoner is not None:
            reasoning, normal = self._reasoner.parse_stream_end()
            delta.reasoning = reasoning or ""
            self._tools(normal or "", delta)
        self.finish_tools(delta)
        return self._keep(delta)

    def finish_tools(self, delta: Delta) -> None:
        """Drain the tool-call parser into `delta` at the end of the answer."""
        if self._tool_parser is None:
            return
        for _ in range(_DRAIN_LIMIT):  # calls that arrived whole are taken one per step
            before = (len(delta.content), len(delta.tool_calls))
            self._tools("", delta)
            if (len(delta.content), len(delta.tool_calls)) == before:
                break
        content, calls = self._end()
        delta.content += content
        self._add_calls(calls, delta)

    def whole(self, text: str) -> None:
        """Split a whole answer (see the module docstring)."""
        normal = text
        if self._reasoner is not None:
            reasoning, normal = self._reasoner.parse_non_stream(text)
            self.reasoning, normal = reasoning or "", normal or ""
        if self.plan.tool_mode != "auto":  # forced: the JSON array parser; or no parser
            delta = Delta()
            self._tools(normal, delta)
            self.finish_tools(delta)
            self.content += delta.content
            return
        content, items = self._tool_parser.parse_non_stream(normal)
        self.content = content or ""
        for item in items:
            self.calls.append(ToolCall(new_call_id(), str(item.name), item.parameters or "{}"))

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's finish reason: `tool_calls` when the answer stopped with calls."""
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason

    # --- the tool-call parser --------------------------------------------------------------

    def _tools(self, text: str, delta: Delta) -> None:
        parser = self._tool_parser
        if parser is None:
            delta.content += text
            return
        if self.plan.tool_mode == "forced":
            result = parser.parse_streaming_increment(text, self._tool_objects)
            content, calls = result.normal_text, result.calls
        else:
            content, calls = parser.parse_stream_chunk(text)
        delta.content += content or ""
        self._add_calls(calls, delta)

    def _end(self) -> tuple[str, list[Any]]:
        parser = self._tool_parser
        if self.plan.tool_mode == "forced":
            result = parser.finish(self._tool_objects)
            return result.normal_text, list(result.calls)
        content, calls = parser.parse_stream_end()
        return content or "", list(calls)

    def _add_calls(self, items: list[Any], delta: Delta) -> None:
        for item in items:
            index, arguments = int(item.tool_index), item.parameters or ""
            if item.name:  # a new call: its id and name come first, with any arguments
                while len(self.calls) <= index:
                    self.calls.append(ToolCall(new_call_id(), "", ""))
                call = self.calls[index]
                call.name = str(item.name)
                call.arguments += arguments
                delta.tool_calls.append(ToolCallDelta(index, call.id, call.name, arguments))
            elif arguments and index < len(self.calls):
                self.calls[index].arguments += arguments
                delta.tool_calls.append(ToolCallDelta(index, None, None, arguments))

    def _keep(self, delta: Delta) -> Delta:
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def message_content(self) -> str | None:
        """The content of the whole message: None when it is only tool calls."""
        if self.calls and not self.content.strip():
            return None
        return self.content.strip() if self.calls else self.content
