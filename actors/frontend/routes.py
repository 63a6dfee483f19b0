"""The frontend's HTTP routes (FastAPI):

    POST /v1/chat/completions   chat, streaming (SSE) or not
    POST /v1/completions        text completion, streaming or not
    POST /v1/responses          the Responses API (GET / DELETE /v1/responses/{id})
    POST /v1/embeddings         to embedding-mode instances
    GET  /v1/models             the models of live instances (and /v1/models/{id})
    GET  /health                200 while connected to NATS, with what it sees
    GET  /metrics               the frontend's Prometheus metrics

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import array
import base64
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from actors.frontend import metrics
from actors.frontend.embeddings import send_embedding
from actors.frontend.errors import FrontendError, unknown_model
from actors.frontend.generation import chat_completions, completions
from actors.frontend.http_io import (
    ClientGone,
    SseResponse,
    error_response,
    json_response,
    read_body,
    until_disconnect,
)
from actors.frontend.openai_formats import EmbeddingRequest, parse
from actors.frontend.responses_api import create_response, delete_response, get_response
from actors.frontend.state import FrontendState
from actors.frontend.tokenizers import PromptTokenizer
from messages.request import EmbedRequest

__all__ = ["create_app"]


def create_app(state: FrontendState) -> FastAPI:
    """The FastAPI application over `state`."""
    app = FastAPI(title="sgl-node frontend", docs_url=None, redoc_url=None, openapi_url=None)
    log = state.log

    async def guarded(route: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            response = await handler()
        except FrontendError as exc:
            metrics.REQUESTS.labels(route, str(exc.status)).inc()
            if exc.status >= 500:
                log.warning("request failed", route=route, status=exc.status, error=exc.message)
            return error_response(exc)
        except ClientGone:
            metrics.REQUESTS.labels(route, "499").inc()
            return Response(status_code=499)
        except Exception as exc:
            log.exception("request crashed", route=route, error=f"{type(exc).__name__}: {exc}")
            metrics.REQUESTS.labels(route, "500").inc()
            why = f"internal error: {type(exc).__name__}: {exc}"
            return error_response(FrontendError.of_code("internal", why))
        plain = ("models", "embeddings", "responses_store")
        if route in plain and not isinstance(response, SseResponse):
            metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        why = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(FrontendError(exc.status_code, why, code=code))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await guarded("chat", lambda: chat_completions(state, request))

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        return await guarded("completions", lambda: completions(state, request))

    _responses_routes(app, state, guarded)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await guarded("embeddings", lambda: _embeddings(state, request))

    @app.get("/v1/models")
    async def models() -> Response:
        return await guarded("models", lambda: _models(state))

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        return await guarded("models", lambda: _model(state, model))

    @app.get("/health")
    async def health() -> Response:
        body = state.health()
        return json_response(body, 200 if body["nats_connected"] else 503)

    @app.get("/metrics")
    async def scrape() -> Response:
        state.refresh_gauges()
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


Guarded = Callable[[str, Callable[[], Awaitable[Response]]], Awaitable[Response]]


def _responses_routes(app: FastAPI, state: FrontendState, guarded: Guarded) -> None:
    """`/v1/responses` and its stored responses."""

    @app.post("/v1/responses")
    async def respond(request: Request) -> Response:
        return await guarded("responses", lambda: create_response(state, request))

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> Response:
        return await guarded("responses_store", lambda: get_response(state, response_id))

    @app.delete("/v1/responses/{response_id}")
    async def forget_response(response_id: str) -> Response:
        return await guarded("responses_store", lambda: delete_response(state, response_id))


def _model_entries(state: FrontendState) -> list[dict[str, Any]]:
    entries = []
    for name, records in sorted(state.discovery.models().items()):
        entries.append(
            {
                "id": name,
                "object": "model",
                "created": int(min(r.started_at for r in records)),
                "owned_by": "sgl-node",
            }
        )
    return entries


async def _models(state: FrontendState) -> Response:
    return json_response({"object": "list", "data": _model_entries(state)})


async def _model(state: FrontendState, name: str) -> Response:
    for entry in _model_entries(state):
        if entry["id"] == name:
            return json_response(entry)
    raise unknown_model(name)


def _embedding_inputs(value: str | list[Any], tokenizer: PromptTokenizer) -> list[list[int]]:
    """Token id lists for OpenAI's `input`: a string, strings, token ids, or lists of them."""
    items: list[Any] = [value] if isinstance(value, str) else list(value)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        items = [items]  # one input given as token ids
    inputs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.encode(item) if item else []
        elif isinstance(item, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in item
        ):
            ids = list(item)
        else:
            raise FrontendError(
                400,
                "input must be a string, strings, token ids, or lists of token ids",
                param="input",
            )
        if not ids:
            raise FrontendError(400, f"input[{i}] is empty", param="input")
        inputs.append(ids)
    if not inputs:
        raise FrontendError(400, "input is empty", param="input")
    return inputs


async def _embeddings(state: FrontendState, request: Request) -> Response:
    req: EmbeddingRequest = parse(await read_body(request), EmbeddingRequest)
    if req.dimensions is not None:
        raise FrontendError(400, "dimensions is not supported", param="dimensions")
    pool = state.discovery.pool(req.model)
    if pool is None:
        raise unknown_model(req.model)
    cards = [r.model for r in pool.registered if r.model.mode == "embedding"]
    tokenizer = await state.tokenizers.get(cards[0] if cards else pool.card)
    wire = EmbedRequest(
        request_id=f"embd-{uuid.uuid4().hex}",
        input=_embedding_inputs(req.input, tokenizer),
        model=req.model,
        timeout=state.request_timeout,
    )
    answer = await until_disconnect(request, send_embedding(state.dispatcher, wire))
    data = []
    for i, vector in enumerate(answer.embeddings):
        encoded: Any = vector
        if req.encoding_format == "base64":  # float32, little-endian, as OpenAI sends it
            encoded = base64.b64encode(array.array("f", vector).tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = answer.usage.prompt_tokens if answer.usage is not None else 0
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
