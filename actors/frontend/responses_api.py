"""`/v1/responses` (OpenAI's Responses API): text, function tools, reasoning, streamed
events, and `previous_response_id` from a bounded, expiring store (`response_store.py`).

A request becomes a chat request: `instructions` a system message, the input items
(messages, `function_call`, `function_call_output`) the conversation, continued from the
stored one when `previous_response_id` names it; then the chat path's prompt, parsers,
tool calling and guided decoding (`generation.chat_prompt`). What the frontend cannot serve
honestly is refused with a 400 naming the parameter (README.md, "Frontend").
`GET` and `DELETE /v1/responses/{id}` read and forget stored responses.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from actors.frontend import metrics
from actors.frontend.choice_output import ChoiceOutput
from actors.frontend.choices import Choice, ChoiceSet, end_error
from actors.frontend.errors import FrontendError
from actors.frontend.generation import chat_prompt, check_forced
from actors.frontend.http_io import (
    SseResponse,
    json_response,
    read_body,
    sse_event,
    until_disconnect,
)
from actors.frontend.openai_formats import (
    CalledFunction,
    ChatCompletionRequest,
    ChatMessageIn,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    ToolCallIn,
    ToolIn,
    generate_request,
    parse,
)
from actors.frontend.responses_input import conversation_of
from actors.frontend.responses_output import ResponseBuilder
from actors.frontend.state import FrontendState
from actors.frontend.tool_calls import tool_plan

__all__ = ["create_response", "delete_response", "get_response"]


class FunctionToolIn(msgspec.Struct, frozen=True, kw_only=True):
    """A Responses API function tool (flat: no `function` wrapper)."""

    type: str
    name: FunctionName | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(msgspec.Struct, frozen=True, kw_only=True):
    """`text.format`: text, json_object, or json_schema (guided decoding)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, frozen=True, kw_only=True):
    """`text`: the output's format."""

    format: TextFormat = TextFormat()


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`POST /v1/responses`."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[dict[str, Any]] = []
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionToolIn] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    text: TextOptions | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] = "disabled"
    # known and refused when set (README: "Frontend")
    background: bool | None = None
    conversation: Any = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None


_REFUSED = {
    "background": "background responses are not supported",
    "conversation": "conversations are not supported: use previous_response_id",
    "max_tool_calls": "max_tool_calls is not supported",
    "prompt": "prompt templates are not supported",
    "top_logprobs": "logprobs are not supported in responses (use /v1/chat/completions)",
}


def _refuse_unsupported(req: ResponsesRequest) -> None:
    for field, why in _REFUSED.items():
        if getattr(req, field) not in (None, False):
            raise FrontendError(400, why, param=field)
    if req.include:
        why = f"include {req.include[0]!r} is not supported"
        raise FrontendError(400, why, param="include")
    if req.truncation != "disabled":
        why = "only truncation 'disabled' is supported (a prompt over the context is refused)"
        raise FrontendError(400, why, param="truncation")
    for key, value in (req.reasoning or {}).items():
        if value is not None:
            why = f"reasoning.{key} is not supported: a reasoning model reasons as it was made"
            raise FrontendError(400, why, param=f"reasoning.{key}")


def _tools(req: ResponsesRequest) -> list[ToolIn] | None:
    tools = []
    for i, tool in enumerate(req.tools or []):
        if tool.type != "function":
            why = f"tool type {tool.type!r} is not supported (function tools only)"
            raise FrontendError(400, why, param=f"tools[{i}].type")
        if tool.name is None:
            raise FrontendError(400, "a function tool needs a name", param=f"tools[{i}].name")
        spec: dict[str, Any] = {"name": tool.name, "description": tool.description}
        spec |= {"parameters": tool.parameters, "strict": tool.strict}
        tools.append(msgspec.convert({"type": "function", "function": spec}, ToolIn))
    return tools or None


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and "name" in value:
        return msgspec.convert(
            {"type": "function", "function": {"name": value["name"]}}, NamedToolChoice
        )
    why = "tool_choice: only none, auto, required or a function"
    raise FrontendError(400, why, param="tool_choice")


def _chat_request(req: ResponsesRequest, messages: list[ChatMessageIn]) -> ChatCompletionRequest:
    fmt = req.text.format if req.text is not None else TextFormat()
    response_format = None
    if fmt.type == "json_object":
        response_format = ResponseFormat(type="json_object")
    elif fmt.type == "json_schema":
        schema = {"name": fmt.name or "output", "schema": fmt.schema}
        response_format = ResponseFormat(type="json_schema", json_schema=schema)
    return ChatCompletionRequest(
        model=req.model,
        messages=messages,
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=_tools(req),
        tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format,
        stream=req.stream,
        user=req.user,
    )


