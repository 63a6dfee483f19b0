"""The fault matrix's two-node rows: one of two sim nodes killed (kill -9 of its process
group) or stopped (SIGTERM, its drain timeout shorter than its streams) under load from the
client library. Nothing is lost and nothing fails: the streams it held continue on the
other node; discovery lists exactly the node left (and, once a new node replaces the
killed one, both)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import tomllib

from supervisor.chaos import Scenario, Verdict, run_scenario
from supervisor.chaos_verdict import print_verdict
from tests.node.harness import ROOT


def _run(name: str, tmp_path: Path) -> Verdict:
    path = ROOT / "configs" / "chaos" / f"{name}.toml"
    scenario = msgspec.convert(tomllib.loads(path.read_text()), Scenario)
    verdict = run_scenario(scenario, tmp_path)
    print(msgspec.json.encode(verdict).decode())  # the figures, for the README
    return verdict


@pytest.mark.parametrize("name", ["pair-node-kill", "pair-node-stop"])
def test_one_of_two_nodes_lost_under_load_nothing_fails(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verdict = _run(name, tmp_path)
    report = msgspec.json.encode(verdict).decode()
    print_verdict(verdict)  # what `python -m supervisor.chaos` prints (it once raised here)
    printed = capsys.readouterr().out
    signal = "kill" if name == "pair-node-kill" else "term"
    assert re.search(rf"^fault {signal}_node +ok at ", printed, re.MULTILINE), printed
    assert "discovery exact after " in printed
    assert verdict.lost == 0, report
    assert verdict.errors == {}, report
    assert verdict.recovered, report
    # the fault hit streams in flight, and they went on on the other node
    assert verdict.migrated > 0, report
    assert verdict.completed == verdict.sent, report
    (fault,) = verdict.faults
    assert fault["ok"], fault
    assert fault["discovery_exact_after"] is not None, fault
    if name == "pair-node-kill":  # a new node took the dead one's place: listed, serving
        assert fault["restarted_after"] is not None, fault
    # every live node's cache (the new one's too) equals what its KV events said
    assert verdict.kv_view_equal is True, verdict.kv_detail


def test_a_scenario_of_node_faults_names_an_existing_node() -> None:
    data = {"name": "x", "nodes": 2, "node_faults": [{"at": 1.0, "node": 2}]}
    with pytest.raises(msgspec.ValidationError, match="node 2 is not one of the 2 nodes"):
        msgspec.convert(data, Scenario)
    alone = {"name": "x", "node_faults": [{"at": 1.0, "node": 0}]}
    with pytest.raises(msgspec.ValidationError, match="need nodes >= 2"):
        msgspec.convert(alone, Scenario)
    back = {"name": "x", "nodes": 2, "node_faults": [{"at": 1.0, "restart_after": -1.0}]}
    with pytest.raises(msgspec.ValidationError, match="restart_after must be >= 0"):
        msgspec.convert(back, Scenario)
