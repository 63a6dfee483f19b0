"""What an engine backend provides to the host process (sim and sglang both do)."""

from __future__ import annotations

from typing import Any, Protocol

from messages.engine import EngineInfo, HostEmbed, HostGenerate

__all__ = ["Backend"]


class Backend(Protocol):
    """An engine inside the host. `submit`, `abort` and `control` are called from the
    host's command thread and must be thread-safe; outputs go through the emit callback
    the backend was built with."""

    def start(self) -> None:
        """Load and start the engine (on the host's main thread)."""

    def serve(self) -> None:
        """Run on the main thread until `close` is called (a backend with an event loop
        runs it here; others just wait)."""

    def info(self) -> EngineInfo:
        """Facts about the engine for registration and the relays."""

    def submit(self, cmd: HostGenerate) -> None:
        """Start a streaming generation."""

    def embed(self, cmd: HostEmbed) -> None:
        """Embed; the answer is one chunk with `embeddings` (or an error chunk)."""

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends `cancelled`."""

    def control(self, op: str, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """A control operation: (ok, message, data)."""

    def close(self) -> None:
        """Stop the engine; `serve` returns."""
