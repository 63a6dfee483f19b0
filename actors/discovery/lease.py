"""The lease state: the pure core of the RegistrarActor.

Whether the instance should be in discovery follows from three facts: the engine subtree
is up, the engine has not released its memory (admin), and the registrar is not stopping.
This core keeps those facts and the state of the record (written or not, failed writes in
a row) and says after each event what the actor must do: write the record, delete it, or
nothing. No I/O and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Action", "Lease"]

Action = Literal["write", "delete", "none"]


@dataclass
class Lease:
    """The instance's place in discovery; see the module docstring."""

    registered: bool = False
    engine_up: bool = True
    released: bool = False
    write_failures: int = 0
    adapters: set[str] = field(default_factory=set)

    @property
    def wanted(self) -> bool:
        """The instance should be listed now."""
        return self.engine_up and not self.released

    def heartbeat(self) -> Action:
        """The lease must be renewed while the record is written, and a write that failed
        (even the first: a replicated bucket just made has no leader yet) is tried again."""
        return "write" if self.registered or self.write_failures else "none"

    def engine_down(self) -> Action:
        """The engine subtree went down: withdraw (no traffic to an engine that is gone)."""
        self.engine_up = False
        return "delete"

    def engine_back(self) -> Action:
        """The engine subtree is ready again."""
        self.engine_up = True
        return "write" if self.wanted else "none"

    def memory_released(self) -> Action:
        """The engine released its memory (admin): it serves nothing until resumed."""
        self.released = True
        return "delete"

    def memory_resumed(self) -> Action:
        """The engine resumed its memory."""
        self.released = False
        return "write" if self.wanted else "none"

    def reconnected(self) -> Action:
        """NATS came back: the record (and the bucket) may be gone with the server."""
        return "write" if self.wanted else "none"

    def written(self) -> Literal["registered", "restored", "renewed"]:
        """A write succeeded: what it was, for the log."""
        outcome: Literal["registered", "restored", "renewed"] = (
            "registered"
            if not self.registered
            else ("restored" if self.write_failures else "renewed")
        )
        self.registered = True
        self.write_failures = 0
        return outcome

    def write_failed(self) -> int:
        """A write failed (retried at the next heartbeat); failures in a row so far."""
        self.write_failures += 1
        return self.write_failures

    def deleting(self) -> bool:
        """About to delete the record: whether there is one to delete."""
        was, self.registered = self.registered, False
        self.write_failures = 0  # nothing is wanted written any more
        return was
