"""What an attempt's chunks mean for failover and migration, the progress a stream carries
from one attempt to the next, and the prefill half of a disaggregated pair."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from actors.frontend.errors import FrontendError, from_node_error
from messages.request import (
    ERROR_CODES,
    Continuation,
    ErrorCode,
    GenerateRequest,
    StreamChunk,
    Usage,
    error_chunk,
)

__all__ = ["PrefillOutcome", "Progress", "Retry", "follow_prefill", "retry_of"]


class Retry(Exception):
    """This attempt failed: another instance should try, from the start before any token,
    as a continuation after (`reason` is a metrics label; `error` is what the client gets
    if no other instance can; `final`, the chunk that ends its stream then, if the node
    sent one)."""

    def __init__(
        self, instance_id: str, reason: str, error: FrontendError, final: StreamChunk | None = None
    ) -> None:
        super().__init__(error.message)
        self.instance_id = instance_id
        self.reason = reason
        self.error = error
        self.final = final

    def ending(self, request_id: str, index: int) -> StreamChunk:
        """The chunk that ends the client's stream at `index` when it cannot go on."""
        if self.final is not None:
            return msgspec.structs.replace(self.final, request_id=request_id, index=index)
        code = self.error.code
        known: ErrorCode = code if code in ERROR_CODES else "internal"
        return error_chunk(request_id, index, known, self.error.message)


@dataclass
class Progress:
    """What the client of one request has received so far, over all its attempts: a
    continuation sends it on, so the next instance generates only the rest."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    next_index: int = 0
    migrations: int = 0  # seams so far, the nodes' own included (from the chunks)
    cached_tokens: int = 0

    @property
    def started(self) -> bool:
        """True once the client has a chunk: the request can only continue, not restart."""
        return self.next_index > 0

    def saw(self, chunk: StreamChunk) -> None:
        """Record a chunk as it goes to the client."""
        self.token_ids.extend(chunk.token_ids)
        self.next_index = chunk.index + 1
        self.migrations = max(self.migrations, chunk.migrations)
        if chunk.usage is not None:
            self.cached_tokens = chunk.usage.cached_tokens

    def attempt(self, request: GenerateRequest, request_id: str) -> GenerateRequest:
        """The request for the next attempt: itself before any chunk, else a continuation
        from what the client has."""
        if not self.started:
            return msgspec.structs.replace(request, request_id=request_id)
        continuation = Continuation(
            token_ids=list(self.token_ids),
            next_index=self.next_index,
            migrations=self.migrations + 1,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
        )
        return msgspec.structs.replace(request, request_id=request_id, continuation=continuation)


def retry_of(chunk: StreamChunk, instance_id: str) -> Retry | None:
    """A `Retry` if `chunk` ends its stream in a way another instance may not (a retryable
    error: overloaded, engine restarting, not ready; or the node stopping)."""
    if chunk.finish_reason == "shutdown":
        why = f"instance {instance_id} is stopping"
        return Retry(instance_id, "shutdown", FrontendError.of_code("not_ready", why), chunk)
    error = chunk.error
    if chunk.finish_reason == "error" and error is not None and error.retryable:
        node_error = from_node_error(error, f" (instance {instance_id})")
        return Retry(instance_id, error.code, node_error, chunk)
    return None


@dataclass
class PrefillOutcome:
    """How the prefill half of a disaggregated pair went (filled in as it goes)."""

    usage: Usage | None = None
    failure: Exception | None = None  # a Retry, or a FrontendError for the client

    def failed(self) -> Exception | None:
        """The failure, if the prefill failed (the decode half checks this while it waits)."""
        return self.failure


async def follow_prefill(
    stream: AsyncIterator[StreamChunk], instance_id: str, outcome: PrefillOutcome
) -> None:
    """Consume the prefill stream, recording its usage or its failure in `outcome`."""
    try:
        async for chunk in stream:
            if chunk.finish_reason == "error":
                error = from_node_error(chunk.error, f" (prefill instance {instance_id})")
                retryable = chunk.error is not None and chunk.error.retryable
                outcome.failure = (
                    Retry(instance_id, "prefill_failed", error) if retryable else error
                )
            elif chunk.finish_reason is not None and chunk.finish_reason not in ("stop", "length"):
                why = f"the prefill ended: {chunk.finish_reason} (prefill instance {instance_id})"
                outcome.failure = Retry(
                    instance_id, "prefill_failed", FrontendError.of_code("not_ready", why)
                )
            if chunk.usage is not None:
                outcome.usage = chunk.usage
    except (Retry, FrontendError) as exc:
        outcome.failure = exc
    except Exception as exc:  # noqa: BLE001 - recorded: the decode half reports it
        why = f"prefill failed: {type(exc).__name__}: {exc}"
        outcome.failure = FrontendError.of_code("internal", why)
