"""The frontend's pure parts: the KV index and the routing policies (no I/O)."""

from __future__ import annotations

import random

import pytest

from actors.frontend.indexer import PREDICTION_TTL, KvIndexer
from actors.frontend.router import Candidate, Router, kv_cost
from messages.discovery import InstanceRecord, ModelCard, Subjects
from messages.kv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    Resync,
    block_hashes,
)
from messages.metrics import LoadMetrics


def _record(instance_id: str) -> InstanceRecord:
    card = ModelCard("m", 8192, 16, 1024, 64, 1, "aggregated", "sim", tokenizer="sim-bytes")
    subjects = Subjects(
        *(f"dynamo.backend.{s}.{instance_id}" for s in ("g", "i", "c", "k", "l", "t"))
    )
    return InstanceRecord(
        instance_id, "dynamo", "backend", "generate", subjects, card, "h", 1, 0.0, "0"
    )


def _stored(instance_id: str, seq: int, hashes: list[int], rank: int = 0) -> KvEventBatch:
    event = BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=16, lora_id=None
    )
    return KvEventBatch(instance_id=instance_id, dp_rank=rank, seq=seq, ts=0.0, events=[event])


PROMPT = [h for h, _ in block_hashes(list(range(3, 3 + 16 * 8)), 16)]  # 8 pages


def test_matched_blocks_is_the_longest_cached_prefix_of_the_prompt() -> None:
    index = KvIndexer()
    assert index.apply(_stored("a", 0, PROMPT[:5]), now=0.0) == "applied"
    assert index.matched_blocks("a", 0, PROMPT, now=0.0) == 5
    assert index.matched_blocks("a", 1, PROMPT, now=0.0) == 0  # another rank
    index.apply(KvEventBatch("a", 0, 1, 0.0, [BlockRemoved(block_hashes=[PROMPT[2]])]), now=0.0)
    assert index.matched_blocks("a", 0, PROMPT, now=0.0) == 2  # a hole ends the prefix
    index.apply(KvEventBatch("a", 0, 2, 0.0, [AllBlocksCleared()]), now=0.0)
    assert index.matched_blocks("a", 0, PROMPT, now=0.0) == 0


def test_a_resync_batch_drops_the_ranks_view_and_a_gap_is_counted() -> None:
    index = KvIndexer()
    index.apply(_stored("a", 0, PROMPT[:4]), now=0.0)
    assert index.apply(_stored("a", 5, PROMPT[4:6]), now=0.0) == "gap"
    assert index.gaps == 1
    resync = KvEventBatch("a", 0, -1, 0.0, [AllBlocksCleared()], resync=Resync(reason="gap"))
    assert index.apply(resync, now=0.0) == "resync"
    assert index.matched_blocks("a", 0, PROMPT, now=0.0) == 0
    assert index.apply(_stored("a", 9, PROMPT[:1]), now=0.0) == "applied"  # no gap after a resync


def test_a_batch_lost_right_after_a_resync_that_names_its_successor_is_a_gap() -> None:
    """A relay's resync says which batch comes next: losing that one (the first of a
    relay's history, or of a restarted node) is seen, by a later batch or by the head."""
    index = KvIndexer()

    def resync(next_seq: int) -> KvEventBatch:
        why = Resync(reason="relay_start", next_seq=next_seq)
        return KvEventBatch("a", 0, -1, 0.0, [AllBlocksCleared()], resync=why)

    assert index.apply(resync(0), now=0.0) == "resync"
    assert index.apply(_stored("a", 0, PROMPT[:1]), now=0.0) == "applied"
    assert index.apply(_stored("a", 1, PROMPT[1:2]), now=0.0) == "applied"
    assert index.apply(resync(7), now=0.0) == "resync"
    assert index.apply(_stored("a", 8, PROMPT[:2]), now=0.0) == "gap"  # 7 was lost
    assert index.apply(resync(0), now=0.0) == "resync"
    assert not index.behind(("a", 0), -1)
    assert index.behind(("a", 0), 0)  # the head says 0 was published; it never came
    assert index.gaps == 2


