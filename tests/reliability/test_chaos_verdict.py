"""The chaos runner's verdict: each end state counted apart, and on the fault before it."""

from __future__ import annotations

import pytest

from supervisor.chaos_verdict import Verdict, end_state


def test_an_error_as_a_streams_only_chunk_is_a_refusal_only_for_the_refusal_codes() -> None:
    assert end_state("engine_restarting", chunks=1) == "refused:engine_restarting"
    assert end_state("overloaded", chunks=1) == "refused:overloaded"
    assert end_state("engine_restarting", chunks=5) == "error:engine_restarting"
    assert end_state("deadline_exceeded", chunks=1) == "error:deadline_exceeded"
    assert end_state("stream_lost", chunks=1) == "stream_lost"
    assert end_state("stream_lost", chunks=9) == "stream_lost"


def test_each_end_is_counted_apart_and_on_the_fault_injected_last_before_it() -> None:
    verdict = Verdict(scenario="t")
    verdict.count("error:internal", at=0.5)  # before any fault
    verdict.faults.append({"fault": "kill_engine_host", "target": "", "injected_at": 1.0})
    verdict.count("completed", at=1.5)
    verdict.count("refused:engine_restarting", at=1.6)
    verdict.count("stream_lost", at=1.7)
    verdict.faults.append({"fault": "cut_nats", "target": "", "injected_at": 2.0})
    verdict.count("refused:no_responders", at=2.1)
    verdict.count("lost", at=2.2)
    verdict.count("error:engine_error", at=3.0)
    assert verdict.completed == 1
    assert verdict.errors == {"internal": 1, "engine_error": 1}
    assert verdict.refused == {"engine_restarting": 1, "no_responders": 1}
    assert (verdict.stream_lost, verdict.lost) == (1, 1)
    assert verdict.before_faults == {"error:internal": 1}
    assert verdict.ends_per_fault() == {
        "kill_engine_host": {"refused:engine_restarting": 1, "stream_lost": 1},
        "cut_nats": {"refused:no_responders": 1, "lost": 1, "error:engine_error": 1},
    }
    assert not verdict.passed  # one lost


def test_an_unknown_end_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown end state"):
        Verdict(scenario="t").count("vanished", at=0.0)
