"""`/v1/chat/completions` and `/v1/completions`: tokenize, dispatch, answer.

The frontend tokenizes (the card's tokenizer and chat template) and sends token ids, one
engine request per choice (`n`, and for completions each prompt; `choices.py`). A
stream's HTTP status is decided by the first outputs: the frontend waits for every
choice's first token (or a refusal) before it sends headers, so errors before any token
get their proper status (400, 404, 429, 503, 504); after it, an error ends the stream with
an OpenAI error event, then `data: [DONE]`.

Chat answers go through the model's parsers (`choice_output.py`): `reasoning_content`
apart from `content`, and tool calls (`tool_calls.py`, `parsers.py`).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from actors.frontend import metrics
from actors.frontend.choice_output import ChoiceOutput, OutputPlan
from actors.frontend.choices import Choice, ChoiceSet, end_error
from actors.frontend.errors import FrontendError, unknown_model
from actors.frontend.http_io import (
    SSE_DONE,
    SseResponse,
    json_response,
    read_body,
    sse_event,
    until_disconnect,
)
from actors.frontend.openai_formats import (
    ChatCompletionRequest,
    CompletionRequest,
    generate_request,
    parse,
    prompt_inputs,
    refuse_unsupported,
)
from actors.frontend.openai_responses import ChatFormat, CompletionFormat, OutputFormat
from actors.frontend.parsers import SglangParsers, model_parsers
from actors.frontend.state import FrontendState
from actors.frontend.tokenizers import PromptTokenizer
from actors.frontend.tool_calls import ToolPlan, template_input, tool_plan
from messages.discovery import ModelCard
from messages.request import Usage

__all__ = [
    "ChatPrompt",
    "answer",
    "chat_completions",
    "chat_prompt",
    "check_forced",
    "completions",
]


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request made ready for the engine: its prompt and how its answer is parsed."""

    card: ModelCard
    tokenizer: PromptTokenizer
    token_ids: list[int]
    plan: OutputPlan
    parsers: SglangParsers | None
    forced_schema: str | None  # the JSON schema that enforces a tool call


def _output_plan(tools: ToolPlan, tool_parser: str, reasoning: str, force: bool) -> OutputPlan:
    if tools.mode == "auto" and not tool_parser:
        why = (
            "the model's tool-call format is not known (its card names no parser); set "
            'frontend.tool_call_parser, or use tool_choice "required" or a named function'
        )
        raise FrontendError(400, why, param="tools")
    return OutputPlan(reasoning, force, tools.mode, tool_parser, tools.tools)


