"""Our request, output and control vocabulary, mapped onto SGLang 0.5.23.

Everything that knows SGLang's field names, item shapes and reply types lives here (the
process plumbing in `sglang_children.py` is the other version-specific module), so an
upgrade touches this file: ServerArgs field names, the streaming mode switch, sampling
parameters, generate keywords, streamed items (`text`, `output_ids`, `meta_info`),
finish reasons, logprob tuples and the tokenizer manager's control calls.

SGLang is imported lazily, inside the functions that need it, so that this module can be
imported (and its pure functions tested) before the CPU preparation has run.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from messages.request import (
    BootstrapInfo,
    OutputOptions,
    SamplingOptions,
    StopConditions,
    TokenLogprob,
    Usage,
)

__all__ = [
    "STATE_KEYS",
    "STREAMING_FIELD",
    "Finish",
    "StreamDeltas",
    "closest_field",
    "detected_parsers",
    "eos_token_ids",
    "finish_of",
    "generate_kwargs",
    "kv_events_config",
    "max_running_requests",
    "plain",
    "refusal_field",
    "sampling_params",
    "scheduler_info",
    "server_args_fields",
    "token_ids_of",
    "unexpected_keyword",
    "usage_of",
]

# ServerArgs' switch for delta streaming (0.5.23: `incremental_streaming_output`; without
# it items are cumulative and `StreamDeltas` slices them).
STREAMING_FIELD = "incremental_streaming_output"
# The per-DP-rank limit of running requests in get_internal_state()'s answer.
_MAX_RUNNING_KEY = "effective_max_running_requests_per_dp"
# The runtime part of get_internal_state()'s answer (the rest repeats the ServerArgs).
STATE_KEYS = (
    _MAX_RUNNING_KEY,
    "last_gen_throughput",
    "memory_usage",
    "startup_time",
    "world_size",
)


@functools.cache
def server_args_fields() -> frozenset[str]:
    """The field names of SGLang's ServerArgs (a msgspec Struct in 0.5.23; a dataclass
    before). Imports `sglang.srt.server_args` (~5 s, torch included), no engine."""
    from sglang.srt.server_args import ServerArgs

    try:
        import msgspec

        return frozenset(f.name for f in msgspec.structs.fields(ServerArgs))
    except TypeError:  # a dataclass (older SGLang)
        import dataclasses

        return frozenset(f.name for f in dataclasses.fields(ServerArgs))


def closest_field(name: str) -> str | None:
    """The ServerArgs field most like `name`, for "did you mean" hints."""
    matches = difflib.get_close_matches(name, sorted(server_args_fields()), n=1, cutoff=0.75)
    return matches[0] if matches else None


def unexpected_keyword(exc: TypeError) -> str | None:
    """The keyword ServerArgs(**kwargs) refused ("Unexpected keyword argument 'x'" from
    msgspec, "unexpected keyword argument 'x'" from a dataclass), or None."""
    match = re.search(r"nexpected keyword argument '([^']+)'", str(exc))
    return match[1] if match else None


def kv_events_config(port: int, topic: str, replay_port: int | None) -> str:
    """SGLang's `kv_events_config` JSON: a ZMQ PUB bound on 127.0.0.1:port (rank r on
    port + r), with a replay ROUTER on replay_port (+ r) when given."""
    config: dict[str, Any] = {
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{port}",
        "topic": topic,
        "bind": True,
    }
    if replay_port is not None:
        config["replay_endpoint"] = f"tcp://127.0.0.1:{replay_port}"
    return json.dumps(config)


_SAMPLING_NAMES = (
    # (ours, SGLang's sampling_params key)
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("repetition_penalty", "repetition_penalty"),
    ("seed", "sampling_seed"),  # honoured only with enable_deterministic_inference
    ("json_schema", "json_schema"),
    ("regex", "regex"),
)


def sampling_params(
    sampling: SamplingOptions, stop: StopConditions, output: OutputOptions
) -> dict[str, Any]:
    """SGLang's `sampling_params` dict; unset options are left to SGLang's defaults."""
    params: dict[str, Any] = {
        "max_new_tokens": stop.max_tokens,
        "skip_special_tokens": output.skip_special_tokens,
    }
    if stop.min_tokens:
        params["min_new_tokens"] = stop.min_tokens
    if stop.stop:
        params["stop"] = list(stop.stop)
    if stop.stop_token_ids:
        params["stop_token_ids"] = list(stop.stop_token_ids)
    if stop.ignore_eos:
        params["ignore_eos"] = True
    for ours, theirs in _SAMPLING_NAMES:
        value = getattr(sampling, ours)
        if value is not None:
            params[theirs] = value
    return params


def generate_kwargs(
    rid: str,
    output: OutputOptions,
    dp_rank: int | None,
    priority: int | None,
    bootstrap: BootstrapInfo | None = None,
    lora: str = "",
) -> dict[str, Any]:
    """Keywords of `Engine.async_generate` besides the input and sampling params."""
    kwargs: dict[str, Any] = {"rid": rid, "stream": True}
    if lora:
        kwargs["lora_path"] = lora  # SGLang takes a loaded adapter's name here
    if bootstrap is not None:  # disaggregated prefill/decode
        kwargs["bootstrap_host"] = bootstrap.host
        kwargs["bootstrap_port"] = bootstrap.port
        kwargs["bootstrap_room"] = bootstrap.room
    if output.logprobs is not None:
        kwargs["return_logprob"] = True
        kwargs["top_logprobs_num"] = output.logprobs
    if dp_rank is not None:
        kwargs["routed_dp_rank"] = dp_rank  # `data_parallel_rank` is its deprecated alias
    if priority is not None:
        kwargs["priority"] = priority
    return kwargs


def token_ids_of(encoded: Any) -> list[int]:
    """Token ids from a tokenizer result: a list, or a mapping with `input_ids` (what
    `apply_chat_template(tokenize=True)` returns in transformers 5)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


