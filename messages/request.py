"""The request plane: generate requests, stream chunks, errors, cancellation (JSON on NATS).

Modelled on Dynamo's preprocessed request: a request carries token ids (or, for
convenience, a text prompt or chat messages that the engine host tokenizes), sampling
options, stop conditions and output options. Every response on the reply subject is a
`StreamChunk`; the last one has a `finish_reason`. A request refused before it started
gets exactly one chunk, with `finish_reason = "error"` and an `error`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

__all__ = [
    "ERROR_CODES",
    "FINISH_REASONS",
    "BootstrapInfo",
    "CancelRequest",
    "ChatMessage",
    "Continuation",
    "DirectReply",
    "EmbedRequest",
    "EmbedResponse",
    "ErrorCode",
    "ErrorInfo",
    "FinishReason",
    "GenerateRequest",
    "HandoverReply",
    "OutputOptions",
    "ResumeReply",
    "ResumeRequest",
    "SamplingOptions",
    "StopConditions",
    "StreamChunk",
    "TokenLogprob",
    "Usage",
    "error_chunk",
    "error_info",
]

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Prob = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]

FinishReason = Literal["stop", "length", "cancelled", "shutdown", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled", "shutdown", "error")

ErrorCode = Literal[
    "invalid_request",  # the request is malformed or breaks a limit; see `field`
    "overloaded",  # the node is at max_inflight; try another node or later
    "too_many_streams",  # this client_id has max_streams_per_client streams open
    "engine_restarting",  # the engine died or is (re)starting; in-flight work is lost
    "engine_error",  # the engine refused or failed this request
    "deadline_exceeded",  # the request's timeout ran out
    "not_ready",  # the node is starting or stopping
    "internal",  # a bug; the node logs it with the request id
    "stream_lost",  # made by a client: chunks were lost and no node holds them any more
    "node_lost",  # made by the frontend: the node serving the stream is gone
    "kv_transfer_failed",  # a decode node could not get the KV cache from its prefill node
]
# Stable error codes (README: "Error codes") and whether each is retryable: whether the
# same request may succeed if sent again (on this node later, or on another node).
ERROR_CODES: dict[ErrorCode, bool] = {
    "invalid_request": False,
    "overloaded": True,
    "too_many_streams": True,
    "engine_restarting": True,
    "engine_error": False,
    "deadline_exceeded": False,
    "not_ready": True,
    "internal": False,
    "stream_lost": True,
    "node_lost": True,
    "kv_transfer_failed": True,
}
assert set(ERROR_CODES) == set(get_args(ErrorCode)), "every ErrorCode says if it is retryable"


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


class SamplingOptions(_Wire, frozen=True):
    """How to pick tokens. Unset fields take the engine's defaults."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None  # -1: all
    min_p: Prob | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] | None = None
    json_schema: str | None = None  # guided decoding (a JSON Schema, as a string)
    regex: str | None = None


class StopConditions(_Wire, frozen=True):
    """When to stop generating."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 128
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    stop: list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]] = []
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False


class OutputOptions(_Wire, frozen=True):
    """What each chunk carries."""

    text: bool = True  # detokenized text deltas next to the token ids
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None  # top-k per token
    skip_special_tokens: bool = True


class ChatMessage(_Wire, frozen=True):
    """One chat turn; the engine host applies the model's chat template."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class BootstrapInfo(_Wire, frozen=True):
    """Disaggregated serving: where the decode node fetches the prefill's KV cache (the
    prefill node's bootstrap server) and the room that identifies this request there."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    room: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class DirectReply(_Wire, frozen=True):
    """Where a frontend takes a request's chunks straight over TCP instead of through the
    NATS server (see `actors.streams.direct`): its host, port, and the token it expects."""

    host: Annotated[str, msgspec.Meta(max_length=255)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    token: Annotated[str, msgspec.Meta(max_length=128)]


class Continuation(_Wire, frozen=True):
    """The part of a stream the client already has, when a request continues elsewhere:
    on a restarted engine, on another DP rank, handler or node. The engine gets the prompt
    followed by `token_ids` and generates the rest; chunks go on from `next_index`, and the
    client sees one stream. Sent by the client library and the frontend when a node is
    lost, and by a draining node handing its streams over (`reply_to`)."""

    token_ids: list[TokenId]  # every token the client already got, in order
    next_index: Annotated[int, msgspec.Meta(ge=0)]  # the index of the next chunk it expects
    migrations: Annotated[int, msgspec.Meta(ge=0)] = 0  # seams so far, this one included
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # as the first engine counted them
    cached_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # the first attempt's prefix hit
    # A handover from a draining node: stream to this subject (the client's inbox), and
    # answer the message's own reply subject with whether the stream was taken.
    reply_to: str = ""


class GenerateRequest(_Wire, frozen=True):
    """A streaming generate request. Exactly one of token_ids, prompt, messages."""

    request_id: RequestId
    token_ids: list[TokenId] | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str = ""
    sampling: SamplingOptions = SamplingOptions()
    stop: StopConditions = StopConditions()
    output: OutputOptions = OutputOptions()
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None  # seconds
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    dp_rank: Annotated[int, msgspec.Meta(ge=0)] | None = None
    priority: int | None = None
    bootstrap_info: BootstrapInfo | None = None  # disaggregated prefill/decode
    lora: str = ""  # a loaded LoRA adapter's name (see the admin op lora_load)
    continuation: Continuation | None = None  # the stream continues from here (see above)
    # Send the chunks straight to the frontend (the reply subject names the stream there);
    # only set for nodes that say they can (InstanceRecord.direct_streams).
    reply_direct: DirectReply | None = None

    def input_field(self) -> str:
        """The input form given (`token_ids`, `prompt` or `messages`), the `field` of a
        problem with it; '' when not exactly one is given (no single field is at fault)."""
        given = [n for n in ("token_ids", "prompt", "messages") if getattr(self, n) is not None]
        return given[0] if len(given) == 1 else ""

    def input_problem(self) -> str | None:
        """Why the input is unusable, or None (exactly one form, not empty)."""
        given = [n for n in ("token_ids", "prompt", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            return f"give exactly one of token_ids, prompt, messages (got {given or 'none'})"
        if not getattr(self, given[0]):
            return f"{given[0]} is empty"
        return None


class Usage(_Wire, frozen=True):
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class ErrorInfo(_Wire, frozen=True):
    """Why a stream ended with `finish_reason = "error"`."""

    code: str  # one of ERROR_CODES
    message: str
    retryable: bool = False
    field: str = ""  # for invalid_request: the dotted path at fault


class TokenLogprob(_Wire, frozen=True):
    """Log-probability of a generated token, with the top alternatives when asked."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class StreamChunk(_Wire, frozen=True):
    """One message of a response stream; `index` counts from 0 per request."""

    request_id: str
    index: int
    token_ids: list[int] = []
    text: str = ""
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    bootstrap_info: BootstrapInfo | None = None  # a prefill node's first chunk
    migrations: int = 0  # seams the stream went through (engine restarts, moves): 0 omitted


