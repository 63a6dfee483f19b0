"""The Responses API's output: the `response` object, its output items (reasoning, the
assistant's message, function calls), and the streamed events that build them.

A streamed response opens an output item when its kind of output begins (reasoning, text,
a function call), sends its deltas, and closes it (its `.done` events) when another kind
begins or the answer ends; every event carries a `sequence_number`. The final
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer)
carries the same object a non-streamed request gets.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from actors.frontend.choice_output import ChoiceOutput, Delta, ToolCall
from messages.request import Usage

__all__ = ["ResponseBuilder", "new_item_id"]


def new_item_id(prefix: str) -> str:
    """An output item id (`msg_...`, `rs_...`, `fc_...`)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},  # not counted apart
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part] if status == "completed" else [],
    }


def _reasoning(item_id: str, text: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content}


def _function_call(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


class ResponseBuilder:
    """One response: its fixed fields (`settings`: the request's echoed parameters), its
    streamed events and its final object."""

    def __init__(self, response_id: str, model: str, settings: dict[str, Any]) -> None:
        self.id = response_id
        self.model = model
        self.settings = settings
        self.created_at = int(time.time())
        self._sequence = 0
        self._open: tuple[str, str, int] | None = None  # (kind, item id, call index)
        self._items: list[dict[str, Any]] = []  # done items, in output order
        self._text = ""  # of the open item
        self._held = ""  # text that is only whitespace so far: shown once more follows

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The `response` object."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": _usage(usage),
            "error": error,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            **self.settings,
        }

    def whole(self, output: ChoiceOutput, finish_reason: str, usage: Usage | None) -> Any:
        """The response of a finished answer (not streamed)."""
        items = []
        if output.reasoning:
            items.append(_reasoning(new_item_id("rs"), output.reasoning))
        content = output.message_content()
        if content or not output.calls:
            items.append(_message(new_item_id("msg"), content or "", "completed"))
        items += [_function_call(new_item_id("fc"), c, "completed") for c in output.calls]
        return self.body(_status(finish_reason), items, usage)

    # --- streaming ------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A streamed event with the next sequence number."""
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def opening(self) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`."""
        body = self.body("in_progress", [], None)
        return [
            self.event("response.created", response=body),
            self.event("response.in_progress", response=body),
        ]

    def deltas(self, output: ChoiceOutput, delta: Delta) -> list[dict[str, Any]]:
        """The events for what `delta` adds."""
        events: list[dict[str, Any]] = []
        if delta.reasoning:
            events += self._switch("reasoning", output)
            events += self._piece("response.reasoning_text.delta", delta.reasoning)
        text, self._held = self._held + delta.content, ""
        if text.strip():  # whitespace alone (around tool calls) opens no message
            events += self._switch("message", output)
            events += self._piece("response.output_text.delta", text, logprobs=[])
        else:
            self._held = text
        for call in delta.tool_calls:
            events += self._switch("function_call", output, call.index)
            if call.arguments:
                events += self._piece("response.function_call_arguments.delta", call.arguments)
        return events

    def ending(
        self, output: ChoiceOutput, finish_reason: str, usage: Usage | None
    ) -> list[dict[str, Any]]:
        """Close the open item, then `response.completed` (or `.incomplete`)."""
        events = []
        made = [i for i in self._items if i["type"] == "message"]
        if self._open is not None and self._open[0] == "message":
            made.append({})
        if not made and not output.calls:  # as a whole answer: a message, empty or not
            events += self._switch("message", output)
            if self._held:
                events += self._piece("response.output_text.delta", self._held, logprobs=[])
        events += self._close(output)
        status = _status(finish_reason)
        body = self.body(status, self._items, usage)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self.event(kind, response=body)]

    def failed(self, error: dict[str, Any]) -> dict[str, Any]:
        """`response.failed` with the error (`{"code", "message"}`)."""
        return self.event("response.failed", response=self.body("failed", self._items, None, error))

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open[1], "output_index": len(self._items)}

    def _piece(self, kind: str, text: str, **extra: Any) -> list[dict[str, Any]]:
        self._text += text
        where = self._where()
        if kind != "response.function_call_arguments.delta":
            where["content_index"] = 0
        return [self.event(kind, **where, delta=text, **extra)]

    def _switch(self, kind: str, output: ChoiceOutput, call: int = -1) -> list[dict[str, Any]]:
        if self._open is not None and self._open[0] == kind and self._open[2] == call:
            return []
        events = self._close(output)
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        self._open, self._text = (kind, new_item_id(prefix), call), ""
        item_id, index = self._open[1], len(self._items)
        if kind == "reasoning":
            item = _reasoning(item_id, "")
        elif kind == "message":
            item = _message(item_id, "", "in_progress")
        else:
            item = _function_call(item_id, output.calls[call], "in_progress")
        events.append(self.event("response.output_item.added", output_index=index, item=item))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            added = self.event("response.content_part.added", **self._where(), content_index=0)
            events.append({**added, "part": part})
        return events

    def _close(self, output: ChoiceOutput) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        kind, item_id, call = self._open
        where, text = self._where(), self._text
        events = []
        if kind == "reasoning":
            item = _reasoning(item_id, text)
            events.append(
                self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            )
        elif kind == "message":
            item = _message(item_id, text, "completed")
            events.append(
                self.event(
                    "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
                )
            )
            part = item["content"][0]
            events.append(
                self.event("response.content_part.done", **where, content_index=0, part=part)
            )
        else:
            item = _function_call(item_id, output.calls[call], "completed")
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    arguments=item["arguments"],
                    name=item["name"],
                )
            )
        events.append(
            self.event("response.output_item.done", output_index=where["output_index"], item=item)
        )
        self._items.append(item)
        self._open = None
        return events


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"
