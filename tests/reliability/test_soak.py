"""The soak: 10 minutes of random faults under load on two nodes (`pytest -m soak`, not in
the default run).

Node 0 takes the admin faults (engine, actors, ZMQ, its NATS link); node 1 is killed with
-9 or stopped with SIGTERM now and then, and a new node takes its place 2 s after it left
discovery. Lost and errors must be 0 (every stream completes, continued on the same node
or moved to the other); node 0's memory must stay flat (within 10% of its size after a
minute of warm-up), and it must not leak processes, file descriptors or threads.
"""

from __future__ import annotations

import collections
import json
import os
import random
import threading
import time
from pathlib import Path

import msgspec
import pytest

from messages.chaos import Fault
from supervisor.chaos import Load, NodeFault, Scenario, run_scenario
from supervisor.chaos_nodes import NodeUnderTest
from tests.node.harness import descendants

SOAK_SECONDS = float(os.environ.get("SGL_NODE_SOAK_SECONDS", "600"))
WARM_UP = min(60.0, SOAK_SECONDS / 4)  # a shortened soak warms up for a quarter of its run
KINDS: list[Fault | NodeFault] = [
    Fault(fault="kill_engine_host"),
    Fault(fault="crash_actor", target="core/handlers/handler-1"),
    Fault(fault="crash_actor", target="core/engine/kv_relay_0"),
    Fault(fault="hang_actor", target="core/engine/metrics", duration=1.0),
    Fault(fault="stop_engine_host", duration=5.0),
    Fault(fault="drop_zmq", target="kv_relay_1", fraction=0.3, duration=3.0),
    Fault(fault="delay_zmq", target="metrics", fraction=0.5, delay=0.05, duration=3.0),
    Fault(fault="reset_sequence", rank=0),
    Fault(fault="cut_nats", duration=2.0),
    Fault(fault="fail_probes", count=2),
    Fault(fault="slow_engine", factor=2.0, duration=3.0),
    # to node 1, which a new node replaces 2 s after it left discovery
    NodeFault(at=0.0, signal="kill", restart_after=2.0),
    NodeFault(at=0.0, signal="term", restart_after=2.0),
]


def _sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "processes": len(descendants(pid)),
    }


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 900)  # the run, start, stop and recovery waits
def test_ten_minutes_of_random_faults_under_load(tmp_path: Path) -> None:
    rng = random.Random(2026)
    faults: list[Fault] = []
    node_faults: list[NodeFault] = []
    at = 10.0
    while at < SOAK_SECONDS - 20:
        kind = rng.choice(KINDS)
        if isinstance(kind, NodeFault):
            node_faults.append(msgspec.structs.replace(kind, at=round(at, 1)))
        else:
            faults.append(msgspec.structs.replace(kind, at=round(at, 1)))
        at += rng.uniform(4.0, 10.0)
    scenario = Scenario(
        name="soak",
        duration=SOAK_SECONDS,
        config="configs/chaos/soak-node.toml",
        # 150-token streams (~1.5 s) outlive the 1 s drain: a stopped node hands some over
        load=Load(clients=8, max_tokens=150, deadline=30.0, lost_after=3.0),
        faults=faults,
        nodes=2,
        node_faults=node_faults,
        recovery_timeout=60.0,
    )
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()

    def watch(node: NodeUnderTest) -> None:
        started = time.monotonic()

        def loop() -> None:
            while not done.wait(5.0):
                samples.append((time.monotonic() - started, _sample(node.proc.pid)))

        threading.Thread(target=loop, daemon=True).start()

    verdict = run_scenario(scenario, tmp_path, on_ready=watch)
    done.set()
    warm = [s for t, s in samples if t >= WARM_UP]
    report = {
        "faults": len(faults) + len(node_faults),
        "node_faults": collections.Counter(f.signal for f in node_faults),
        "sent": verdict.sent,
        "completed": verdict.completed,
        "migrated": verdict.migrated,
        "errors": verdict.errors,
        "stream_lost": verdict.stream_lost,
        "refused": verdict.refused,
        "lost": verdict.lost,
        "rss_kb_after_warm_up": warm[0]["rss_kb"],
        "rss_kb_max": max(s["rss_kb"] for s in warm),
        "rss_kb_end": warm[-1]["rss_kb"],
        "threads": (warm[0]["threads"], warm[-1]["threads"]),
        "fds": (warm[0]["fds"], warm[-1]["fds"]),
        "processes": (warm[0]["processes"], warm[-1]["processes"]),
        "restarts": verdict.restarts,
    }
    (Path(__file__).parent / "soak-result.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    assert verdict.lost == 0
    assert verdict.errors == {}
    assert verdict.stream_lost == 0
    assert verdict.recovered
    assert report["rss_kb_max"] <= warm[0]["rss_kb"] * 1.10
    assert warm[-1]["threads"] <= warm[0]["threads"] + 2
    assert warm[-1]["fds"] <= warm[0]["fds"] + 5
    assert warm[-1]["processes"] == warm[0]["processes"]
