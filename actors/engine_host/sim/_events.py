"""The KV event recorder: SGLang's `KVCacheEventRecorder.enqueue` coalescing, exactly.

A BlockStored whose parent is the last hash of the previous BlockStored extends it (one
event, N hashes, N pages of token ids, `block_size` still the page size); consecutive
BlockRemoved merge too. Events wait here until the scheduler flushes them as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from messages.kv import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = ["MEDIUM", "EventLog"]

MEDIUM = "GPU"  # SGLang's StorageMedium.GPU: the device tier, whatever the device


@dataclass
class _Stored:
    hashes: list[int]
    parent: int | None
    tokens: list[int]


@dataclass
class _Removed:
    hashes: list[int] = field(default_factory=list)


class _Cleared:
    pass


class EventLog:
    """Pending KV events of one cache, coalesced as SGLang does."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._queue: list[_Stored | _Removed | _Cleared] = []

    def stored(self, block_id: int, parent: int | None, tokens: Sequence[int]) -> None:
        """One page entered the cache, chained on `parent` (None under the root)."""
        tail = self._queue[-1] if self._queue else None
        if isinstance(tail, _Stored) and parent is not None and parent == tail.hashes[-1]:
            tail.hashes.append(block_id)
            tail.tokens.extend(tokens)
            return
        self._queue.append(_Stored([block_id], parent, list(tokens)))

    def removed(self, block_id: int) -> None:
        """One page was evicted."""
        tail = self._queue[-1] if self._queue else None
        if isinstance(tail, _Removed):
            tail.hashes.append(block_id)
            return
        self._queue.append(_Removed([block_id]))

    def cleared(self) -> None:
        """The whole cache was emptied."""
        self._queue.append(_Cleared())

    def take(self) -> list[KvEvent]:
        """The pending events as wire types; the log is empty afterwards."""
        out: list[KvEvent] = []
        for item in self._queue:
            if isinstance(item, _Stored):
                out.append(
                    BlockStored(
                        block_hashes=item.hashes,
                        parent_block_hash=item.parent,
                        token_ids=item.tokens,
                        block_size=self.page_size,
                        lora_id=None,
                        medium=MEDIUM,
                    )
                )
            elif isinstance(item, _Removed):
                out.append(BlockRemoved(block_hashes=item.hashes, medium=MEDIUM))
            else:
                out.append(AllBlocksCleared())
        self._queue.clear()
        return out
