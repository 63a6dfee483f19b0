"""A paged KV cache with SGLang's prefix hashing, LRU eviction and KV events.

Capacity is `num_blocks` pages of `page_size` tokens. A page is either free, private to a
sequence (its partial or not-yet-inserted pages), or cached in the prefix tree. Cached
pages are keyed by SGLang's chained SHA-256 digest (`messages.kv.block_hashes`), so a
page's identity is its whole prefix. Cached pages referenced by a sequence are locked;
unreferenced ones are evictable, least recently used leaf first (so the chain published
to routers never loses a parent before its children).

Every sequence reserves its worst case (prompt + max_tokens - 1 tokens of KV) when it is
admitted, so decoding never runs out of pages and never needs preemption. Not
thread-safe: one scheduler thread owns one cache.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from actors.engine_host.sim._events import EventLog
from messages.kv import block_hashes

__all__ = ["KvSequence", "PagedKvCache", "pages_for"]


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold `tokens` tokens of KV."""
    return -(-tokens // page_size)


@dataclass(eq=False)
class _Page:
    block_id: int  # the signed int64 published in events
    digest: bytes  # what the next page chains on
    parent: _Page | None
    tokens: tuple[int, ...]
    children: int = 0
    refs: int = 0
    last_used: int = 0


@dataclass(eq=False)
class KvSequence:
    """One request's hold on the cache: locked tree pages (a prefix) and private pages."""

    reserved: int  # pages it may need at most
    locked: list[_Page] = field(default_factory=list)
    private: int = 0
    hit_pages: int = 0  # pages found in the cache at admission

    @property
    def held(self) -> int:
        """Pages this sequence occupies now."""
        return len(self.locked) + self.private

    @property
    def outstanding(self) -> int:
        """Pages it may still allocate."""
        return max(0, self.reserved - self.held)


class PagedKvCache:
    """The block manager of one DP rank; see the module docstring."""

    def __init__(self, num_blocks: int, page_size: int) -> None:
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.events = EventLog(page_size)
        self._pages: dict[bytes, _Page] = {}
        self._sequences: set[KvSequence] = set()
        self._private = 0
        self._unreferenced = 0
        self._clock = itertools.count(1)
        self._lru: list[tuple[int, int, _Page]] = []  # (last_used, tiebreak, page), lazy
        self._tiebreak = itertools.count()

    # -- figures ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Queue AllBlocksCleared then a BlockStored for every cached page, parents first:
        what a subscriber needs to rebuild this cache from nothing."""

        def depth(page: _Page) -> int:
            n = 0
            while page.parent is not None:
                page, n = page.parent, n + 1
            return n

        self.events.cleared()
        for page in sorted(self._pages.values(), key=depth):
            parent = page.parent.block_id if page.parent is not None else None
            self.events.stored(page.block_id, parent, page.tokens)

    def block_ids(self) -> list[int]:
        """The published ids of every cached page (what a KV-event subscriber should hold)."""
        return sorted(page.block_id for page in self._pages.values())

    @property
    def cached_pages(self) -> int:
        """Pages in the prefix tree (locked or not)."""
        return len(self._pages)

    @property
    def evictable_pages(self) -> int:
        """Cached pages no sequence references."""
        return self._unreferenced

    @property
    def free_pages(self) -> int:
        """Pages holding nothing."""
        return self.num_blocks - len(self._pages) - self._private

    @property
    def used_pages(self) -> int:
        """Pages held by sequences (SGLang's `total - available - evictable`)."""
        return self.num_blocks - self.free_pages - self._unreferenced

    @property
    def active_sequences(self) -> int:
        """Sequences admitted and not yet released."""
        return len(self._sequences)

    # -- the request lifecycle ------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> list[_Page]:
        """Cached pages that prefix `token_ids`. Like SGLang, the last token is never a
        hit: it must be computed to produce the next token's logits."""
        found: list[_Page] = []
        for _, digest in block_hashes(token_ids[:-1], self.page_size):
            page = self._pages.get(digest)
            if page is None:
                break
            found.append(page)
        return found

    def admit(self, prompt: Sequence[int], reserve_tokens: int) -> KvSequence | None:
        """Lock the prompt's cached prefix and allocate pages for the rest, reserving room
        for `reserve_tokens` tokens in all; None (and nothing changed) if it cannot fit now."""
        hits = self.match_prefix(prompt)
        seq = KvSequence(reserved=pages_for(reserve_tokens, self.page_size), hit_pages=len(hits))
        if seq.reserved > self.num_blocks:
            return None
        self._lock(hits)
        others = sum(s.outstanding for s in self._sequences)
        if self.free_pages + self._unreferenced - others < seq.reserved - len(hits):
            self._unlock(hits)
            return None
        seq.locked = list(hits)
        self._sequences.add(seq)
        self.grow(seq, len(prompt))
        return seq

    def grow(self, seq: KvSequence, kv_tokens: int) -> None:
        """Make `seq` hold pages for `kv_tokens` tokens (within its reservation)."""
        need = pages_for(kv_tokens, self.page_size) - seq.held
        if need <= 0:
            return
        if need > seq.outstanding:
            raise RuntimeError("a sequence outgrew its KV reservation")
        self._make_free(need)
        seq.private += need
        self._private += need

    def commit(self, seq: KvSequence, token_ids: Sequence[int]) -> None:
        """Insert the full pages of `token_ids` into the tree and lock them for `seq`
        (SGLang's cache_unfinished_req). New pages are recorded as BlockStored."""
        start = len(seq.locked) * self.page_size
        parent = seq.locked[-1] if seq.locked else None
        tail = token_ids[start:]
        for n, (block_id, digest) in enumerate(
            block_hashes(tail, self.page_size, parent.digest if parent else None)
        ):
            page = self._pages.get(digest)
            seq.private -= 1
            self._private -= 1
            if page is None:
                chunk = tail[n * self.page_size : (n + 1) * self.page_size]
                page = _Page(block_id, digest, parent, tuple(chunk))
                self._pages[digest] = page
                self._unreferenced += 1
                if parent is not None:
                    parent.children += 1
                self.events.stored(block_id, parent.block_id if parent else None, chunk)
            self._lock([page])
            seq.locked.append(page)
            parent = page

    def release(self, seq: KvSequence, token_ids: Sequence[int]) -> None:
        """Insert the full pages of `token_ids`, then drop every hold of `seq` (SGLang's
        cache_finished_req: the sequence's KV stays cached, unreferenced)."""
        if seq not in self._sequences:
            return
        self.commit(seq, token_ids)
        self._unlock(seq.locked)
        self._private -= seq.private
        seq.locked, seq.private, seq.reserved = [], 0, 0
        self._sequences.discard(seq)

    def reset(self) -> None:
        """Empty the cache (records AllBlocksCleared). Only when no sequence is active."""
        if self._sequences:
            raise RuntimeError("cannot reset a KV cache that sequences are using")
        self._pages.clear()
        self._lru.clear()
        self._private = self._unreferenced = 0
        self.events.cleared()

    # -- internals ------------------------------------------------------------------------

    def _lock(self, pages: Sequence[_Page]) -> None:
        now = next(self._clock)
        for page in pages:
            if page.refs == 0:
                self._unreferenced -= 1
            page.refs += 1
            page.last_used = now

    def _unlock(self, pages: Sequence[_Page]) -> None:
        now = next(self._clock)
        for page in reversed(pages):  # children first, so a parent is never older
            page.refs -= 1
            page.last_used = now
            if page.refs == 0:
                self._unreferenced += 1
                self._offer(page)

    def _offer(self, page: _Page) -> None:
        if page.refs == 0 and page.children == 0:
            heapq.heappush(self._lru, (page.last_used, next(self._tiebreak), page))

    def _make_free(self, pages: int) -> None:
        while self.free_pages < pages:
            self._evict_one()

    def _evict_one(self) -> None:
        while self._lru:
            last_used, _, page = heapq.heappop(self._lru)
            current = self._pages.get(page.digest) is page
            if current and page.refs == 0 and page.children == 0 and page.last_used == last_used:
                del self._pages[page.digest]
                self._unreferenced -= 1
                self.events.removed(page.block_id)
                if page.parent is not None:
                    page.parent.children -= 1
                    self._offer(page.parent)
                return
        raise RuntimeError("no evictable KV page although the reservation promised one")
