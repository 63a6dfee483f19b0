"""`/v1/chat/completions` and `/v1/completions`: tokenize, dispatch, answer.

The frontend tokenizes (the card's tokenizer and chat template) and sends token ids. A
stream's HTTP status is decided by its first output: the frontend waits for the first
token (or a refusal) before it sends headers, so errors before any token get their
proper status (400, 404, 429, 503, 504); after it, an error ends the stream with an
OpenAI error event, then `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from actors.frontend import metrics
from actors.frontend.errors import FrontendError, from_node_error, unknown_model
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
    chat_messages,
    generate_request,
    parse,
    prompt_input,
)
from actors.frontend.openai_responses import ChatFormat, CompletionFormat, OutputFormat
from actors.frontend.state import FrontendState
from messages.request import GenerateRequest, StreamChunk, TokenLogprob, Usage

__all__ = ["chat_completions", "completions"]


async def chat_completions(state: FrontendState, request: Request) -> Response:
    """`POST /v1/chat/completions`."""
    received = time.monotonic()
    req: ChatCompletionRequest = parse(await read_body(request), ChatCompletionRequest)
    messages = chat_messages(req)
    pool = state.discovery.pool(req.model)
    if pool is None:
        raise unknown_model(req.model)
    tokenizer = await state.tokenizers.get(pool.card)
    token_ids = tokenizer.chat(messages)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    wire = generate_request(rid, req, token_ids, pool.card.context_length, state.request_timeout)
    fmt = ChatFormat(rid, req.model, tokenizer)
    return await _answer(state, request, "chat", req, wire, fmt, received, "messages")


async def completions(state: FrontendState, request: Request) -> Response:
    """`POST /v1/completions`."""
    received = time.monotonic()
    req: CompletionRequest = parse(await read_body(request), CompletionRequest)
    prompt = prompt_input(req)
    pool = state.discovery.pool(req.model)
    if pool is None:
        raise unknown_model(req.model)
    tokenizer = await state.tokenizers.get(pool.card)
    token_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    if not token_ids:
        raise FrontendError(400, "the prompt has no tokens", param="prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    wire = generate_request(rid, req, token_ids, pool.card.context_length, state.request_timeout)
    echo = "" if not req.echo else prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    fmt = CompletionFormat(rid, req.model, tokenizer, echo=echo)
    return await _answer(state, request, "completions", req, wire, fmt, received, "prompt")


async def _first_output(chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    """Chunks up to the first with output or a finish reason (prefill-only chunks skipped)."""
    taken = []
    async for chunk in chunks:
        taken.append(chunk)
        if chunk.token_ids or chunk.text or chunk.finish_reason is not None:
            break
    last = taken[-1] if taken else None
    if last is None or (last.finish_reason is None and not (last.token_ids or last.text)):
        raise FrontendError.of_code("internal", "the stream ended without a finish reason")
    return taken


async def _resumed(
    taken: list[StreamChunk], chunks: AsyncIterator[StreamChunk]
) -> AsyncIterator[StreamChunk]:
    """The chunks already taken, then the rest of the stream."""
    for chunk in taken:
        yield chunk
    if taken[-1].finish_reason is None:
        async for chunk in chunks:
            yield chunk


def _end_error(chunk: StreamChunk, input_param: str) -> FrontendError:
    """The error for a stream that ended other than `stop` / `length`."""
    if chunk.finish_reason == "error":
        return from_node_error(chunk.error, input_param=input_param)
    code = "shutdown" if chunk.finish_reason == "shutdown" else "cancelled"
    return FrontendError.of_code(code, f"the request ended early: {chunk.finish_reason}")


def _record_usage(usage: Usage | None) -> None:
    if usage is not None:
        metrics.PROMPT_TOKENS.inc(usage.prompt_tokens)
        metrics.CACHED_TOKENS.inc(usage.cached_tokens)
        metrics.COMPLETION_TOKENS.inc(usage.completion_tokens)


async def _answer(
    state: FrontendState,
    request: Request,
    route: str,
    req: ChatCompletionRequest | CompletionRequest,
    wire: GenerateRequest,
    fmt: OutputFormat,
    received: float,
    input_param: str,
) -> Response:
    chunks = state.dispatcher.generate(wire)
    try:
        taken = await until_disconnect(request, _first_output(chunks))
    except BaseException:
        await chunks.aclose()
        raise
    first = taken[-1]
    if first.token_ids or first.text:
        metrics.TTFT.observe(time.monotonic() - received)
    if first.finish_reason is not None and first.finish_reason not in ("stop", "length"):
        await chunks.aclose()
        raise _end_error(first, input_param)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        events = _events(taken, chunks, fmt, include_usage, route, received, input_param)
        return SseResponse(events)
    try:
        body = await until_disconnect(request, _collect(taken, chunks, fmt, input_param))
    finally:
        await chunks.aclose()
    metrics.DURATION.observe(time.monotonic() - received)
    metrics.REQUESTS.labels(route, "200").inc()
    return json_response(body)


async def _collect(
    taken: list[StreamChunk],
    chunks: AsyncIterator[StreamChunk],
    fmt: OutputFormat,
    input_param: str,
) -> dict[str, Any]:
    texts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    final: StreamChunk | None = None

    async for chunk in _resumed(taken, chunks):
        texts.append(chunk.text)
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + list(chunk.logprobs)
        if chunk.finish_reason is not None:
            final = chunk
            break
    if final is None:
        raise FrontendError.of_code("internal", "the stream ended without a finish reason")
    if final.finish_reason not in ("stop", "length"):
        raise _end_error(final, input_param)
    _record_usage(final.usage)
    return fmt.whole("".join(texts), final.finish_reason, final.usage, logprobs)


async def _events(
    taken: list[StreamChunk],
    chunks: AsyncGenerator[StreamChunk, None],
    fmt: OutputFormat,
    include_usage: bool,
    route: str,
    received: float,
    input_param: str,
) -> AsyncIterator[bytes]:
    status = "499"  # unless it ends otherwise: the client went away
    try:
        opening = fmt.opening()
        if opening is not None:
            yield sse_event(opening)
        async for chunk in _resumed(taken, chunks):
            if chunk.text or chunk.logprobs:
                yield sse_event(fmt.delta(chunk.text, chunk.logprobs))
            if chunk.finish_reason is None:
                continue
            if chunk.finish_reason in ("stop", "length"):
                status = "200"
                yield sse_event(fmt.finish(chunk.finish_reason))
                if include_usage:
                    yield sse_event(fmt.usage_chunk(chunk.usage))
                _record_usage(chunk.usage)
            else:
                error = _end_error(chunk, input_param)
                status = str(error.status)
                yield sse_event(error.body())
            yield SSE_DONE
            return
        error = FrontendError.of_code("internal", "the stream ended without a finish reason")
        status = "500"
        yield sse_event(error.body())
        yield SSE_DONE
    except FrontendError as error:
        status = str(error.status)
        yield sse_event(error.body())
        yield SSE_DONE
    finally:
        await chunks.aclose()
        metrics.REQUESTS.labels(route, status).inc()
        metrics.DURATION.observe(time.monotonic() - received)