@dataclass
class _Delta:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None


class StreamDeltas:
    """Turns one request's streamed items into deltas, whichever mode SGLang streams in:
    incremental (each item is a delta, coalesced if several queued up) or cumulative (each
    item holds everything so far; `output_ids` may even be SGLang's live list)."""

    def __init__(self, incremental: bool, logprobs: bool) -> None:
        self.incremental = incremental
        self.logprobs = logprobs
        self.completion_tokens = 0  # delivered so far
        self.cached_tokens = 0
        self.prompt_tokens: int | None = None
        self._text_sent = 0
        self._logprobs_sent = 0

    def next(self, item: Mapping[str, Any]) -> _Delta:
        """The delta carried by `item`."""
        meta = item.get("meta_info", {})
        ids = [int(t) for t in item.get("output_ids") or ()]
        text = item.get("text") or ""
        if not self.incremental:
            ids = ids[self.completion_tokens :]
            text, self._text_sent = text[self._text_sent :], len(text)
        self.completion_tokens += len(ids)
        self.cached_tokens = int(meta.get("cached_tokens") or self.cached_tokens)
        if meta.get("prompt_tokens") is not None:
            self.prompt_tokens = int(meta["prompt_tokens"])
        return _Delta(ids, text, self._logprobs(meta) if self.logprobs else None)

    def _logprobs(self, meta: Mapping[str, Any]) -> list[TokenLogprob]:
        chosen: Sequence[Any] = meta.get("output_token_logprobs") or ()
        tops: Sequence[Any] = meta.get("output_top_logprobs") or ()
        if not self.incremental:
            chosen, tops = chosen[self._logprobs_sent :], tops[self._logprobs_sent :]
            self._logprobs_sent += len(chosen)
        out = []
        for i, (logprob, token_id, *_text) in enumerate(chosen):
            top = tops[i] if i < len(tops) and tops[i] else ()
            out.append(
                TokenLogprob(
                    token_id=int(token_id),
                    logprob=float(logprob),
                    top=[(int(t), float(lp)) for lp, t, *_ in top],
                )
            )
        return out


