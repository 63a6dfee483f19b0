"""The sim's block manager: prefix reuse, SGLang's coalesced events, LRU leaf-first eviction,
locked pages, capacity waits. Pure: no threads, no sockets."""

from __future__ import annotations

import pytest

from actors.engine_host.sim import PagedKvCache
from messages.kv import AllBlocksCleared, BlockRemoved, BlockStored, block_hashes

PAGE = 4


def ids(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def hashes(tokens: list[int]) -> list[int]:
    return [h for h, _ in block_hashes(tokens, PAGE)]


def run_to_finish(cache: PagedKvCache, prompt: list[int], output: int = 1) -> None:
    """Admit, prefill, decode `output` tokens (of KV: output - 1), release."""
    seq = cache.admit(prompt, len(prompt) + output - 1)
    assert seq is not None
    cache.commit(seq, prompt)
    tokens = prompt + ids(output - 1, start=900)
    cache.grow(seq, len(tokens))
    cache.release(seq, tokens)


def test_one_insert_of_consecutive_pages_is_one_block_stored_as_sglang_emits_it() -> None:
    cache = PagedKvCache(num_blocks=16, page_size=PAGE)
    prompt = ids(14)  # 3 full pages and 2 tokens
    seq = cache.admit(prompt, len(prompt))
    assert seq is not None
    cache.commit(seq, prompt)
    assert cache.events.take() == [
        BlockStored(
            block_hashes=hashes(prompt),
            parent_block_hash=None,
            token_ids=prompt[:12],
            block_size=PAGE,
            lora_id=None,
            medium="GPU",
        )
    ]
    assert cache.events.take() == []


def test_a_cached_prefix_is_a_hit_and_the_new_pages_chain_on_it() -> None:
    cache = PagedKvCache(num_blocks=16, page_size=PAGE)
    first = ids(9)
    run_to_finish(cache, first)
    cache.events.take()
    second = first[:8] + ids(9, start=500)  # shares 2 pages
    seq = cache.admit(second, len(second))
    assert seq is not None
    assert seq.hit_pages == 2
    cache.commit(seq, second)
    [event] = cache.events.take()
    assert isinstance(event, BlockStored)
    all_hashes = hashes(second)
    assert event.parent_block_hash == all_hashes[1]
    assert event.block_hashes == all_hashes[2:]
    assert event.token_ids == second[8:16]


def test_the_last_prompt_token_is_never_a_cache_hit() -> None:
    cache = PagedKvCache(num_blocks=16, page_size=PAGE)
    prompt = ids(8)  # exactly two pages
    run_to_finish(cache, prompt)
    seq = cache.admit(prompt, len(prompt))
    assert seq is not None
    assert seq.hit_pages == 1  # SGLang recomputes the last token for its logits


def test_finished_output_pages_are_cached_and_the_partial_page_is_freed() -> None:
    cache = PagedKvCache(num_blocks=16, page_size=PAGE)
    prompt = ids(6)
    run_to_finish(cache, prompt, output=7)  # 6 + 6 tokens of KV: 3 full pages
    stored = [e for e in cache.events.take() if isinstance(e, BlockStored)]
    assert [h for e in stored for h in e.block_hashes] == hashes(prompt + ids(6, start=900))
    assert (cache.cached_pages, cache.free_pages, cache.used_pages) == (3, 13, 0)
    assert cache.evictable_pages == 3


def test_eviction_takes_the_least_recently_used_chain_leaf_first() -> None:
    cache = PagedKvCache(num_blocks=7, page_size=PAGE)
    old, new = ids(13, start=100), ids(13, start=300)  # 3 full pages each, cached
    run_to_finish(cache, old)
    run_to_finish(cache, new)
    cache.events.take()
    assert cache.free_pages == 1
    third = ids(9, start=700)  # needs 3 pages: the two deepest pages of `old` go
    seq = cache.admit(third, len(third))
    assert seq is not None
    assert cache.events.take() == [
        BlockRemoved(block_hashes=[hashes(old)[2], hashes(old)[1]], medium="GPU")
    ]
    assert cache.match_prefix(old) != []
    assert len(cache.match_prefix([*new, 1])) == 3


def test_a_hit_refreshes_the_lru_order() -> None:
    cache = PagedKvCache(num_blocks=7, page_size=PAGE)
    old, new = ids(13, start=100), ids(13, start=300)
    run_to_finish(cache, old)
    run_to_finish(cache, new)
    run_to_finish(cache, old)  # old is now the most recently used
    cache.events.take()
    seq = cache.admit(ids(9, start=700), 9)
    assert seq is not None
    [removed] = cache.events.take()
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == [hashes(new)[2], hashes(new)[1]]


def test_pages_held_by_a_sequence_are_never_evicted_and_others_wait_for_room() -> None:
    cache = PagedKvCache(num_blocks=6, page_size=PAGE)
    cached = ids(13, start=100)
    run_to_finish(cache, cached)  # 3 evictable pages
    holder = cache.admit(cached, 16)  # hits 3 pages, reserves 4 in all
    assert holder is not None
    cache.commit(holder, cached)
    cache.events.take()
    assert (cache.free_pages, cache.evictable_pages) == (2, 0)
    assert cache.admit(ids(16, start=500), 16) is None  # needs 4 pages: it has to wait
    assert cache.events.take() == []  # and nothing was evicted for it
    assert cache.cached_pages == 3
    cache.release(holder, cached)
    seq = cache.admit(ids(16, start=500), 16)
    assert seq is not None
    [removed] = cache.events.take()  # 3 free pages, one short: the leaf goes
    assert removed == BlockRemoved(block_hashes=[hashes(cached)[2]], medium="GPU")


def test_the_worst_case_reservation_keeps_decoding_from_running_out() -> None:
    cache = PagedKvCache(num_blocks=4, page_size=PAGE)
    long = cache.admit(ids(4), 16)  # may grow to 4 pages
    assert long is not None
    assert cache.admit(ids(2, start=500), 2) is None  # 1 page free, but it is promised
    for n in range(5, 17):
        cache.grow(long, n)
    assert cache.free_pages == 0
    with pytest.raises(RuntimeError, match="outgrew"):
        cache.grow(long, 17)


def test_identical_prompts_prefilled_together_share_their_pages() -> None:
    cache = PagedKvCache(num_blocks=8, page_size=PAGE)
    prompt = ids(9)
    a, b = cache.admit(prompt, 9), cache.admit(prompt, 9)
    assert a is not None
    assert b is not None
    cache.commit(a, prompt)
    cache.commit(b, prompt)  # same digests: b locks a's pages and frees its copies
    assert len(cache.events.take()) == 1
    assert cache.cached_pages == 2
    assert cache.free_pages == 8 - 2 - 2  # plus one partial page each


def test_reset_clears_everything_but_not_while_in_use() -> None:
    cache = PagedKvCache(num_blocks=8, page_size=PAGE)
    seq = cache.admit(ids(9), 9)
    assert seq is not None
    with pytest.raises(RuntimeError, match="using"):
        cache.reset()
    cache.release(seq, ids(9))
    cache.events.take()
    cache.reset()
    assert cache.events.take() == [AllBlocksCleared()]
    assert (cache.cached_pages, cache.free_pages) == (0, 8)
    assert cache.match_prefix(ids(9)) == []