def test_a_rank_the_index_knows_nothing_of_is_asked_for_past_its_first_batch() -> None:
    """An index that started after the relay, or forgot the instance while it was away
    (a partition longer than the prune grace), would otherwise hold only what comes next
    and never ask for the rest: a quiet rank's heads and its later batches agree with it."""
    index = KvIndexer()
    assert index.apply(_stored("a", 0, PROMPT[:1]), now=0.0) == "applied"  # the very first
    assert index.apply(_stored("b", 4, PROMPT[:1]), now=0.0) == "joined"  # 0-3 never came
    assert index.apply(_stored("b", 5, PROMPT[1:2]), now=0.0) == "applied"
    assert index.behind(("c", 0), 2)  # a head of a rank never heard of
    assert not index.behind(("c", 0), -1)  # a relay that has relayed nothing
    index.forget("a")
    assert index.apply(_stored("a", 7, PROMPT[1:2]), now=0.0) == "joined"
    assert index.gaps == 0  # nothing was lost that the index had been following


def test_a_batch_older_than_one_applied_is_not_applied_and_the_view_is_asked_for() -> None:
    """Out of order (a relay's connection moved between the servers of a cluster): the
    older batch's removal applied after the store that followed it would leave the view
    short of the engine's cache with every batch accounted for."""
    index = KvIndexer()
    index.apply(_stored("a", 0, PROMPT[:3]), now=0.0)
    late = KvEventBatch("a", 0, 1, 0.0, [BlockRemoved(block_hashes=[PROMPT[2]])])
    assert index.apply(_stored("a", 2, PROMPT[2:3]), now=0.0) == "gap"  # 1 is late
    assert index.apply(late, now=0.0) == "stale"
    assert index.matched_blocks("a", 0, PROMPT, now=0.0) == 3  # the store after it stands
    assert index.apply(_stored("a", 2, PROMPT[:1]), now=0.0) == "stale"  # a duplicate
    # a restarted engine counts from 0 again; its relay's resync was lost on the way
    assert index.apply(_stored("a", 0, PROMPT[:1]), now=0.0) == "stale"
    resync = KvEventBatch(
        "a", 0, -1, 0.0, [AllBlocksCleared()], resync=Resync(reason="publisher_restart", next_seq=0)
    )
    assert index.apply(resync, now=0.0) == "resync"
    assert index.apply(_stored("a", 0, PROMPT[:1]), now=0.0) == "applied"


def test_a_routed_prompt_is_predicted_on_its_rank_until_it_expires() -> None:
    index = KvIndexer()
    index.predict("a", 0, PROMPT, now=100.0)
    assert index.matched_blocks("a", 0, PROMPT, now=100.0) == 8
    assert index.matched_blocks("a", 0, PROMPT, now=100.0 + PREDICTION_TTL + 1) == 0
    index.expire(100.0 + PREDICTION_TTL + 1)
    assert index.matched_blocks("a", 0, PROMPT, now=100.0) == 0


def test_load_is_running_plus_waiting_and_departed_instances_are_forgotten() -> None:
    index = KvIndexer()
    index.apply_metrics(LoadMetrics("a", 0, 3, 64, 10, 1024, 2, 0.01, 0.5, 0.0), now=1.0)
    index.apply(_stored("b", 0, PROMPT), now=1.0)
    assert index.load("a", 0) == 5
    assert index.heard_at("a") == 1.0
    assert index.prune(live=["a"], now=20.0, grace=30.0) == []  # b may not be registered yet
    assert index.prune(live=["a"], now=40.0, grace=30.0) == ["b"]
    assert index.matched_blocks("b", 0, PROMPT, now=40.0) == 0


def test_kv_cost_weighs_uncached_blocks_against_load() -> None:
    cached = Candidate(_record("a"), 0, matched_blocks=8, load=3)
    idle = Candidate(_record("b"), 0, matched_blocks=0, load=0)
    assert kv_cost(cached, 8, 1.0, 1.0) == 3.0
    assert kv_cost(idle, 8, 1.0, 1.0) == 8.0
    router = Router("kv", 1.0, 1.0)
    assert router.choose([idle, cached], 8, "m").candidate is cached
    assert Router("kv", 1.0, 4.0).choose([idle, cached], 8, "m").candidate is idle
    assert (
        router.choose([idle, cached], 8, "m", use_kv=False).candidate is idle
    )  # decode: load only


def test_ties_are_broken_at_random_and_round_robin_takes_turns() -> None:
    a, b = Candidate(_record("a"), 0, 0, 0), Candidate(_record("b"), 0, 0, 0)
    picks = {
        Router("kv", rng=random.Random(seed)).choose([a, b], 4, "m").candidate.instance_id
        for seed in range(20)
    }
    assert picks == {"a", "b"}
    turns = Router("round_robin")
    assert [turns.choose([b, a], 4, "m").candidate.instance_id for _ in range(4)] == [
        "a",
        "b",
        "a",
        "b",
    ]
    with pytest.raises(ValueError, match="no candidates"):
        turns.choose([], 4, "m")
