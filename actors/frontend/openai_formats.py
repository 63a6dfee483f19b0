"""OpenAI's request bodies (decoded and checked) and how they become `GenerateRequest`s.

Unknown fields are ignored, as OpenAI-compatible servers do; the ones the frontend knows
and cannot honour are refused with a 400 naming them (`refuse_unsupported`), and values
out of range are refused with the field as `param`. README.md, "Frontend", lists both.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from actors.frontend.errors import FrontendError
from messages.codec import DecodeError, decode_json
from messages.request import GenerateRequest, OutputOptions, SamplingOptions, StopConditions

__all__ = [
    "MAX_CHOICES",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "CompletionRequest",
    "EmbeddingRequest",
    "NamedToolChoice",
    "ToolIn",
    "generate_request",
    "parse",
    "prompt_inputs",
    "refuse_unsupported",
    "text_of",
]

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=20)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
FunctionName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.:-]+$")]

MAX_CHOICES = 16  # n (times the prompts of a completion request): each is an engine request
DEFAULT_CHAT_MAX_TOKENS = 1024  # when a chat request sets no limit (capped by the context)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Body(msgspec.Struct, frozen=True, kw_only=True):
    pass


class ContentPart(_Body, frozen=True):
    """One part of a message's content; only `text` parts are supported."""

    type: str
    text: str | None = None


class FunctionIn(_Body, frozen=True):
    """A function tool's declaration."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of its arguments
    strict: bool | None = None


class ToolIn(_Body, frozen=True):
    """`tools[i]`: function tools only."""

    type: Literal["function"]
    function: FunctionIn


class ChosenFunction(_Body, frozen=True):
    """The function a named `tool_choice` forces."""

    name: FunctionName


class NamedToolChoice(_Body, frozen=True):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: ChosenFunction


class CalledFunction(_Body, frozen=True):
    """What an assistant's tool call called."""

    name: FunctionName
    arguments: str  # JSON text


class ToolCallIn(_Body, frozen=True):
    """A tool call in an assistant message of the history."""

    id: Annotated[str, msgspec.Meta(min_length=1)]
    function: CalledFunction
    type: Literal["function"] = "function"


class ChatMessageIn(_Body, frozen=True):
    """A chat message as OpenAI sends it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # an earlier answer's; not shown to the model


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
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty
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
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # SGLang's: reasoning_content apart from content (for a model with a reasoning parser)
    separate_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the chat template
    # known and refused (README: "Frontend")
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionRequest(_Sampling, frozen=True, kw_only=True):
    """`POST /v1/completions`; `prompt`: a string, strings, token ids, or lists of them."""

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


_REFUSED_CHAT = {  # field: why (refused when set)
    "audio": "audio output is not supported (text only)",
    "prediction": "predicted outputs are not supported",
    "functions": "functions (deprecated) are not supported: use tools",
    "function_call": "function_call (deprecated) is not supported: use tool_choice",
    "reasoning_effort": "reasoning_effort is not supported: set the model's own switch in "
    "chat_template_kwargs (e.g. enable_thinking)",
    "web_search_options": "web search is not supported",
}


def refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 naming the first parameter the frontend knows and cannot honour."""
    if req.logit_bias:
        raise FrontendError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise FrontendError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise FrontendError(400, "best_of > 1 is not supported: use n", param="best_of")
        return
    for field, why in _REFUSED_CHAT.items():
        if getattr(req, field) is not None:
            raise FrontendError(400, why, param=field)
    if req.modalities not in (None, ["text"]):
        raise FrontendError(400, "only the text modality is supported", param="modalities")


def text_of(content: str | list[ContentPart] | None, param: str) -> str:
    """A message's text (text parts joined); other parts are refused naming `param`."""
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise FrontendError(
                400, f"content part type {part.type!r} is not supported (text only)", param=param
            )
        texts.append(part.text)
    return "".join(texts)


def _one_prompt(prompt: Any, param: str) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise FrontendError(400, f"{param} is empty", param="prompt")
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if not all(0 <= t < 2**31 for t in prompt):
            why = f"{param}: token ids must be within 0..2^31-1"
            raise FrontendError(400, why, param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise FrontendError(400, f"{param} is empty", param="prompt")
    why = f"{param} must be a string or a list of token ids"
    raise FrontendError(400, why, param="prompt")


def prompt_inputs(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: one (a string or token ids) or several (a list
    of strings or of token id lists); their number times `n` is at most MAX_CHOICES."""
    prompt: Any = req.prompt
    batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str | list)
    items = list(prompt) if batch else [prompt]
    prompts = [_one_prompt(p, f"prompt[{i}]" if batch else "prompt") for i, p in enumerate(items)]
    if len(prompts) * req.n > MAX_CHOICES:
        why = f"{len(prompts)} prompts x n={req.n} choices is over the limit of {MAX_CHOICES}"
        raise FrontendError(400, why, param="n" if req.n > 1 else "prompt")
    return prompts


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
    choice: int = 0,
    forced_schema: str | None = None,
    parsing: bool = False,
) -> GenerateRequest:
    """The wire request of choice `choice` (0..n-1) for an OpenAI request whose prompt is
    `token_ids`. `forced_schema`: the JSON schema that enforces a tool call; `parsing`:
    the answer goes through parsers, which need the special tokens' text."""
    if isinstance(req, ChatCompletionRequest):
        limit = req.max_completion_tokens or req.max_tokens
        default = min(DEFAULT_CHAT_MAX_TOKENS, max(1, context_length - len(token_ids)))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        schema = _json_schema(req.response_format)
    else:
        limit, default = req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS
        logprobs, schema = req.logprobs, None
    if len(token_ids) >= context_length:
        raise FrontendError(
            400,
            f"the prompt has {len(token_ids)} tokens; the model's context is {context_length}",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
        )
    seed = req.seed if req.seed is None or choice == 0 else (req.seed + choice) % 2**63
    sampling = SamplingOptions(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=seed,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        json_schema=forced_schema or schema,
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
        output=OutputOptions(logprobs=logprobs, skip_special_tokens=not parsing),
        timeout=timeout,
        client_id=(req.user or "")[:128],
    )
