"""The KV sequence tracker: the pure core of the KvRelayActor.

It follows one publisher's batch sequence numbers and says, for each batch, what the
relay must do: skip it (already published, e.g. it came again by replay), wait (a gap the
replay buffer may fill, while the relay reads on its event loop), fill a gap from the
replay buffer, publish a resync first (subscribers' views are stale: publishes were lost
while NATS was away, a gap could not be filled, or the publisher restarted), then publish
it. No I/O, no clock: the actor feeds it and carries the verdict out.
"""

from __future__ import annotations

from dataclasses import dataclass

from messages.kv import Resync

__all__ = ["SequenceTracker", "Verdict", "consecutive_from_zero"]

RECENT = 10_000  # sequence numbers remembered to skip batches already published


@dataclass(frozen=True)
class Verdict:
    """What to do with one batch, in order: the resync before anything (`lost`), the gap
    to fill by replay (`fill`, [start, end)), the resync after a restart (`restart`),
    then publish it. `skip`: do nothing; `wait`: hand it to blocking work first."""

    skip: bool = False
    wait: bool = False
    lost: Resync | None = None
    fill: tuple[int, int] | None = None
    restart: Resync | None = None


SKIP = Verdict(skip=True)
WAIT = Verdict(wait=True)


class SequenceTracker:
    """One DP rank's publisher, as the relay has seen it; see the module docstring."""

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.gaps = 0
        self._dropped_seen = 0
        # (seq, digest of the payload) of recent batches, in a ring indexed by seq
        self._recent: list[tuple[int, int] | None] = [None] * RECENT

    def start(self, dropped: int) -> Resync:
        """The relay starts: its subscribers must drop this rank's view (the resync it
        publishes first); `dropped` is the link's count of lost publishes so far."""
        self._dropped_seen = dropped
        return Resync(reason="relay_start")

    def check(
        self, seq: int, digest: int, dropped: int, can_replay: bool, blocking: bool
    ) -> Verdict:
        """The verdict for batch `seq` (`digest` identifies its payload); `dropped` is the
        link's count of publishes lost so far; a gap waits when `can_replay` and not
        `blocking`."""
        last = self.last_seq
        if last is not None and seq <= last and self._recent[seq % RECENT] == (seq, digest):
            return SKIP  # already published (it came by replay too)
        if not blocking and can_replay and last is not None and seq > last + 1:
            return WAIT
        lost = None
        if dropped != self._dropped_seen:
            # Publishes were lost while NATS was away: subscribers' views are stale.
            self._dropped_seen = dropped
            lost = Resync(reason="gap", gaps_total=self.gaps)
        if last is not None and seq > last + 1:
            self.gaps += 1
            return Verdict(lost=lost, fill=(last + 1, seq))
        if last is not None and seq <= last:
            restart = Resync(reason="publisher_restart", gaps_total=self.gaps)
            return Verdict(lost=lost, restart=restart)
        return Verdict(lost=lost)

    def take_lost(self, dropped: int) -> bool:
        """Whether the link lost publishes since the last look (`dropped` is its count so
        far): the subscribers' views miss them until a resync, which the caller makes."""
        lost = dropped != self._dropped_seen
        self._dropped_seen = dropped
        return lost

    def unfilled(self, start: int, end: int) -> Resync:
        """The replay buffer could not fill [start, end): the resync to publish."""
        return Resync(reason="gap", missed_batches=end - start, gaps_total=self.gaps)

    def published(self, seq: int, digest: int) -> None:
        """Batch `seq` went out."""
        self.last_seq = seq
        self._recent[seq % RECENT] = (seq, digest)


def consecutive_from_zero(seqs: list[int]) -> int:
    """How many of a replayed history's batches, from the first, are 0, 1, 2, ... without
    a hole (a history that does not start at 0 gives 0): a relay starting late publishes
    only those, so the view it rebuilds under-reports but never lies."""
    count = 0
    for expected, seq in enumerate(seqs):
        if seq != expected:
            break
        count += 1
    return count