async def chat_prompt(
    state: FrontendState,
    model: str,
    messages: list[Any],
    tools: ToolPlan,
    separate_reasoning: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> ChatPrompt:
    """The prompt of a chat request (messages and tools through the model's template) and
    the plan for parsing its answer; shared by chat completions and the Responses API."""
    pool = state.discovery.pool(model)
    if pool is None:
        raise unknown_model(model)
    tokenizer = await state.tokenizers.get(pool.card)
    found = model_parsers(state.config.frontend, pool.card, tokenizer.renders_tools)
    reasoning = found.reasoning if separate_reasoning else ""
    plan = _output_plan(tools, found.tool_call, reasoning, found.force_reasoning)
    turns, template_tools = template_input(messages, tools, found.frontend_writes_tools)
    token_ids = tokenizer.chat(turns, template_tools, template_kwargs)
    parsers = await state.parsers.get() if plan.needs_parsers else None
    forced = None
    if tools.mode == "forced":
        assert parsers is not None
        forced = json.dumps(parsers.constraint(tools.tools, tools.named, tools.parallel))
    return ChatPrompt(pool.card, tokenizer, token_ids, plan, parsers, forced)


def check_forced(req: ChatCompletionRequest, tools: ToolPlan) -> None:
    """Refuse guided decoding of its own next to a forced tool call (it has one)."""
    if tools.mode != "forced":
        return
    if req.response_format is not None and req.response_format.type != "text":
        why = "response_format cannot be combined with a forced tool call (tool_choice)"
        raise FrontendError(400, why, param="response_format")
    if req.regex is not None:
        why = "regex cannot be combined with a forced tool call (tool_choice)"
        raise FrontendError(400, why, param="regex")


async def chat_completions(state: FrontendState, request: Request) -> Response:
    """`POST /v1/chat/completions`."""
    received = time.monotonic()
    req: ChatCompletionRequest = parse(await read_body(request), ChatCompletionRequest)
    refuse_unsupported(req)
    tools = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
    check_forced(req, tools)
    prompt = await chat_prompt(
        state, req.model, req.messages, tools, req.separate_reasoning, req.chat_template_kwargs
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    choices = []
    for i in range(req.n):
        wire = generate_request(
            f"{rid}.{i}" if req.n > 1 else rid,
            req,
            prompt.token_ids,
            prompt.card.context_length,
            state.request_timeout,
            choice=i,
            forced_schema=prompt.forced_schema,
            parsing=prompt.plan.needs_parsers,
        )
        choices.append(Choice(i, wire, ChoiceOutput(prompt.plan, prompt.parsers)))
    fmt = ChatFormat(rid, req.model, prompt.tokenizer)
    answering = ChoiceSet(state.dispatcher, choices, "messages")
    return await answer(request, "chat", req, answering, fmt, received)


async def completions(state: FrontendState, request: Request) -> Response:
    """`POST /v1/completions` (one prompt or several, `n` choices each)."""
    received = time.monotonic()
    req: CompletionRequest = parse(await read_body(request), CompletionRequest)
    refuse_unsupported(req)
    prompts = prompt_inputs(req)
    pool = state.discovery.pool(req.model)
    if pool is None:
        raise unknown_model(req.model)
    tokenizer = await state.tokenizers.get(pool.card)
    rid = f"cmpl-{uuid.uuid4().hex}"
    choices, echoes = [], []
    for p, prompt in enumerate(prompts):
        token_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not token_ids:
            raise FrontendError(400, "the prompt has no tokens", param="prompt")
        text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
        echoes.append(text if req.echo else "")
        for i in range(req.n):
            index = p * req.n + i
            request_id = rid if len(prompts) * req.n == 1 else f"{rid}.{index}"
            wire = generate_request(
                request_id, req, token_ids, pool.card.context_length, state.request_timeout, i
            )
            choices.append(Choice(index, wire, ChoiceOutput(OutputPlan(), None), prompt=p))
    fmt = CompletionFormat(rid, req.model, tokenizer, echoes)
    answering = ChoiceSet(state.dispatcher, choices, "prompt")
    return await answer(request, "completions", req, answering, fmt, received)


def _record_usage(usage: Usage | None) -> None:
    if usage is not None:
        metrics.PROMPT_TOKENS.inc(usage.prompt_tokens)
        metrics.CACHED_TOKENS.inc(usage.cached_tokens)
        metrics.COMPLETION_TOKENS.inc(usage.completion_tokens)


async def answer(
    request: Request,
    route: str,
    req: ChatCompletionRequest | CompletionRequest,
    answering: ChoiceSet,
    fmt: OutputFormat,
    received: float,
) -> Response:
    """Start the choices, then answer whole or as a stream."""
    if await until_disconnect(request, answering.start()):
        metrics.TTFT.observe(time.monotonic() - received)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return SseResponse(_events(answering, fmt, include_usage, route, received))
    try:
        await until_disconnect(request, answering.collect())
    finally:
        await answering.close()
    usage = answering.usage()
    _record_usage(usage)
    metrics.DURATION.observe(time.monotonic() - received)
    metrics.REQUESTS.labels(route, "200").inc()
    return json_response(fmt.whole(answering.choices, usage))


async def _choice_events(answering: ChoiceSet, fmt: OutputFormat) -> AsyncGenerator[Any, None]:
    """The chunks of every choice; an error chunk ends them (raised as FrontendError)."""
    for choice in answering.choices:
        opening = fmt.opening(choice)
        if opening is not None:
            yield opening
    async with contextlib.aclosing(answering.events()) as events:  # closed on any exit
        async for choice, chunk in events:
            body = fmt.delta(choice, choice.output.feed(chunk.text), chunk.logprobs)
            if body is not None:
                yield body
            if chunk.finish_reason is None:
                continue
            if chunk.finish_reason not in ("stop", "length"):
                raise end_error(chunk, answering.input_param)
            last = fmt.delta(choice, choice.output.finish(), None)
            if last is not None:
                yield last
            yield fmt.finish(choice)


async def _events(
    answering: ChoiceSet, fmt: OutputFormat, include_usage: bool, route: str, received: float
) -> AsyncIterator[bytes]:
    status = "499"  # unless it ends otherwise: the client went away
    try:
        async with contextlib.aclosing(_choice_events(answering, fmt)) as bodies:
            async for body in bodies:
                yield sse_event(body)
        usage = answering.usage()
        if include_usage:
            yield sse_event(fmt.usage_chunk(usage))
        _record_usage(usage)
        status = "200"
        yield SSE_DONE
    except FrontendError as error:
        status = str(error.status)
        yield sse_event(error.body())
        yield SSE_DONE
    finally:
        await answering.close()
        metrics.REQUESTS.labels(route, status).inc()
        metrics.DURATION.observe(time.monotonic() - received)