@dataclass(frozen=True)
class Finish:
    """How a stream ended, in our terms."""

    reason: str  # stop | length | cancelled | error
    error_code: str = ""
    message: str = ""


def finish_of(meta: Mapping[str, Any]) -> Finish | None:
    """Our finish reason for an item's `meta_info` (None while the stream goes on).

    0.5.23: `{"type": "stop"|"length"|"abort", ...}`; an abort carries `message` and a
    `status_code` (None when a user or `abort_all` aborted it, 4xx/5xx when SGLang refused
    the request). Older versions sent a bare string.
    """
    raw = meta.get("finish_reason")
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, Mapping) else str(raw)
    if kind in ("stop", "length"):
        return Finish(kind)
    message = str(raw.get("message") or "") if isinstance(raw, Mapping) else ""
    status = raw.get("status_code") if isinstance(raw, Mapping) else None
    if kind == "abort" and status is None:
        return Finish("cancelled", message=message or "aborted by the engine")
    if kind == "abort" and status == 400:
        return Finish("error", "invalid_request", message or "the engine refused the request")
    return Finish("error", "engine_error", message or f"the engine ended the request: {raw!r}")


def detected_parsers(tokenizer: Any, engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The tool-call and reasoning parsers of the served model, for its card's
    `runtime_config` (frontends use them): those set in `engine.sglang`, else what SGLang's
    own rules detect from the chat template (`sglang.srt.parser.template_detection`), and
    whether the template opens the reasoning itself (`force_reasoning`: the output then
    lacks the start tag). Names absent: the model has no such parser."""
    from sglang.srt.parser.template_detection import (
        detect_reasoning_parser,
        detect_reasoning_pattern,
        detect_tool_call_parser,
    )

    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else None
    try:  # how the template toggles reasoning: some rules below depend on it
        always, toggle = detect_reasoning_pattern(template)
    except Exception:  # noqa: BLE001 - detection is a hint, never a start failure
        always, toggle = False, None
    found: dict[str, Any] = {}
    for key, detect in (
        ("tool_call_parser", detect_tool_call_parser),
        ("reasoning_parser", detect_reasoning_parser),
    ):
        given = engine_kwargs.get(key)
        if isinstance(given, str) and given and given != "auto":
            found[key] = given
            continue
        try:
            name = detect(template, tokenizer, toggle, always)
        except Exception:  # noqa: BLE001 - as above
            name = None
        if name:
            found[key] = str(name)
    if "reasoning_parser" in found:
        found["force_reasoning"] = bool(always)
    return found


# SGLang's refusals (a ValueError from its request validation, or an abort with status
# 400) name no field; these are the ones whose message says which of ours is at fault.
_REFUSAL_FIELDS: tuple[tuple[str, str], ...] = (
    ("routed_dp_rank=", "dp_rank"),
    ("Requested token count exceeds", "stop.max_tokens"),
    ("Failed to compile json grammar", "sampling.json_schema"),
    ("Failed to compile regex grammar", "sampling.regex"),
    ("is longer than the model's context length", ""),  # the prompt: the caller's field
)


def refusal_field(message: str, prompt_field: str) -> str:
    """The field (dotted path of our GenerateRequest) an SGLang refusal is about, from its
    message ('' when it does not say); `prompt_field` names the request's input form."""
    for marker, field in _REFUSAL_FIELDS:
        if marker in message:
            return field or prompt_field
    return ""


def usage_of(deltas: StreamDeltas, meta: Mapping[str, Any], prompt_len: int) -> Usage:
    """Token counts at the end of a stream (SGLang's counts are cumulative totals)."""
    completion = meta.get("completion_tokens")
    return Usage(
        prompt_tokens=int(meta.get("prompt_tokens") or deltas.prompt_tokens or prompt_len),
        completion_tokens=int(completion if completion is not None else deltas.completion_tokens),
        cached_tokens=int(meta.get("cached_tokens") or deltas.cached_tokens),
    )


def plain(value: Any) -> Any:
    """`value` as msgpack can carry it: SGLang's states hold numpy scalars (a float64 is a
    `float` subclass that msgspec refuses), made Python; unknown objects become strings."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    return plain(item()) if callable(item) else str(value)


def eos_token_ids(tokenizer_manager: Any) -> list[int]:
    """The model's end-of-sequence ids (config's and tokenizer's)."""
    ids: set[int] = set()
    config_ids = getattr(tokenizer_manager.model_config, "hf_eos_token_id", None) or ()
    ids.update(int(t) for t in ([config_ids] if isinstance(config_ids, int) else config_ids))
    tokenizer_id = getattr(tokenizer_manager.tokenizer, "eos_token_id", None)
    if tokenizer_id is not None:
        ids.add(int(tokenizer_id))
    return sorted(ids)


def scheduler_info(engine: Any) -> Mapping[str, Any]:
    """What the (first) scheduler reported when it became ready: `max_total_num_tokens`
    (the KV pool, in tokens), `max_req_input_len`, startup times."""
    infos = engine._scheduler_init_result.scheduler_infos
    return infos[0] if infos else {}


def max_running_requests(internal_states: Sequence[Mapping[str, Any]], configured: Any) -> int:
    """The per-rank batch limit the schedulers use (configured, else what they chose)."""
    if configured:
        return int(configured)
    for state in internal_states:
        if state.get(_MAX_RUNNING_KEY):
            return int(state[_MAX_RUNNING_KEY])
    return 0


# --- control calls (coroutines on the engine's loop) -----------------------------------


async def flush_cache(tokenizer_manager: Any) -> tuple[bool, str]:
    """Empty the prefix cache (SGLang refuses unless fully idle)."""
    result = await tokenizer_manager.flush_cache()
    message = result.message or ("" if result.success else "the engine is not idle")
    return bool(result.success), message


async def internal_states(tokenizer_manager: Any) -> list[dict[str, Any]]:
    """Each DP rank's scheduler state (a round trip to the schedulers): the resolved
    ServerArgs plus the runtime keys in `STATE_KEYS`."""
    return list(await tokenizer_manager.get_internal_state())


async def update_weights(
    tokenizer_manager: Any, model_path: str, load_format: str | None
) -> tuple[bool, str, dict[str, Any]]:
    """Load new weights from a local model directory (waits for in-flight requests)."""
    from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

    request = UpdateWeightFromDiskReqInput(model_path=model_path, load_format=load_format)
    success, message, *rest = await tokenizer_manager.update_weights_from_disk(request, None)
    return bool(success), str(message), {"paused_requests": int(rest[0]) if rest else 0}


PROFILE_ARGS = frozenset(
    {"output_dir", "start_step", "num_steps", "activities", "with_stack", "record_shapes"}
)


async def start_profile(tokenizer_manager: Any, args: Mapping[str, Any]) -> str:
    """Start SGLang's torch profiler in the schedulers; raises RuntimeError on refusal."""
    from sglang.srt.managers.io_struct import ProfileReq

    result = await tokenizer_manager.start_profile(ProfileReq(**dict(args)))
    return str(getattr(result, "message", "") or "profiling")


async def stop_profile(tokenizer_manager: Any) -> str:
    """Stop the profiler and write its traces; raises RuntimeError on refusal."""
    result = await tokenizer_manager.stop_profile()
    return str(getattr(result, "message", "") or "profile written")


async def release_memory(tokenizer_manager: Any, tags: list[str] | None, resume: bool) -> None:
    """Release (or resume) the memory regions named by `tags` (all when None)."""
    from sglang.srt.managers.io_struct import (
        ReleaseMemoryOccupationReqInput,
        ResumeMemoryOccupationReqInput,
    )

    if resume:
        await tokenizer_manager.resume_memory_occupation(
            ResumeMemoryOccupationReqInput(tags=tags), None
        )
    else:
        await tokenizer_manager.release_memory_occupation(
            ReleaseMemoryOccupationReqInput(tags=tags), None
        )
