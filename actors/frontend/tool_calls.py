"""Tool calling on the request side: which tools a request offers and how it chooses
(`ToolPlan`), and the history rendered for the model's chat template (`template_input`).

- `tool_choice`: `"none"` (the tools are not shown; no call is parsed), `"auto"` (the
  default with tools: the model may call, in its own format, parsed by its parser),
  `"required"` or a named function: enforced by guided decoding, a JSON array of calls.
- History: assistant messages with `tool_calls` and `tool` messages with their
  `tool_call_id`. A template that renders tools gets them as OpenAI's objects (`tools`,
  `tool_calls` with the arguments as an object, `tool_call_id` and the function's `name`);
  for one that does not, the frontend writes them as text in the Hermes convention that the
  `hermes` parser reads back (`parsers.py`): the tool list in the system message, each call
  as `<tool_call>{"name", "arguments"}</tool_call>` after the assistant's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from actors.frontend.errors import FrontendError
from actors.frontend.openai_formats import ChatMessageIn, NamedToolChoice, ToolIn, text_of
from actors.frontend.parsers import ToolSpec

__all__ = ["ToolPlan", "template_input", "tool_plan", "tools_prompt"]

Mode = Literal["none", "auto", "forced"]


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers and how the answer may use them."""

    tools: tuple[ToolSpec, ...] = ()
    mode: Mode = "none"
    named: str | None = None  # forced: this function (else any of the tools)
    parallel: bool = True

    @property
    def shown(self) -> tuple[ToolSpec, ...]:
        """The tools the model sees: none for `"none"`, the named one when named."""
        if self.mode == "none":
            return ()
        if self.named is not None:
            return tuple(t for t in self.tools if t.name == self.named)
        return self.tools


def tool_plan(
    tools: list[ToolIn] | None,
    choice: Literal["none", "auto", "required"] | NamedToolChoice | None,
    parallel: bool,
) -> ToolPlan:
    """Check `tools` and `tool_choice` together; 400 naming the parameter at fault."""
    specs = tuple(
        ToolSpec(t.function.name, t.function.description, t.function.parameters, t.function.strict)
        for t in tools or []
    )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise FrontendError(400, f"two tools are named {duplicate!r}", param="tools")
    if choice is None:
        choice = "auto" if specs else "none"
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            why = f"tool_choice names {choice.function.name!r}, which is not among the tools"
            raise FrontendError(400, why, param="tool_choice")
        return ToolPlan(specs, "forced", choice.function.name, parallel)
    if choice == "required" and not specs:
        raise FrontendError(400, 'tool_choice "required" needs tools', param="tool_choice")
    if choice == "none" or not specs:
        return ToolPlan(specs, "none", None, parallel)
    return ToolPlan(specs, "forced" if choice == "required" else "auto", None, parallel)


def _tool_object(spec: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": spec.name}
    if spec.description is not None:
        function["description"] = spec.description
    function["parameters"] = spec.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def tools_prompt(tools: tuple[ToolSpec, ...]) -> str:
    """The tool list and how to call, for a template that renders no tools (Hermes)."""
    listed = "\n".join(json.dumps(_tool_object(t), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help with the answer. They are listed here as JSON, "
        f"inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n"
        "To call one, answer with a <tool_call></tool_call> block holding a JSON object with "
        "the function's name and its arguments, one block per call:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<the arguments>}}\n</tool_call>'
    )


def _arguments(text: str, param: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise FrontendError(400, "the arguments are not JSON", param=param) from None


def _assistant(message: ChatMessageIn, i: int, as_text: bool) -> dict[str, Any]:
    content = text_of(message.content, f"messages[{i}].content")
    calls = []
    for j, call in enumerate(message.tool_calls or []):
        param = f"messages[{i}].tool_calls[{j}].function.arguments"
        arguments = _arguments(call.function.arguments, param)
        calls.append((call, arguments))
    if as_text:
        blocks = [
            "<tool_call>\n"
            + json.dumps({"name": c.function.name, "arguments": a}, ensure_ascii=False)
            + "\n</tool_call>"
            for c, a in calls
        ]
        return {"role": "assistant", "content": "\n".join([content, *blocks]).strip()}
    turn: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": a}}
            for c, a in calls
        ]
    return turn


def template_input(
    messages: list[ChatMessageIn], plan: ToolPlan, frontend_writes_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools) for the chat template, per the module docstring."""
    names: dict[str, str] = {}  # tool call id -> function name
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role == "assistant":
            turns.append(_assistant(message, i, frontend_writes_tools))
            names.update({c.id: c.function.name for c in message.tool_calls or []})
            continue
        turn: dict[str, Any] = {
            "role": message.role,
            "content": text_of(message.content, f"messages[{i}].content"),
        }
        if message.role == "tool":
            if not message.tool_call_id:
                why = "a tool message needs the tool_call_id it answers"
                raise FrontendError(400, why, param=f"messages[{i}].tool_call_id")
            if not frontend_writes_tools:
                turn["tool_call_id"] = message.tool_call_id
                turn["name"] = names.get(message.tool_call_id, message.name or "")
        turns.append(turn)
    shown = plan.shown
    if not shown:
        return turns, None
    if not frontend_writes_tools:
        return turns, [_tool_object(t) for t in shown]
    prompt = tools_prompt(shown)
    if turns and turns[0]["role"] in ("system", "developer"):
        turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{prompt}".strip()}
    else:
        turns.insert(0, {"role": "system", "content": prompt})
    return turns, None
