"""The requests in flight on the Engine's loop: each one a task that tokenizes its input,
checks its length, streams SGLang's items out as `HostChunk`s and ends with exactly one
terminal chunk, whatever happens (finish, refusal, abort, engine stop).

Requests get an internal rid (uuid4 hex: fixed length, because SGLang's scheduler aborts
every rid that *starts with* the one given). Abort cancels the request's task: SGLang's
generator then aborts the request in the scheduler if it got there, or drops it if not,
so an abort can never overtake its request. Everything here runs on the loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import structlog

from actors.engine_host import sglang_compat as compat
from actors.engine_host.guided_rest import CannotContinue, rest_grammar
from messages.engine import HostChunk, HostGenerate
from messages.request import Usage

__all__ = ["STOPPING", "EngineFacts", "Requests"]

STOPPING = "the engine host is stopping; retry"


@dataclass(frozen=True)
class EngineFacts:
    """What the engine reported once started."""

    model_name: str
    context_length: int
    max_prompt_tokens: int
    kv_tokens: int  # the KV pool of one DP rank, in tokens
    max_batch_size: int
    eos_token_ids: list[int]
    version: str
    incremental: bool  # SGLang streams deltas (else cumulative items)
    # the model's tool-call / reasoning parsers, for its card (sglang_compat.detected_parsers)
    parsers: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Request:
    cmd: HostGenerate
    rid: str
    task: asyncio.Task[None] | None = None
    cancelled: bool = False  # aborted by the client
    prompt_len: int = 0
    deltas: compat.StreamDeltas | None = None
    seam: _Seam | None = None  # a continuation's stop strings that may straddle its start


@dataclass
class _Seam:
    """A continuation with stop strings: SGLang matches them in the new text only, so one
    that began in the text before the seam (`before`, its end) is matched here, in the new
    text's first characters (`after`), until no stop string can straddle any more."""

    stops: list[str]
    before: str
    after: str = ""

    def straddles(self, text: str) -> bool:
        """Whether `text`, the next new text, completes a stop string begun before."""
        self.after += text
        joined = self.before + self.after
        return any(
            0
            <= (at := joined.find(stop, max(0, len(self.before) - len(stop) + 1)))
            < len(self.before)
            < at + len(stop)
            for stop in self.stops
        )

    @property
    def done(self) -> bool:
        """No stop string can straddle the seam any more."""
        return len(self.after) >= max(len(stop) for stop in self.stops)


def _refusal_field(cmd: HostGenerate, finish: compat.Finish | None) -> str:
    if finish is None or finish.error_code != "invalid_request":
        return ""
    return compat.refusal_field(finish.message, cmd.input_field())


