"""The fault matrix: each fault injected under load by the chaos runner, on a real node.

Every accepted request must complete: no error, no `stream_lost`, nothing lost (each
fault's allowed ends are in ALLOWED_ENDS); the tree must come back to all-running and
registered, and a KV-event subscriber's view must equal the engine's at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import tomllib

from supervisor.chaos import Scenario, Verdict, run_scenario
from tests.node.harness import ROOT, descendants, start_node
from tests.supervision.children import pid_alive, wait_until


def _scenario(name: str) -> Scenario:
    return msgspec.convert(
        tomllib.loads((ROOT / "configs" / "chaos" / f"{name}.toml").read_text()), Scenario
    )


# The end states each fault may cost a request, besides completing (see
# supervisor/chaos_verdict.py). Continuation covers every fault the node survives: the
# stream goes on in the handler's successor or on the restarted engine, and chunks a NATS
# cut or restart dropped are asked for again. So no accepted request may end with an
# error, the client's `stream_lost`, or be lost. What a fault may force is a refusal
# before acceptance, after the client library's retries (0.2 s, doubling, 3 more tries):
# while the engine restarts (a real engine takes ~25 s, longer than those retries) a new
# request is refused with `engine_restarting`; while the node is away from NATS nobody
# serves the subject (`no_responders`).
RESTARTING = {"refused:engine_restarting"}
AWAY_FROM_NATS = {"refused:no_responders"}
ALLOWED_ENDS: dict[str, set[str]] = {
    "crash_actor": set(),
    "hang_actor": set(),
    "kill_engine_host": RESTARTING,
    "stop_engine_host": RESTARTING,
    "drop_zmq": set(),
    "delay_zmq": set(),
    "reset_sequence": set(),
    "cut_nats": AWAY_FROM_NATS,
    "restart_nats": AWAY_FROM_NATS,
    "fail_probes": RESTARTING,
    "slow_engine": set(),
}


def _check(verdict: Verdict, expected_faults: int) -> None:
    report = msgspec.json.encode(verdict).decode()
    print(report)  # the figures, for the README's reliability table
    assert verdict.lost == 0, report
    assert verdict.errors == {}, report
    assert verdict.stream_lost == 0, report
    assert set(verdict.refused) <= {"no_responders", "engine_restarting"}, report
    assert verdict.before_faults == {}, report
    assert verdict.recovered, report
    assert len(verdict.faults) == expected_faults
    for fault in verdict.faults:
        assert fault["ok"], fault
        assert fault["recovered_after"] is not None, fault
        assert set(fault["ends"]) <= ALLOWED_ENDS[fault["fault"]], fault
    assert verdict.completed > 0
    assert verdict.completed + sum(verdict.refused.values()) == verdict.sent, report


def test_every_fault_under_load_with_the_sim_engine(tmp_path: Path) -> None:
    scenario = _scenario("everything")
    verdict = run_scenario(scenario, tmp_path)
    _check(verdict, len(scenario.faults))
    assert verdict.kv_view_equal is True, verdict.kv_detail
    assert verdict.restarts.get("core/engine/engine_host") == 3  # kill, stop (stall), probes
    # its clients take the chunks straight from the node (direct streams): the faults hit
    # that path too, and the cut of the node's NATS cuts it (then it comes back)
    log = (tmp_path / "node.log").read_text()
    assert log.count('"direct streams to a frontend connected"') >= 2, log[-2000:]
    assert '"cut (fault injection)"' in log


# Two SGLang starts (the first, and the restart after the stall): ~25 s each on a quiet
# 2-core machine, 133 s each seen with other tests loading it; more than the default 300 s.
@pytest.mark.timeout(1200)
def test_a_stuck_engine_and_a_nats_restart_with_the_real_engine(tmp_path: Path) -> None:
    scenario = _scenario("sglang-faults")
    verdict = run_scenario(scenario, tmp_path)
    _check(verdict, len(scenario.faults))
    assert verdict.restarts.get("core/engine/engine_host") == 1  # the stall restarted it
    assert verdict.restarts.get("nats_server") == 1


CRASH_LOOP = """
[[chaos.faults]]
fault = "crash_actor"
target = "core/engine/engine_actor"
at = 0.5
every = 0.3
"""


def test_a_crash_loop_exceeds_the_intensity_stops_in_order_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    node = start_node(
        tmp_path,
        supervision={"intensity": 1, "period": 60.0, "backoff_initial": 0.05, "backoff_max": 0.2},
        chaos={"enabled": True, "seed": 7},
        extra_toml=CRASH_LOOP,
    )
    try:
        node.wait_ready(60)
        pids = descendants(node.proc.pid)
        assert node.proc.wait(60) == 1  # never spins: the escalation reaches the root, it exits
        text = node.log_path.read_text()
        summary = [line for line in text.splitlines() if line.startswith("sgl-node:")]
        assert len(summary) == 1
        assert "restart_intensity_exceeded in node" in summary[0]
        events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
        assert "deregistered" in events
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10)
    finally:
        node.kill()


def test_a_crash_of_the_nats_link_owner_restarts_the_core_at_once_and_cleanly(
    tmp_path: Path,
) -> None:
    # The fabric owns the NATS link whose loop the handlers and the engine's output reader
    # run on. Its crash ends that loop: the handlers exit with LoopEnded, the others' calls
    # through the link fail at once instead of at their timeouts, so the rest_for_one
    # restart of the core does not wait for a child abandoned at its shutdown timeout (the
    # registrar used to be, 5 s), and nothing is left pending on the dead loop. The
    # handlers' stream tables outlive the restart of their pool (kept in the pool
    # supervisor's own handover), so the streams in flight continue on the restarted
    # engine: nothing ends with stream_lost.
    scenario = msgspec.convert(
        {
            "name": "fabric-crash",
            "duration": 8.0,
            "config": "configs/chaos/sim-node.toml",
            "load": {"clients": 4, "max_tokens": 40, "deadline": 10.0},
            "faults": [{"at": 2.0, "fault": "crash_actor", "target": "core/fabric"}],
        },
        Scenario,
    )
    verdict = run_scenario(scenario, tmp_path)
    report = msgspec.json.encode(verdict).decode()
    print(report)
    assert verdict.lost == 0, report
    assert verdict.errors == {}, report
    assert verdict.stream_lost == 0, report
    assert verdict.completed + sum(verdict.refused.values()) == verdict.sent, report
    assert verdict.recovered, report
    assert verdict.restarts.get("core/fabric") == 1, report
    # its admin reply went with the link; the runner sees the fault in the tree's restarts
    assert verdict.faults[0]["ok"], report
    assert verdict.faults[0]["recovered_after"] is not None, report
    log = (tmp_path / "node.log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    handler_exits = [
        e["reason"] for e in events if e["event"] == "child exited" and e["child"] == "handler-1"
    ]
    assert "LoopEnded" in handler_exits[0] or "rest_for_one" in handler_exits[0], handler_exits
    assert not [e for e in events if "abandoning" in e["event"]], log[-3000:]
    assert [e for e in events if e["event"] == "continuing the crashed incarnation's streams"]
    assert "Task was destroyed" not in log
