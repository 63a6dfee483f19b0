"""The engine host channel: EngineActor ⇄ engine host process, msgpack over local ZMQ.

Commands go on a PUSH→PULL socket to the host; outputs (stream chunks, control replies)
come back on a PUSH→PULL socket from it. Both ends decode into these types.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import msgspec

from messages.request import (
    BootstrapInfo,
    ChatMessage,
    OutputOptions,
    SamplingOptions,
    StopConditions,
    TokenLogprob,
    Usage,
)

__all__ = [
    "CONTROL_OPS",
    "ENGINE_OPS",
    "ControlOp",
    "EngineInfo",
    "EngineOp",
    "HostAbort",
    "HostChunk",
    "HostChunks",
    "HostCommand",
    "HostControl",
    "HostControlReply",
    "HostEmbed",
    "HostGenerate",
    "HostOutput",
    "HostShutdown",
    "PeerHello",
    "PeerWelcome",
]

# The engine operations an operator may run (admin subject, `/engine/<op>`): the one list
# every other list of ops derives from.
EngineOp = Literal[
    "stats",
    "kv_view",  # the block ids each DP rank holds (sim)
    "flush_cache",
    "release_memory",
    "resume_memory",
    "update_weights",
    "update_weight_version",
    "lora_load",  # args: name, path
    "lora_unload",  # args: name
    "lora_list",
    "session_open",  # args: capacity_of_str_len (optional); data: session_id
    "session_close",  # args: session_id
    "start_profile",
    "stop_profile",
]
# ... and those only the node itself sends to its engine host.
ControlOp = Literal[
    EngineOp,
    "info",
    "probe",
    "slow",  # sim: scale the timing model (fault injection)
    "reset_sequence",  # sim: restart a rank's KV event sequence (fault injection)
    "chaos",
]
ENGINE_OPS: tuple[str, ...] = get_args(EngineOp)
CONTROL_OPS: tuple[str, ...] = get_args(ControlOp)


class _Cmd(msgspec.Struct, frozen=True, tag_field="kind", tag=str.lower):
    pass


class HostGenerate(_Cmd, frozen=True, tag="generate"):
    """Start a streaming generation. Exactly one of token_ids / prompt / messages."""

    request_id: str
    token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingOptions = SamplingOptions()
    stop: StopConditions = StopConditions()
    output: OutputOptions = OutputOptions()
    dp_rank: int | None = None
    priority: int | None = None
    max_prompt_tokens: int = 0  # 0: no limit
    canary: bool = False  # a health canary, not a client request
    bootstrap: BootstrapInfo | None = None  # disaggregated prefill/decode
    lora: str = ""  # a loaded LoRA adapter's name
    # A continuation: tokens already generated (by an earlier attempt) that follow the
    # prompt; the engine generates what comes after them. Its text and stop strings
    # behave as if one request had produced all of it.
    continuation_ids: list[int] = []

    def input_field(self) -> str:
        """The name of the input form given (`token_ids`, `prompt` or `messages`), for
        the `field` of a refusal about the prompt; '' when not exactly one is given."""
        given = [n for n in ("token_ids", "prompt", "messages") if getattr(self, n) is not None]
        return given[0] if len(given) == 1 else ""


class HostEmbed(_Cmd, frozen=True, tag="embed"):
    """Embed texts or token id lists; answered by one HostChunk with `embeddings`."""

    request_id: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    max_prompt_tokens: int = 0


class HostAbort(_Cmd, frozen=True, tag="abort"):
    """Abort a request; its stream ends with finish_reason `cancelled`."""

    request_id: str


class HostControl(_Cmd, frozen=True, tag="control"):
    """A control operation; answered by one `HostControlReply` with the same `op_id`."""

    op_id: int
    op: ControlOp
    args: dict[str, Any] = {}


class HostShutdown(_Cmd, frozen=True, tag="shutdown"):
    """Stop the engine and exit."""


HostCommand = HostGenerate | HostEmbed | HostAbort | HostControl | HostShutdown


class _Out(msgspec.Struct, frozen=True, tag_field="kind", tag=str.lower):
    pass


class HostChunk(_Out, frozen=True, tag="chunk"):
    """A delta of one request's output. The last one has `finish_reason`."""

    request_id: str
    token_ids: list[int] = []
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    usage: Usage | None = None
    error_code: str = ""
    error_message: str = ""
    error_field: str = ""  # the request's dotted path at fault (GenerateRequest's names)
    logprobs: list[TokenLogprob] | None = None
    embeddings: list[list[float]] | None = None  # the answer to a HostEmbed


class HostControlReply(_Out, frozen=True, tag="control_reply"):
    """The answer to `HostControl(op_id)`."""

    op_id: int
    ok: bool
    message: str = ""
    data: dict[str, Any] = {}


class HostChunks(_Out, frozen=True, tag="chunks"):
    """Several chunks in one message (a scheduler step's worth): fewer hops per token."""

    chunks: list[HostChunk]


HostOutput = HostChunk | HostChunks | HostControlReply


class EngineInfo(msgspec.Struct, frozen=True):
    """What the host reports about its engine (answer to the `info` control op)."""

    backend: str  # sim | sglang
    model_name: str
    context_length: int
    page_size: int
    total_kv_blocks: int  # pages
    max_batch_size: int
    dp_size: int
    kv_event_endpoints: list[str]  # per DP rank, SGLang's ZMQ PUB (tcp://host:port)
    kv_event_topic: str
    metrics_endpoints: list[str]  # per DP rank, SGLang's scheduler metrics PUSH target (ipc://)
    eos_token_ids: list[int] = []
    version: str = ""
    prometheus_dir: str = ""  # SGLang's multiprocess metrics directory, if any
    kv_replay_endpoints: list[str] = []  # per DP rank, the publisher's replay ROUTER, if any
    tokenizer: str = ""  # a local model directory, or "sim-bytes" (see ModelCard.tokenizer)
    # the model's tool-call and reasoning parsers (SGLang's names), for its card's
    # runtime_config: tool_call_parser, reasoning_parser, force_reasoning
    parsers: dict[str, Any] = {}
    # False on a follower node of a multi-node SGLang engine: its ranks take requests only
    # through the leader, so the node sends it no canary (its health is its processes')
    accepts_requests: bool = True


class PeerHello(msgspec.Struct, frozen=True):
    """Multi-node (sim): a follower's engine to the leader's, every ping interval."""

    node_rank: int
    instance_id: str
    ranks: list[int]  # the global DP ranks it runs


class PeerWelcome(msgspec.Struct, frozen=True):
    """The leader's answer to a follower's first hello: accepted, or why not."""

    ok: bool
    message: str = ""