class Requests:
    """The requests in flight (see the module docstring)."""

    def __init__(
        self,
        engine: Any,
        facts: EngineFacts,
        emit: Callable[[HostChunk], None],
        tokenizing: Executor,
    ) -> None:
        self.engine = engine
        self.facts = facts
        self.emit = emit
        self.tokenizing = tokenizing  # one thread: the tokenizer is not shared
        self.log = structlog.get_logger().bind(path="engine_host.sglang")
        self._inflight: dict[str, _Request] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def start(self, cmd: HostGenerate) -> None:
        """Start streaming `cmd`."""
        if cmd.request_id in self._inflight:
            msg = f"request_id {cmd.request_id!r} is already in flight"
            self.end(cmd.request_id, "invalid_request", msg, "request_id")
            return
        entry = self._inflight[cmd.request_id] = _Request(cmd, uuid.uuid4().hex)
        entry.task = asyncio.get_running_loop().create_task(self._generate(entry))
        entry.task.add_done_callback(functools.partial(self._finished, entry))

    def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ones are ignored); it ends `cancelled`."""
        entry = self._inflight.get(request_id)
        if entry is not None and entry.task is not None and not entry.task.done():
            entry.cancelled = True
            entry.task.cancel()

    def stop_all(self) -> list[asyncio.Task[None]]:
        """Cancel every request (each ends `engine_restarting`); their tasks, to await."""
        tasks = [entry.task for entry in self._inflight.values() if entry.task is not None]
        for task in tasks:
            task.cancel()
        return tasks

    def end(self, request_id: str, code: str, message: str, field: str = "") -> None:
        """The terminal chunk of a request that ends in error `code` (`field`: the
        request's dotted path at fault, if one is)."""
        self.emit(
            HostChunk(
                request_id,
                finish_reason="error",
                error_code=code,
                error_message=message,
                error_field=field,
            )
        )

    def _finished(self, entry: _Request, task: asyncio.Task[None]) -> None:
        request_id = entry.cmd.request_id
        self._inflight.pop(request_id, None)
        if not task.cancelled():
            if task.exception() is not None:  # a bug: _generate handles every error
                self.log.error("request failed", request_id=request_id, exc=task.exception())
                self.end(request_id, "engine_error", f"internal error: {task.exception()!r}")
            return
        if not entry.cancelled:
            self.end(request_id, "engine_restarting", STOPPING)
            return
        deltas = entry.deltas
        usage = Usage(
            prompt_tokens=entry.prompt_len,
            completion_tokens=deltas.completion_tokens if deltas else 0,
            cached_tokens=deltas.cached_tokens if deltas else 0,
        )
        self.emit(HostChunk(request_id, finish_reason="cancelled", usage=usage))

    async def _generate(self, entry: _Request) -> None:
        cmd = entry.cmd
        prompt_field = cmd.input_field()
        try:
            ids = await self._prompt_ids(cmd)
        except Exception as exc:  # noqa: BLE001 (a template or tokenizer error is the input's)
            why = f"cannot tokenize the input: {exc}"
            self.end(cmd.request_id, "invalid_request", why, prompt_field)
            return
        guided = cmd.sampling.json_schema is not None or cmd.sampling.regex is not None
        rest: str | None = None  # a continued guided stream's grammar for the rest
        if cmd.continuation_ids and guided:
            try:
                rest = await self._rest_grammar(cmd)
            except CannotContinue as exc:
                why = f"this stream under guided decoding cannot continue after its seam: {exc}"
                self.end(cmd.request_id, "engine_error", why)
                return
        ids += cmd.continuation_ids  # a continuation: the tokens generated before it
        entry.prompt_len = len(ids)
        if cmd.continuation_ids and cmd.stop.stop:
            entry.seam = await self._seam(cmd)
        problem = self._prompt_problem(len(ids), cmd.max_prompt_tokens)
        if problem is not None:
            self.end(cmd.request_id, "invalid_request", problem, prompt_field)
            return
        want_logprobs = cmd.output.logprobs is not None
        deltas = entry.deltas = compat.StreamDeltas(self.facts.incremental, want_logprobs)
        try:
            params = compat.sampling_params(cmd.sampling, cmd.stop, cmd.output)
            if rest is not None:  # the derivative of the constraint by what was streamed
                params.pop("json_schema", None)
                params.pop("regex", None)
                params["ebnf"] = rest
            stream = await self.engine.async_generate(
                input_ids=ids,
                sampling_params=params,
                **compat.generate_kwargs(
                    entry.rid, cmd.output, cmd.dp_rank, cmd.priority, cmd.bootstrap, cmd.lora
                ),
            )
            async for item in stream:
                if self._chunk(entry, item, len(ids)):
                    return
        except ValueError as exc:  # SGLang's request validation
            refused = deltas.completion_tokens == 0
            code = "invalid_request" if refused else "engine_error"
            field = compat.refusal_field(str(exc), prompt_field) if refused else ""
            self.end(cmd.request_id, code, str(exc), field)
            return
        except Exception as exc:
            self.log.exception("generate failed", request_id=cmd.request_id)
            self.end(cmd.request_id, "engine_error", f"{type(exc).__name__}: {exc}")
            return
        self.end(cmd.request_id, "engine_error", "the engine's stream ended without a finish")

    def _chunk(self, entry: _Request, item: Any, prompt_len: int) -> bool:
        """Emit one streamed item as a chunk; True for the last."""
        cmd, deltas = entry.cmd, entry.deltas
        assert deltas is not None
        delta = deltas.next(item)
        meta = item.get("meta_info") or {}
        finish = compat.finish_of(meta)
        seam = entry.seam
        if finish is None and seam is not None and not seam.done and seam.straddles(delta.text):
            # A stop string completed across the seam: the request ends here, as it would
            # have without the seam (its text is the stop string's: left out).
            entry.seam = None
            usage = compat.usage_of(deltas, meta, prompt_len)
            self.emit(HostChunk(cmd.request_id, delta.token_ids, finish_reason="stop", usage=usage))
            self.engine.tokenizer_manager.abort_request(rid=entry.rid)
            return True
        self.emit(
            HostChunk(
                cmd.request_id,
                token_ids=delta.token_ids,
                text=delta.text if cmd.output.text else "",
                logprobs=delta.logprobs,
                finish_reason=finish.reason if finish else None,
                usage=compat.usage_of(deltas, meta, prompt_len) if finish else None,
                error_code=finish.error_code if finish else "",
                error_message=finish.message if finish and finish.reason == "error" else "",
                error_field=_refusal_field(cmd, finish),
            )
        )
        return finish is not None

    async def _seam(self, cmd: HostGenerate) -> _Seam:
        """The text just before a continuation's seam, as long as a stop string can reach."""
        reach = max(len(stop) for stop in cmd.stop.stop)
        tokenizer = self.engine.tokenizer_manager.tokenizer
        tail = cmd.continuation_ids[-reach:]  # a token is at least one character
        decode = functools.partial(tokenizer.decode, tail, skip_special_tokens=True)
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self.tokenizing, decode)
        return _Seam(list(cmd.stop.stop), str(text)[-reach:])

    async def _rest_grammar(self, cmd: HostGenerate) -> str:
        """The constraint on what a continued guided stream may still generate (the text
        streamed before its seam, decoded, is the prefix); raises `CannotContinue`."""
        tokenizer = self.engine.tokenizer_manager.tokenizer
        ids = cmd.continuation_ids
        sampling = cmd.sampling

        def derive() -> str:
            prefix = str(tokenizer.decode(ids, skip_special_tokens=True))
            return rest_grammar(sampling.regex, sampling.json_schema, prefix)

        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, derive)

    async def _prompt_ids(self, cmd: HostGenerate) -> list[int]:
        if cmd.token_ids is not None:
            return list(cmd.token_ids)
        tokenizer = self.engine.tokenizer_manager.tokenizer
        if cmd.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in cmd.messages]
            encode = functools.partial(
                tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=True
            )
        elif cmd.prompt is not None:
            encode = functools.partial(tokenizer.encode, cmd.prompt)  # as SGLang tokenizes text
        else:
            msg = "give exactly one of token_ids, prompt, messages"
            raise ValueError(msg)
        loop = asyncio.get_running_loop()
        return compat.token_ids_of(await loop.run_in_executor(self.tokenizing, encode))

    def _prompt_problem(self, length: int, node_limit: int) -> str | None:
        limit = self.facts.max_prompt_tokens
        if length == 0:
            return "the prompt is empty"
        if 0 < node_limit < length:
            return (
                f"the prompt has {length} tokens, more than the node's limit of {node_limit} "
                f"(handlers.max_prompt_tokens)"
            )
        if length > limit:
            return (
                f"the prompt has {length} tokens, more than this engine accepts ({limit}; "
                f"context length {self.facts.context_length})"
            )
        return None
