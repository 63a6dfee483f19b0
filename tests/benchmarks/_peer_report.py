"""The peer benchmark's section of RESULTS.md: medians per cell, then the targets."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from tests.benchmarks import peer_env
from tests.benchmarks._common import median, table, write_section

SYSTEMS = ("sgl-node", "dynamo")


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in runs])


def _rows(found: dict[str, Any], mode: str) -> list[list[Any]]:
    rows = []
    for (name, conc), runs in sorted(
        found["runs"].items(), key=lambda kv: (kv[0][1], kv[0][0] != "sgl-node")
    ):
        rows.append(
            [
                mode, conc, name, len(runs),
                _med(runs, "rps"), _med(runs, "tps"),
                f"{_med(runs, 'ttft_p50'):.1f} / {_med(runs, 'ttft_p99'):.1f}",
                f"{_med(runs, 'itl_p50'):.2f} / {_med(runs, 'itl_p99'):.2f}",
                f"{_med(runs, 'cpu_frontend'):.3f} / {_med(runs, 'cpu_framework'):.3f} / "
                f"{_med(runs, 'cpu_engine'):.3f}",
                f"{_med(runs, 'hit_rate'):.0%}",
                sum(r["errors"] for r in runs),
                f"{_med(runs, 'others_cores'):.2f}",
            ]
        )  # fmt: skip
    return rows


def _targets(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for mode, found in results.items():
        for conc in (1, 16, 64):
            ours = found["runs"].get(("sgl-node", conc), [])
            theirs = found["runs"].get(("dynamo", conc), [])
            if not ours or not theirs:
                continue
            ours_fw = _med(ours, "cpu_frontend") + _med(ours, "cpu_framework")
            theirs_fw = _med(theirs, "cpu_frontend") + _med(theirs, "cpu_framework")
            rows.append(
                [
                    mode, conc,
                    f"{_med(ours, 'rps') / _med(theirs, 'rps'):.2f}",
                    f"{_med(ours, 'ttft_p50') - _med(theirs, 'ttft_p50'):+.1f}",
                    f"{ours_fw:.3f} / {theirs_fw:.3f}",
                ]
            )  # fmt: skip
    return rows


def _versions(root: str) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    load = os.getloadavg()
    return (
        f"sgl-node {commit or '?'}; ai-dynamo / ai-dynamo-runtime {peer_env.DYNAMO} (peer "
        f"environment {peer_env.env_key()}); load average at the end {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )


def write(results: dict[str, Any], quick: bool, root: str) -> None:
    """Rewrite the `peer` section of RESULTS.md."""
    rows = [row for mode, found in results.items() for row in _rows(found, mode)]
    idle = results["timed"]["idle"]
    faults = results["timed"]["fault"]
    body = [
        f"{'Quick run (one 3 s run per cell). ' if quick else 'Three 6 s runs per cell, alternating A B A B. '}"
        "sgl-node frontend + two sim nodes vs `dynamo.frontend` + two `dynamo.mocker`; ~530-token "
        "chat prompts in 8 shared-prefix groups, 64 output tokens, streamed by one plain asyncio "
        "HTTP/1.1 keep-alive client. Timed: sim 5.7 ms/decode step, 0.0152 ms/prompt token (the "
        "mocker at speedup 1, which also pays ~17 ms per prefill step); zero: sim at 0, mocker at "
        "speedup 1000. CPU s per 1k output tokens: frontend / framework (sgl-node: nodes + "
        "nats-server; Dynamo: the mocker workers, whose runtime and engine emulation share a "
        "process) / engine (sgl-node's sim hosts). Hit rate: sgl-node, cached / prompt tokens "
        "from the usage; Dynamo, its KV router's predicted hit rate (the mocker reports no "
        "cached tokens). 'others': cores busy with processes outside the benchmark (the machine "
        "is shared).",
        f"Versions: {_versions(root)}.",
        table(
            [
                "engines",
                "conc",
                "system",
                "runs",
                "req/s",
                "out tok/s",
                "TTFT p50 / p99 ms",
                "ITL p50 / p99 ms",
                "CPU s/1k tok fe / fw / engine",
                "hit rate",
                "errors",
                "others (cores)",
            ],
            rows,
        ),
        "Against the targets (sgl-node / Dynamo req/s ≥ 1 at zero cost, c = 16 and 64; TTFT "
        "p50 difference ≤ +2 ms; framework CPU = frontend + framework, Dynamo's including its "
        "engine emulation):",
        table(
            ["engines", "conc", "req/s ratio", "TTFT p50 Δ ms", "framework CPU s/1k tok"],
            _targets(results),
        ),
        "Idle CPU (% of one core, all processes of the system, timed engines): "
        + ", ".join(f"{k} {v:.1f} %" for k, v in idle.items()),
    ]
    if faults:
        body.append(
            "Fault round (16 streams of 512 tokens, timed engines, SIGKILL of one worker once "
            "all have begun): " + "; ".join(f"{k} {v['outcomes']}" for k, v in faults.items())
        )
    write_section("peer", "Against NVIDIA Dynamo (frontend + two workers)", "\n\n".join(body))