class EmbedRequest(_Wire, frozen=True):
    """An embedding request (to nodes in `embedding` mode): `input` is a string, a list
    of strings, a list of token ids, or a list of token-id lists."""

    request_id: RequestId
    input: str | list[Any]
    model: str = ""
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""

    def normalized(self) -> tuple[list[str] | None, list[list[int]] | None, str | None]:
        """(texts, token id lists, problem): exactly one of the first two, or a problem."""
        value = self.input
        if isinstance(value, str):
            return [value], None, None if value else "input is empty"
        if not value:
            return None, None, "input is empty"
        if all(isinstance(v, str) for v in value):
            return list(value), None, None
        if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in value):
            return None, [list(value)], None
        if all(
            isinstance(v, list)
            and v
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in v)
            for v in value
        ):
            return None, [list(v) for v in value], None
        return None, None, "input must be a string, strings, token ids, or lists of token ids"


class EmbedResponse(_Wire, frozen=True):
    """The answer to an EmbedRequest: one vector per input, or an error."""

    request_id: str
    embeddings: list[list[float]] = []
    usage: Usage | None = None
    error: ErrorInfo | None = None


class CancelRequest(_Wire, frozen=True):
    """Cancel an in-flight request by id (broadcast on the cancel subject). With
    `below_migrations`, only a copy of the stream left behind by a move is cancelled (one
    whose migrations are fewer): a client that moved a stream stops the old one."""

    request_id: RequestId
    below_migrations: Annotated[int, msgspec.Meta(ge=1)] | None = None


class HandoverReply(_Wire, frozen=True):
    """A node's answer to a continuation handed over by a draining node (a request whose
    `continuation.reply_to` is set): whether it took the stream, or why not."""

    accepted: bool
    error: ErrorInfo | None = None


class ResumeRequest(_Wire, frozen=True):
    """Ask again for a stream's chunks from `from_index` on, after some were lost in transit
    (a NATS server restart, a dropped connection). Broadcast on the resume subject with a
    reply subject; the node holding the request answers with a `ResumeReply`, the others
    stay silent."""

    request_id: RequestId
    from_index: Annotated[int, msgspec.Meta(ge=0)] = 0


class ResumeReply(_Wire, frozen=True):
    """The chunks of a stream from the asked index on, as the node sent them; `ended` says
    the last of them has the finish reason (the node keeps ended streams for
    `handlers.resume_window` seconds)."""

    request_id: str
    chunks: list[StreamChunk] = []
    ended: bool = False


def error_info(code: ErrorCode, message: str, field: str = "") -> ErrorInfo:
    """The error of a stream that ends in `code` (retryable as `ERROR_CODES` says)."""
    return ErrorInfo(code=code, message=message, retryable=ERROR_CODES[code], field=field)


def error_chunk(
    request_id: str, index: int, code: ErrorCode, message: str, field: str = ""
) -> StreamChunk:
    """The terminal chunk for a request that ends in error `code`."""
    return StreamChunk(
        request_id=request_id,
        index=index,
        finish_reason="error",
        error=error_info(code, message, field),
    )
