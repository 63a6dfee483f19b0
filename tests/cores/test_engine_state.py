"""The EngineActor's pure core: admission and health, on an injected `now`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine_state.admission import InflightTable
from actors.engine_state.health import CanaryFailed, CanaryOk, Health, SendCanary, Unhealthy
from supervisor.config import HealthSection

SECTION = HealthSection(
    canary_after_idle=10.0, canary_timeout=30.0, failures_before_unhealthy=3, stall_timeout=60.0
)


def test_admission_refuses_duplicates_then_overload_then_a_greedy_client() -> None:
    table = InflightTable(max_inflight=3, max_streams_per_client=2)
    assert table.admit("a", "c1", "h1", now=0.0) is None
    dup = table.admit("a", "c2", "h1", now=0.0)
    assert dup is not None
    assert dup.code == "invalid_request"
    assert table.admit("b", "c1", "h1", now=0.0) is None
    greedy = table.admit("c", "c1", "h1", now=0.0)
    assert greedy is not None
    assert greedy.code == "too_many_streams"
    assert table.admit("d", "", "h2", now=0.0) is None  # no client id: no per-client limit
    full = table.admit("e", "c9", "h2", now=0.0)
    assert full is not None
    assert full.code == "overloaded"
    assert "handlers.max_inflight" in full.message


def test_a_finished_request_leaves_and_frees_its_clients_slot() -> None:
    table = InflightTable(max_inflight=10, max_streams_per_client=1)
    table.admit("a", "c1", "h1", now=0.0)
    assert table.progress("a", now=1.0, finished=False) is not None
    assert table.streams_of("c1") == 1
    route = table.progress("a", now=2.0, finished=True)
    assert route is not None
    assert route.reply_path == "h1"
    assert "a" not in table
    assert table.streams_of("c1") == 0
    assert table.progress("a", now=3.0, finished=False) is None  # unknown: nowhere to go
    assert table.admit("b", "c1", "h1", now=3.0) is None


def test_requests_without_progress_for_the_stall_timeout_are_stalled() -> None:
    table = InflightTable(max_inflight=10)
    table.admit("slow", "", "h", now=0.0)
    table.admit("busy", "", "h", now=0.0)
    table.progress("busy", now=50.0, finished=False)
    assert table.stalled(now=60.0, stall_timeout=60.0) == []
    assert table.stalled(now=60.5, stall_timeout=60.0) == ["slow"]


def test_take_all_empties_the_table_for_the_engines_end() -> None:
    table = InflightTable(max_inflight=10, max_streams_per_client=1)
    table.admit("a", "c1", "h1", now=0.0)
    assert set(table.take_all()) == {"a"}
    assert len(table) == 0
    assert table.streams_of("c1") == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "finish"]), st.integers(0, 8), st.integers(0, 2)),
        max_size=60,
    )
)
def test_admission_never_exceeds_its_limits(ops: list[tuple[str, int, int]]) -> None:
    table = InflightTable(max_inflight=4, max_streams_per_client=2)
    for op, rid, client in ops:
        if op == "admit":
            table.admit(f"r{rid}", f"c{client}", "h", now=0.0)
        else:
            table.progress(f"r{rid}", now=0.0, finished=True)
        assert len(table) <= 4
        for c in range(3):
            held = sum(1 for e in table.entries.values() if e.client_id == f"c{c}")
            assert held == table.streams_of(f"c{c}") <= 2


def test_an_idle_engine_gets_a_canary_after_the_idle_time_and_none_while_one_is_out() -> None:
    health = Health(SECTION, now=0.0)
    assert health.tick(now=9.9, stalled=0, busy=False, canaries_wanted=True) is None
    assert isinstance(
        health.tick(now=10.0, stalled=0, busy=False, canaries_wanted=True), SendCanary
    )
    health.canary_sent("canary-1", now=10.0)
    assert health.tick(now=20.0, stalled=0, busy=False, canaries_wanted=True) is None
    assert health.canary_ended("stop") == CanaryOk(after_failures=0)


def test_no_canary_while_busy_or_for_a_follower() -> None:
    health = Health(SECTION, now=0.0)
    assert health.tick(now=100.0, stalled=0, busy=True, canaries_wanted=True) is None
    assert health.tick(now=100.0, stalled=0, busy=False, canaries_wanted=False) is None


def test_failed_canaries_in_a_row_make_the_engine_unhealthy_and_a_success_resets_them() -> None:
    health = Health(SECTION, now=0.0)
    first = health.canary_ended("error", "boom")
    assert isinstance(first, CanaryFailed)
    assert (first.failures, first.fatal) == (1, False)
    assert health.canary_ended("stop") == CanaryOk(after_failures=1)
    assert health.healthy
    for _ in range(2):
        health.canary_ended("error", "boom")
    last = health.canary_ended("cancelled")
    assert isinstance(last, CanaryFailed)
    assert last.fatal
    assert not health.healthy
    assert "canary ended cancelled" in health.detail


def test_a_canary_without_an_answer_times_out_and_is_aborted() -> None:
    health = Health(SECTION, now=0.0)
    health.canary_sent("canary-7", now=10.0)
    assert health.tick(now=40.0, stalled=0, busy=False, canaries_wanted=True) is None
    timed_out = health.tick(now=40.1, stalled=0, busy=False, canaries_wanted=True)
    assert isinstance(timed_out, CanaryFailed)
    assert timed_out.abort == "canary-7"
    assert health.canary is None


def test_a_stalled_request_is_unhealthy_at_once() -> None:
    health = Health(SECTION, now=0.0)
    stalled = health.tick(now=70.0, stalled=2, busy=True, canaries_wanted=True)
    assert isinstance(stalled, Unhealthy)
    assert "2 requests made no progress in 60s" in stalled.why


def test_injected_failures_fail_the_next_canaries_and_ask_for_the_next_at_once() -> None:
    health = Health(SECTION, now=0.0)
    health.inject_failures(2)
    first = health.canary_ended("stop")
    assert isinstance(first, CanaryFailed)
    assert first.again
    second = health.canary_ended("stop")
    assert isinstance(second, CanaryFailed)
    assert not second.again
    assert health.canary_ended("stop") == CanaryOk(after_failures=2)
