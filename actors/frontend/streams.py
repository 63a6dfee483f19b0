"""What an attempt's chunks mean for failover, and the prefill half of a disaggregated pair."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from actors.frontend.errors import FrontendError, from_node_error
from messages.request import StreamChunk, Usage

__all__ = ["PrefillOutcome", "Retry", "follow_prefill", "retry_of"]


class Retry(Exception):
    """This attempt failed before any token: another instance should try (`reason` is a
    metrics label; `error` is what the client gets if no other instance can)."""

    def __init__(self, instance_id: str, reason: str, error: FrontendError) -> None:
        super().__init__(error.message)
        self.instance_id = instance_id
        self.reason = reason
        self.error = error


def retry_of(chunk: StreamChunk, instance_id: str) -> Retry | None:
    """A `Retry` if `chunk` ends its stream in a way another instance may not (a retryable
    error: overloaded, engine restarting, not ready; or the node stopping)."""
    if chunk.finish_reason == "shutdown":
        why = f"instance {instance_id} is stopping"
        return Retry(instance_id, "shutdown", FrontendError.of_code("not_ready", why))
    error = chunk.error
    if chunk.finish_reason == "error" and error is not None and error.retryable:
        return Retry(instance_id, error.code, from_node_error(error, f" (instance {instance_id})"))
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
