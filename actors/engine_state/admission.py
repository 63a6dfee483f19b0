"""The in-flight table: which requests the engine runs, for whom, and which may enter.

Part of the EngineActor's pure core: admission (`overloaded` at `handlers.max_inflight`,
`too_many_streams` past `handlers.max_streams_per_client`, a duplicate id refused), the
route of each request's output (the handler that asked), its progress (for stall
detection) and what is left when the engine goes. No I/O, no clock, no lock: the actor
calls it under its own lock, with `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

from messages.request import ErrorCode

__all__ = ["Inflight", "InflightTable", "Refusal"]


@dataclass
class Inflight:
    """One request the engine runs."""

    reply_path: str  # the handler its output goes to
    submitted: float
    last_progress: float
    client_id: str = ""


@dataclass(frozen=True)
class Refusal:
    """Why a request may not enter now."""

    code: ErrorCode
    message: str


class InflightTable:
    """The engine's requests in flight; see the module docstring."""

    def __init__(self, max_inflight: int, max_streams_per_client: int = 0) -> None:
        self.max_inflight = max_inflight
        self.max_streams_per_client = max_streams_per_client
        self.entries: dict[str, Inflight] = {}
        self._per_client: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.entries

    def refusal(self, request_id: str, client: str) -> Refusal | None:
        """Why `request_id` cannot be admitted now, or None."""
        if request_id in self.entries:
            return Refusal("invalid_request", f"request_id {request_id!r} is already in flight")
        if len(self.entries) >= self.max_inflight:
            return Refusal(
                "overloaded",
                f"the node has {self.max_inflight} requests in flight (handlers.max_inflight)",
            )
        limit = self.max_streams_per_client
        if client and limit and self._per_client.get(client, 0) >= limit:
            return Refusal(
                "too_many_streams",
                f"client {client!r} has {limit} streams open (handlers.max_streams_per_client)",
            )
        return None

    def admit(self, request_id: str, client: str, reply_path: str, now: float) -> Refusal | None:
        """Enter a request, or say why not."""
        refusal = self.refusal(request_id, client)
        if refusal is None:
            self.entries[request_id] = Inflight(reply_path, now, now, client)
            if client:
                self._per_client[client] = self._per_client.get(client, 0) + 1
        return refusal

    def progress(self, request_id: str, now: float, finished: bool) -> Inflight | None:
        """Output came for `request_id`: its route (None for an unknown or ended one);
        a finished request leaves the table."""
        entry = self.entries.get(request_id)
        if entry is None:
            return None
        entry.last_progress = now
        if finished:
            self.forget(request_id)
        return entry

    def forget(self, request_id: str) -> Inflight | None:
        """Drop a request from the table (ended); returns its entry."""
        entry = self.entries.pop(request_id, None)
        if entry is not None and entry.client_id:
            left = self._per_client.get(entry.client_id, 1) - 1
            if left > 0:
                self._per_client[entry.client_id] = left
            else:
                self._per_client.pop(entry.client_id, None)
        return entry

    def stalled(self, now: float, stall_timeout: float) -> list[str]:
        """Requests without progress for longer than `stall_timeout`."""
        return [
            rid for rid, entry in self.entries.items() if now - entry.last_progress > stall_timeout
        ]

    def take_all(self) -> dict[str, Inflight]:
        """Empty the table (the engine is gone); returns what was in it."""
        entries, self.entries = self.entries, {}
        self._per_client.clear()
        return entries

    def streams_of(self, client: str) -> int:
        """Streams `client` has open."""
        return self._per_client.get(client, 0)
