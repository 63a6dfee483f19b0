"""What sgl-node does while nothing is asked: the peer benchmark's sgl-node system (a
frontend and two sim nodes on one nats-server, `tests/benchmarks/_peer_systems.py`),
left alone, per process: CPU (% of one core) and wake-ups per second (voluntary context
switches of all its threads), and the threads that wake most. The comparison with Dynamo
is the peer benchmark's idle row (`tests/benchmarks/peer.py`); this one says where sgl-node's
idle time goes.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.idle
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from tests.benchmarks._common import table, write_section
from tests.benchmarks._peer_systems import SglNode
from tests.node.harness import descendants

SETTLE = 15.0  # seconds after the start before measuring (start-up work done)
WINDOW = float(os.environ.get("SGL_NODE_BENCH_IDLE_SECONDS", "60"))
TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[int, tuple[int, int, str]]:
    """tid → (CPU ticks, voluntary context switches, name) of a live process."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
            switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(task.name)] = (
            int(fields[11]) + int(fields[12]),
            int(switches.group(1)) if switches else 0,
            name,
        )
    return out


def main() -> None:
    system = SglNode(Path(tempfile.mkdtemp(prefix="bench-idle-")), zero_cost=False)
    try:
        time.sleep(SETTLE)
        fe = system.frontend.proc.proc.pid
        roles = {"frontend": fe, "nats-server": system.server.proc.pid}
        for i, node in enumerate(system.nodes):
            roles[f"node {i}"] = node.proc.pid
            for pid in descendants(node.proc.pid):
                roles[f"node {i} engine host (sim)"] = pid
        before = {role: _threads(pid) for role, pid in roles.items()}
        time.sleep(WINDOW)
        after = {role: _threads(pid) for role, pid in roles.items()}
    finally:
        system.stop()
    rows, busiest, total_cpu, total_wakes = [], [], 0.0, 0.0
    for role in roles:
        cpu = wakes = 0.0
        for tid, (ticks, switches, name) in after[role].items():
            ticks0, switches0, _ = before[role].get(tid, (0, 0, name))
            t_cpu = (ticks - ticks0) / TICK / WINDOW * 100
            t_wakes = (switches - switches0) / WINDOW
            cpu, wakes = cpu + t_cpu, wakes + t_wakes
            busiest.append((t_wakes, t_cpu, role, tid))
        rows.append((role, cpu, wakes, len(after[role])))
        total_cpu, total_wakes = total_cpu + cpu, total_wakes + wakes
    rows.append(("all", total_cpu, total_wakes, sum(r[3] for r in rows)))
    top = sorted(busiest, reverse=True)[:8]
    body = (
        f"{WINDOW:.0f} s of nothing asked, {SETTLE:.0f} s after the start; CPU from "
        "/proc/PID/task/*/stat (utime + stime), wake-ups from each thread's voluntary "
        "context switches.\n\n"
        + table(["process", "CPU (% of a core)", "wake-ups/s", "threads"], rows)
        + "\n\nThe threads that wake most:\n\n"
        + table(
            ["wake-ups/s", "CPU (% of a core)", "process", "thread id"],
            [(w, c, role, tid) for w, c, role, tid in top],
        )
    )
    write_section("idle", "sgl-node at rest (frontend + two sim nodes)", body)


if __name__ == "__main__":
    main()
