"""The Responses API's input items as a chat conversation.

- a message (`{"role", "content"}`, `type` "message" or absent): its text parts
  (`input_text`, `output_text`);
- `function_call` (`call_id`, `name`, `arguments`): a tool call of the assistant's turn
  (calls that follow an assistant message join it);
- `function_call_output` (`call_id`, `output`): a `tool` message answering that call;
- `reasoning`: left out (a model is not shown its earlier reasoning).

Anything else is refused with a 400 naming `input[i]...`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from actors.frontend.errors import FrontendError
from actors.frontend.openai_formats import (
    CalledFunction,
    ChatMessageIn,
    ContentPart,
    FunctionName,
    ToolCallIn,
    text_of,
)

__all__ = ["conversation_of"]


class _Message(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class _FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function_call"]
    call_id: str
    name: FunctionName
    arguments: str
    id: str | None = None
    status: str | None = None


class _FunctionCallOutput(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


_KINDS: dict[str, type[Any]] = {
    "message": _Message,
    "function_call": _FunctionCall,
    "function_call_output": _FunctionCallOutput,
}
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def _item(raw: dict[str, Any], i: int) -> Any:
    kind = raw.get("type", "message")
    if kind == "reasoning":
        return None
    if kind not in _KINDS:
        why = f"input item type {kind!r} is not supported (messages and function calls only)"
        raise FrontendError(400, why, param=f"input[{i}].type")
    try:
        return msgspec.convert(raw, _KINDS[kind])
    except msgspec.ValidationError as exc:
        found = _AT.search(str(exc))
        path = found["path"] if found else ""
        problem = _AT.sub("", str(exc))
        missing = _MISSING.match(problem)
        if missing:
            path += f".{missing[1]}"
        raise FrontendError(400, f"input[{i}]: {problem}", param=f"input[{i}]{path}") from None


def _call(item: _FunctionCall) -> ToolCallIn:
    return ToolCallIn(id=item.call_id, function=CalledFunction(item.name, item.arguments))


def conversation_of(value: str | list[dict[str, Any]]) -> list[ChatMessageIn]:
    """The chat messages of a request's `input` (see the module docstring)."""
    if isinstance(value, str):
        return [ChatMessageIn(role="user", content=value)]
    turns: list[ChatMessageIn] = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise FrontendError(400, "an input item must be an object", param=f"input[{i}]")
        item = _item(raw, i)
        if isinstance(item, _Message):
            text = text_of(item.content, f"input[{i}].content")
            turns.append(ChatMessageIn(role=item.role, content=text))
        elif isinstance(item, _FunctionCall):
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":  # joins the assistant's turn
                calls = [*(last.tool_calls or []), _call(item)]
                turns[-1] = msgspec.structs.replace(last, tool_calls=calls)
            else:
                turns.append(ChatMessageIn(role="assistant", content="", tool_calls=[_call(item)]))
        elif isinstance(item, _FunctionCallOutput):
            text = text_of(item.output, f"input[{i}].output")
            turns.append(ChatMessageIn(role="tool", content=text, tool_call_id=item.call_id))
    return turns
