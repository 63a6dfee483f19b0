"""OpenAI's request bodies (decoded and checked) and how they become `GenerateRequest`s.

Unknown fields are ignored, as OpenAI-compatible servers do; fields the frontend cannot
honour (`n` > 1, tools, several prompts in one request) are refused with a 400 naming
them. Values out of range are refused with the field as `param`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from actors.frontend.errors import FrontendError
from messages.codec import DecodeError, decode_json
from messages.request import GenerateRequest, OutputOptions, SamplingOptions, StopConditions

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "chat_messages",
    "generate_request",
    "parse",
    "prompt_input",
]

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=20)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]

DEFAULT_CHAT_MAX_TOKENS = 1024  # when a chat request sets no limit (capped by the context)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Body(msgspec.Struct, frozen=True, kw_only=True):
    pass


class ContentPart(_Body, frozen=True):
    """One part of a message's content; only `text` parts are supported."""

    type: str
    text: str | None = None


class ChatMessageIn(_Body, frozen=True):
    """A chat message as OpenAI sends it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body, frozen=True):
    """`stream_options`: `include_usage` adds a last chunk with the usage."""

    include_usage: bool = False


class ResponseFormat(_Body, frozen=True):
    """`response_format`: text, json_object, or json_schema (guided decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Body, frozen=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # SGLang's extensions to OpenAI's sampling parameters
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    regex: str | None = None


class ChatCompletionRequest(_Sampling, frozen=True, kw_only=True):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: TopK | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Sampling, frozen=True, kw_only=True):
    """`POST /v1/completions`; `prompt` is a string or token ids (one prompt)."""

    prompt: str | list[Any]
    logprobs: TopK | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class EmbeddingRequest(_Body, frozen=True):
    """`POST /v1/embeddings`: strings or token ids (one or many)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


def parse(body: bytes, type_: type[Any]) -> Any:
    """Decode a JSON body into `type_`, or raise a 400 naming the field at fault."""
    try:
        return decode_json(body, type_)
    except DecodeError as exc:
        field = exc.field or None
        where = f" ({field})" if field else ""
        raise FrontendError(
            400, f"invalid request body{where}: {exc.problem}", param=field
        ) from None


def _refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n != 1:
        raise FrontendError(400, "n > 1 is not supported; send n requests", param="n")
    if isinstance(req, ChatCompletionRequest) and req.tools:
        raise FrontendError(400, "tools are not supported by this frontend", param="tools")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise FrontendError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise FrontendError(400, "best_of > 1 is not supported", param="best_of")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as `{"role", "content"}` with text content (parts joined)."""
    _refuse_unsupported(req)
    out = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise FrontendError(
                        400,
                        f"content part type {part.type!r} is not supported (text only)",
                        param=f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": message.role, "content": content or ""})
    return out


def prompt_input(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    _refuse_unsupported(req)
    prompt: Any = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise FrontendError(400, "prompt is empty", param="prompt")
        return prompt
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < 2**31 for t in prompt):
            raise FrontendError(400, "prompt: token ids must be within 0..2^31-1", param="prompt")
        return list(prompt)
    if not prompt:
        raise FrontendError(400, "prompt is empty", param="prompt")
    raise FrontendError(
        400, "one prompt per request (a string or a list of token ids)", param="prompt"
    )


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    return [s for s in stops if s]


def _json_schema(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return '{"type": "object"}'
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise FrontendError(
            400, "response_format json_schema needs json_schema.schema", param="response_format"
        )
    return json.dumps(schema)


def generate_request(
    request_id: str,
    req: ChatCompletionRequest | CompletionRequest,
    token_ids: list[int],
    context_length: int,
    timeout: float,
) -> GenerateRequest:
    """The wire request for an OpenAI request whose prompt is `token_ids`."""
    if isinstance(req, ChatCompletionRequest):
        limit = req.max_completion_tokens or req.max_tokens
        default = min(DEFAULT_CHAT_MAX_TOKENS, max(1, context_length - len(token_ids)))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        schema = _json_schema(req.response_format)
    else:
        limit = req.max_tokens
        default = DEFAULT_COMPLETION_MAX_TOKENS
        logprobs = req.logprobs
        schema = None
    if len(token_ids) >= context_length:
        raise FrontendError(
            400,
            f"the prompt has {len(token_ids)} tokens; the model's context is {context_length}",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
        )
    sampling = SamplingOptions(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        json_schema=schema,
        regex=req.regex,
    )
    stop = StopConditions(
        max_tokens=limit or default,
        min_tokens=req.min_tokens,
        stop=_stop_list(req.stop),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
    )
    return GenerateRequest(
        request_id=request_id,
        token_ids=token_ids,
        model=req.model,
        sampling=sampling,
        stop=stop,
        output=OutputOptions(logprobs=logprobs),
        timeout=timeout,
        client_id=(req.user or "")[:128],
    )
