"""The KvRelayActor's pure core: the sequence tracker, without ZMQ, NATS or threads."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.kv.sequence import SequenceTracker, Verdict, consecutive_from_zero


def started(dropped: int = 0) -> SequenceTracker:
    tracker = SequenceTracker()
    assert tracker.start(dropped).reason == "relay_start"
    return tracker


def feed(tracker: SequenceTracker, seq: int, digest: int = 0, dropped: int = 0) -> Verdict:
    verdict = tracker.check(seq, digest or seq, dropped, can_replay=True, blocking=True)
    if not (verdict.skip or verdict.wait):
        tracker.published(seq, digest or seq)
    return verdict


def test_an_unbroken_sequence_is_published_as_it_comes() -> None:
    tracker = started()
    for seq in range(5):
        assert feed(tracker, seq) == Verdict()
    assert tracker.last_seq == 4
    assert tracker.gaps == 0


def test_a_batch_that_comes_again_is_skipped_but_a_new_one_with_an_old_number_is_a_restart() -> (
    None
):
    tracker = started()
    for seq in range(3):
        feed(tracker, seq)
    assert feed(tracker, 1).skip  # the same batch again (it came by replay too)
    restart = feed(tracker, 0, digest=999)  # seq 0 again, other content: a new publisher
    assert restart.restart is not None
    assert restart.restart.reason == "publisher_restart"


def test_a_gap_asks_for_a_fill_and_an_unfilled_gap_gets_a_resync_naming_what_was_missed() -> None:
    tracker = started()
    feed(tracker, 0)
    verdict = feed(tracker, 4)
    assert verdict.fill == (1, 4)
    assert tracker.gaps == 1
    resync = tracker.unfilled(1, 4)
    assert (resync.reason, resync.missed_batches, resync.gaps_total) == ("gap", 3, 1)


def test_a_gap_waits_for_blocking_work_when_the_relay_reads_on_its_loop() -> None:
    tracker = started()
    feed(tracker, 0)
    assert tracker.check(5, 5, 0, can_replay=True, blocking=False).wait
    # without a replay buffer there is nothing to wait for: resync at once
    assert tracker.check(5, 5, 0, can_replay=False, blocking=False).fill == (1, 5)


def test_publishes_lost_while_nats_was_away_resync_before_the_next_batch() -> None:
    tracker = started(dropped=2)
    feed(tracker, 0, dropped=2)
    verdict = feed(tracker, 1, dropped=5)
    assert verdict.lost is not None
    assert verdict.lost.reason == "gap"
    assert feed(tracker, 2, dropped=5).lost is None  # told once


def test_a_replayed_history_is_used_up_to_its_first_hole() -> None:
    assert consecutive_from_zero([0, 1, 2, 3]) == 4
    assert consecutive_from_zero([0, 1, 3, 4]) == 2
    assert consecutive_from_zero([2, 3]) == 0
    assert consecutive_from_zero([]) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=60))
def test_whatever_arrives_the_tracker_publishes_each_batch_once_and_flags_every_break(
    arrivals: list[int],
) -> None:
    # Each seq's payload is the same whenever it arrives, as a publisher's replay is.
    tracker = started()
    published: list[int] = []
    for seq in arrivals:
        before = tracker.last_seq
        verdict = feed(tracker, seq)
        if verdict.skip:
            assert before is not None
            assert seq <= before
            continue
        published.append(seq)
        broke = before is not None and seq != before + 1
        assert broke == (verdict.fill is not None or verdict.restart is not None)
    # never the same batch twice in a row, and the tracker ends on the last one published
    assert all(a != b for a, b in itertools.pairwise(published))
    assert tracker.last_seq == published[-1]
