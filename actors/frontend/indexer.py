"""`KvIndexer`: what each (instance, DP rank) holds in its prefix cache, and how loaded it is.

Built from the event plane: `KvEventBatch`es on `{ns}.{component}.kv_events` and
`LoadMetrics` on `{ns}.{component}.load_metrics`. Block hashes are SGLang's chained page
hashes, so a page's hash names its whole prefix: a plain set per rank answers "how many
leading pages of this prompt are cached" exactly as a radix tree would.

- `BlockStored` adds its hashes, `BlockRemoved` removes them, `AllBlocksCleared` (and
  every batch with a `resync`) empties the rank's set first. A resync that names the
  sequence of the batch after it (`Resync.next_seq`) restarts the count there, so a batch
  lost right after a resync is a gap like any other.
- A sequence gap (a batch lost on the way, or a relay's `KvHead` newer than the last batch
  applied: the end of a burst lost) is counted; a batch past 0, or any head, of a rank the
  index knows nothing of (it started late, or forgot the instance while it was away) says
  the same of what came before; a batch not newer than one applied (out of order) is not
  applied; in each case the rank's view is asked for again. The view
  stays usable meanwhile (a missed store under-estimates, a missed removal over-estimates
  until the next resync).
- A prompt routed to a rank is *predicted* there for `PREDICTION_TTL` seconds: its blocks
  count as cached on that rank until its own KV events arrive (after its prefill), so a
  burst of requests sharing a prefix follows the first one instead of scattering.

Pure state, no I/O: the frontend's event loop feeds it and asks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from messages.kv import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from messages.metrics import LoadMetrics

__all__ = ["KvIndexer", "RankKey"]

RankKey = tuple[str, int]  # (instance_id, dp_rank)
PREDICTION_TTL = 10.0  # seconds a routed prompt's blocks count as cached before its events
_ANY_NEXT = -2  # a rank's last seq after a resync that named no successor: any batch follows


class KvIndexer:
    """Cached blocks and load per (instance, DP rank); see the module docstring."""

    def __init__(self) -> None:
        self._blocks: dict[RankKey, set[int]] = {}
        self._seq: dict[RankKey, int] = {}
        self._load: dict[RankKey, LoadMetrics] = {}
        self._predicted: dict[RankKey, dict[int, float]] = {}  # block → until when
        self._heard: dict[str, float] = {}  # instance → when its last event or metric came
        self.gaps = 0

    # --- updates ----------------------------------------------------------------------------

    def apply(self, batch: KvEventBatch, now: float) -> str:
        """Apply one batch; returns its outcome: `applied`, `resync`, `gap` (batches of the
        rank were lost on the way), `joined` (the first batch, past 0, of a rank the index
        knew nothing of) or `stale` (not newer than one applied: not applied). After a
        gap, a join or a stale batch the rank's view is to be asked for."""
        key = (batch.instance_id, batch.dp_rank)
        self._heard[batch.instance_id] = now
        blocks = self._blocks.setdefault(key, set())
        outcome = "applied"
        if batch.resync is not None:
            blocks.clear()
            self._predicted.pop(key, None)
            # what follows it is counted from there (an old relay does not say: from the
            # next batch, whatever its number)
            next_seq = batch.resync.next_seq
            self._seq[key] = _ANY_NEXT if next_seq is None else next_seq - 1
            outcome = "resync"
        elif batch.seq >= 0:
            last = self._seq.get(key)
            if last is None and batch.seq > 0:
                # nothing known of the rank (this index started after the relay, or forgot
                # the instance while it was away): what came before never reached the view
                outcome = "joined"
            elif last is not None and last != _ANY_NEXT and batch.seq > last + 1:
                self.gaps += 1
                outcome = "gap"
            elif last is not None and last != _ANY_NEXT and batch.seq <= last:
                # older than a batch applied already: delivered out of order (the relay's
                # NATS connection moved to another server of a cluster while the old one
                # still held its batches), or the first of a restarted engine whose resync
                # was lost. Applied now it could undo what came after it (a removal after
                # the store that followed it): the rank's view is asked for instead.
                return "stale"
        if batch.seq >= 0:
            self._seq[key] = max(batch.seq, self._seq.get(key, -1))
        for event in batch.events:
            match event:
                case BlockStored(block_hashes=hashes):
                    blocks.update(hashes)
                case BlockRemoved(block_hashes=hashes):
                    blocks.difference_update(hashes)
                    predicted = self._predicted.get(key, {})
                    for block in hashes:
                        predicted.pop(block, None)
                case AllBlocksCleared():
                    blocks.clear()
                    self._predicted.pop(key, None)
        return outcome

    def behind(self, key: RankKey, seq: int) -> bool:
        """Whether the rank's relay published batch `seq` and it did not reach the view (a
        `KvHead` newer than the last batch applied, counted as a gap; or any head of a rank
        the view knows no batch of)."""
        last = self._seq.get(key)
        if seq < 0 or last == _ANY_NEXT or (last is not None and seq <= last):
            return False
        if last is None:
            return True
        self.gaps += 1
        return True

    def predict(self, instance_id: str, dp_rank: int, hashes: Sequence[int], now: float) -> None:
        """Count a just-routed prompt's blocks as cached on the rank for a while."""
        if not hashes:
            return
        predicted = self._predicted.setdefault((instance_id, dp_rank), {})
        until = now + PREDICTION_TTL
        for block in hashes:
            predicted[block] = until

    def expire(self, now: float) -> None:
        """Drop predictions whose time ran out."""
        for key in list(self._predicted):
            live = {b: t for b, t in self._predicted[key].items() if t > now}
            if live:
                self._predicted[key] = live
            else:
                del self._predicted[key]

    def apply_metrics(self, metrics: LoadMetrics, now: float) -> None:
        """Record a rank's latest load sample."""
        self._load[(metrics.instance_id, metrics.dp_rank)] = metrics
        self._heard[metrics.instance_id] = now

    def forget(self, instance_id: str) -> None:
        """Drop everything known about an instance (it left discovery for good)."""
        for table in (self._blocks, self._seq, self._load, self._predicted):
            for key in [k for k in table if k[0] == instance_id]:
                del table[key]
        self._heard.pop(instance_id, None)

    def prune(self, live: Iterable[str], now: float, grace: float) -> list[str]:
        """Forget instances not in `live` that were not heard from for `grace` seconds
        (events may come before the instance registers: they are kept that long)."""
        keep = set(live)
        gone = [i for i, t in self._heard.items() if i not in keep and now - t > grace]
        for instance_id in gone:
            self.forget(instance_id)
        return gone

    # --- questions --------------------------------------------------------------------------

    def matched_blocks(
        self, instance_id: str, dp_rank: int, hashes: Sequence[int], now: float
    ) -> int:
        """How many leading blocks of a prompt (its page hashes) the rank holds, or is
        about to hold (predicted)."""
        key = (instance_id, dp_rank)
        blocks = self._blocks.get(key, set())
        predicted = self._predicted.get(key, {})
        matched = 0
        for block in hashes:
            if block not in blocks and predicted.get(block, 0.0) <= now:
                break
            matched += 1
        return matched

    def load(self, instance_id: str, dp_rank: int) -> int:
        """Requests running plus waiting on the rank, per its last load sample (0 if none)."""
        sample = self._load.get((instance_id, dp_rank))
        if sample is None:
            return 0
        return sample.request_active_slots + sample.num_requests_waiting

    def heard_at(self, instance_id: str) -> float | None:
        """When the instance's last KV event or load sample arrived (loop time), if ever."""
        return self._heard.get(instance_id)

    def block_counts(self) -> dict[RankKey, int]:
        """Blocks indexed per rank (for the metrics)."""
        return {key: len(blocks) for key, blocks in self._blocks.items()}
