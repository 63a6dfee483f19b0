"""Engine health: the canary and stall decisions, the other half of the EngineActor's core.

While the engine is idle for `canary_after_idle` seconds, a one-token canary request is
sent; a canary that fails, or gets no answer within `canary_timeout`, counts as a failure;
`failures_before_unhealthy` failures in a row make the engine unhealthy (the actor then
crashes and its supervisor restarts the engine). While requests run, one without progress
for `stall_timeout` seconds means the engine is stuck. Fault injection can make the next
canaries fail. No I/O and no clock: every decision takes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.config import HealthSection

__all__ = ["CanaryFailed", "CanaryOk", "Health", "SendCanary", "Unhealthy"]


@dataclass(frozen=True)
class SendCanary:
    """Send a canary now (and remember when)."""


@dataclass(frozen=True)
class CanaryOk:
    """A canary succeeded; `after_failures` failed ones came before it."""

    after_failures: int


@dataclass(frozen=True)
class CanaryFailed:
    """A canary failed or timed out: count and log it, abort `abort` if set; `fatal`: that
    was one failure too many (the actor must crash); `again`: send another canary now
    (injected failures are still to come)."""

    why: str
    failures: int
    abort: str = ""  # the timed-out canary's request id
    fatal: bool = False
    again: bool = False


@dataclass(frozen=True)
class Unhealthy:
    """The engine is stuck: the actor must crash with `why`."""

    why: str


Decision = SendCanary | CanaryOk | CanaryFailed | Unhealthy | None


class Health:
    """The engine's health as the node sees it; see the module docstring."""

    def __init__(self, section: HealthSection, now: float) -> None:
        self.section = section
        self.last_activity = now
        self.canary: tuple[str, float] | None = None  # (request id, sent at)
        self.failures = 0
        self.detail = ""
        self.injected_failures = 0

    @property
    def healthy(self) -> bool:
        """Fewer failed canaries in a row than the limit."""
        return self.failures < self.section.failures_before_unhealthy

    def active(self, now: float) -> None:
        """The engine did something (a request entered, output came)."""
        self.last_activity = now

    def tick(self, now: float, stalled: int, busy: bool, canaries_wanted: bool) -> Decision:
        """The periodic check: `stalled` requests made no progress for the stall timeout,
        `busy` says requests are in flight; `canaries_wanted` is False for a follower of a
        multi-node engine (the leader's canaries cover it)."""
        if stalled:
            self.detail = f"{stalled} requests made no progress in {self.section.stall_timeout:g}s"
            return Unhealthy(f"engine stalled: {self.detail}")
        if self.canary is not None:
            request_id, sent = self.canary
            if now - sent <= self.section.canary_timeout:
                return None
            self.canary = None
            why = f"canary got no answer within {self.section.canary_timeout:g}s"
            return self._failed(why, abort=request_id)
        if (
            canaries_wanted
            and not busy
            and now - self.last_activity >= self.section.canary_after_idle
        ):
            return SendCanary()
        return None

    def canary_sent(self, request_id: str, now: float) -> None:
        """A canary went out."""
        self.canary = (request_id, now)

    def canary_ended(self, finish_reason: str, error_message: str = "") -> Decision:
        """The canary's last chunk came back."""
        self.canary = None
        if self.injected_failures > 0:
            self.injected_failures -= 1
            failed = self._failed("injected canary failure (fault injection)")
            again = self.injected_failures > 0 and not failed.fatal
            return CanaryFailed(failed.why, failed.failures, fatal=failed.fatal, again=again)
        if finish_reason in ("stop", "length"):
            after, self.failures, self.detail = self.failures, 0, ""
            return CanaryOk(after)
        return self._failed(f"canary ended {finish_reason}: {error_message}")

    def inject_failures(self, count: int) -> None:
        """Fault injection: the next `count` canaries fail."""
        self.injected_failures += count

    def _failed(self, why: str, abort: str = "") -> CanaryFailed:
        self.failures += 1
        self.detail = why
        return CanaryFailed(why, self.failures, abort, fatal=not self.healthy)
