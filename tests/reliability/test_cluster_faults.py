"""Faults on a three-server NATS cluster under load: the cluster chaos runner with two sim
nodes and the client library's streaming clients (`configs/chaos/cluster-everything.toml`).

Each fault (kill -9 of a server, an ordered restart, a partition of a server's routes, a
rolling restart of all three) must take effect, the cluster must form again, discovery
must come back exact (both nodes listed, nothing else), nothing may be lost and nothing
may fail (streams of a cut-off node continue on the other), a SIGKILLed node's lease must
still expire, and the route proxies must not grow the runner's memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import tomllib

from supervisor.chaos_cluster import ClusterScenario, run_cluster_scenario
from supervisor.chaos_verdict import print_verdict
from tests.node.harness import ROOT


def test_every_cluster_fault_under_load_loses_nothing_and_discovery_comes_back_exact(
    tmp_path: Path,
) -> None:
    raw = tomllib.loads((ROOT / "configs" / "chaos" / "cluster-everything.toml").read_text())
    scenario = msgspec.convert(raw, ClusterScenario)
    verdict = run_cluster_scenario(scenario, tmp_path)
    report = msgspec.json.encode(verdict).decode()
    print(report)  # the figures, for the README's reliability table
    print_verdict(verdict)  # what `python -m supervisor.chaos_cluster` prints (it once raised)
    assert verdict.lost == 0, report
    assert verdict.errors == {}, report
    assert verdict.completed > 0
    assert verdict.recovered, report
    assert [f["fault"] for f in verdict.faults] == [f.fault for f in scenario.faults]
    for fault in verdict.faults:
        assert fault["ok"], fault
        assert isinstance(fault["injected_at"], float), fault  # ends are counted on it
        assert fault["discovery_exact_after"] is not None, fault
    partition, restart, kill, rolling = (f["detail"] for f in verdict.faults)
    assert re.match(r"sglc-\d exited -9", kill), kill
    assert re.match(r"sglc-\d exited 0 and started again", restart), restart
    assert partition.startswith("sglc-0 had 0 routes"), partition  # node 0's first server
    assert rolling == "restarted sglc-0, sglc-1, sglc-2"
    assert verdict.discovery_exact
    assert verdict.lease_expired_after is not None, report
    # the proxies drop what they carry when cut, never buffer it
    assert verdict.rss_peak_mb - verdict.rss_start_mb < 100, report