def _settings(req: ResponsesRequest) -> dict[str, Any]:
    """The request's parameters as the response object echoes them."""
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "store": req.store,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": [msgspec.to_builtins(t) for t in req.tools or []],
        "text": {"format": msgspec.to_builtins(req.text.format if req.text else TextFormat())},
        "truncation": req.truncation,
        "user": req.user,
    }


def _answered(output: ChoiceOutput) -> list[ChatMessageIn]:
    """The answer as the assistant's turn of the stored conversation."""
    calls = [
        ToolCallIn(id=c.id, function=CalledFunction(c.name, c.arguments)) for c in output.calls
    ]
    text = output.message_content() or ""
    return [ChatMessageIn(role="assistant", content=text, tool_calls=calls or None)]


def _not_stored(response_id: str, param: str | None = None) -> FrontendError:
    why = (
        f"response {response_id!r} is not stored here (never stored, stored by another "
        "frontend, evicted, or older than frontend.responses_ttl)"
    )
    if param is not None:
        return FrontendError(400, why, param=param, code="previous_response_not_found")
    return FrontendError(404, why, code="not_found")


async def create_response(state: FrontendState, request: Request) -> Response:
    """`POST /v1/responses`."""
    received = time.monotonic()
    req: ResponsesRequest = parse(await read_body(request), ResponsesRequest)
    _refuse_unsupported(req)
    history: list[ChatMessageIn] = []
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise _not_stored(req.previous_response_id, "previous_response_id")
        history = list(stored.conversation)
    conversation = history + conversation_of(req.input)
    if not conversation:
        raise FrontendError(400, "input is empty", param="input")
    system = [ChatMessageIn(role="system", content=req.instructions)] if req.instructions else []
    chat = _chat_request(req, system + conversation)
    tools = tool_plan(chat.tools, chat.tool_choice, chat.parallel_tool_calls)
    check_forced(chat, tools)
    prompt = await chat_prompt(state, req.model, chat.messages, tools)
    rid = f"resp_{uuid.uuid4().hex}"
    wire = generate_request(
        rid,
        chat,
        prompt.token_ids,
        prompt.card.context_length,
        state.request_timeout,
        forced_schema=prompt.forced_schema,
        parsing=prompt.plan.needs_parsers,
    )
    choice = Choice(0, wire, ChoiceOutput(prompt.plan, prompt.parsers))
    answering = ChoiceSet(state.dispatcher, [choice], "input")
    builder = ResponseBuilder(rid, req.model, _settings(req))

    def keep(body: dict[str, Any]) -> None:
        if req.store:
            state.responses.put(rid, body, conversation + _answered(choice.output))

    if await until_disconnect(request, answering.start()):
        metrics.TTFT.observe(time.monotonic() - received)
    if req.stream:
        return SseResponse(_events(answering, choice, builder, keep, received))
    try:
        await until_disconnect(request, answering.collect())
    finally:
        await answering.close()
    body = builder.whole(choice.output, choice.finish_reason, answering.usage())
    keep(body)
    metrics.DURATION.observe(time.monotonic() - received)
    metrics.REQUESTS.labels("responses", "200").inc()
    return json_response(body)


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\n".encode() + sse_event(event)


async def _events(
    answering: ChoiceSet,
    choice: Choice,
    builder: ResponseBuilder,
    keep: Callable[[dict[str, Any]], None],
    received: float,
) -> AsyncIterator[bytes]:
    status, output = "499", choice.output  # 499 unless it ends otherwise: the client left
    try:
        for event in builder.opening():
            yield _sse(event)
        async with contextlib.aclosing(answering.events()) as chunks:  # closed on any exit
            async for _, chunk in chunks:
                for event in builder.deltas(output, output.feed(chunk.text)):
                    yield _sse(event)
                if chunk.finish_reason is None:
                    continue
                if chunk.finish_reason not in ("stop", "length"):
                    raise end_error(chunk, answering.input_param)
                events = builder.deltas(output, output.finish())
                events += builder.ending(output, choice.finish_reason, answering.usage())
                for event in events:
                    yield _sse(event)
                keep(events[-1]["response"])
        status = "200"
    except FrontendError as error:
        status = str(error.status)
        failure = {"code": error.code or error.type, "message": error.message}
        yield _sse(builder.failed(failure))
    finally:
        await answering.close()
        metrics.REQUESTS.labels("responses", status).inc()
        metrics.DURATION.observe(time.monotonic() - received)


async def get_response(state: FrontendState, response_id: str) -> Response:
    """`GET /v1/responses/{id}`: a stored response."""
    stored = state.responses.get(response_id)
    if stored is None:
        raise _not_stored(response_id)
    return json_response(stored.body)


async def delete_response(state: FrontendState, response_id: str) -> Response:
    """`DELETE /v1/responses/{id}`: forget a stored response."""
    if not state.responses.delete(response_id):
        raise _not_stored(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
