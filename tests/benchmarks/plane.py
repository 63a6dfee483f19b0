"""Plane capacity: requests/s and streamed chunks/s one node sustains (sim engine at zero
cost), against a bare nats-py responder in the same run (the ceiling). Target: ≥ 0.5.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.plane
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from tests.benchmarks._common import median, python, table, write_section
from tests.node.harness import NatsServer, start_node

RUNS = 5
SECONDS = 5.0
CONCURRENCY = 32
TOKENS = 16


def load(url: str, subject: str) -> dict[str, float]:
    proc = python(
        "-m",
        "tests.benchmarks._load",
        url,
        subject,
        str(CONCURRENCY),
        str(SECONDS),
        str(TOKENS),
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=SECONDS + 120)
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "rps": result["requests"] / result["seconds"],
        "cps": result["chunks"] / result["seconds"],
        "per_request": result["completed_chunks"] / max(1, result["requests"]),
        "errors": result["errors"],
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-plane-"))
    server = NatsServer(tmp)
    bare = python(
        "-m",
        "tests.benchmarks._bare_responder",
        server.url,
        "bench.bare.generate",
        stdout=subprocess.PIPE,
    )
    assert bare.stdout is not None
    bare.stdout.readline()
    node = start_node(
        tmp,
        embedded_nats=False,
        nats_url=server.url,
        engine__sim={
            "decode_time_per_step": 0.0,
            "prefill_time_per_token": 0.0,
            "max_batch_size": 256,
        },
        handlers={"count": 2, "max_inflight": 1024},
        logging={"level": "warning"},
        # No idle canary: it would run on the node while the bare responder is measured.
        engine__health={"canary_after_idle": 86400.0},
    )
    try:
        node.wait_ready(60)
        results: dict[str, list[dict[str, float]]] = {"bare": [], "node": []}
        for _ in range(RUNS):  # alternate, so drift hits both
            results["bare"].append(load(server.url, "bench.bare.generate"))
            results["node"].append(load(server.url, "dynamo.backend.generate"))
        rows = []
        for name in ("bare", "node"):
            rps = median([r["rps"] for r in results[name]])
            cps = median([r["cps"] for r in results[name]])
            per_request = median([r["per_request"] for r in results[name]])
            errors = sum(r["errors"] for r in results[name])
            rows.append((name, rps, cps, per_request, errors))
        ratio_rps = rows[1][1] / rows[0][1]
        ratio_cps = rows[1][2] / rows[0][2]
        body = (
            f"{CONCURRENCY} concurrent streams of {TOKENS} tokens for {SECONDS:g} s per run; "
            f"{RUNS} runs per contender, alternating; medians. One nats-server; the load generator in its own process. "
            "The bare responder sends one chunk per token, the last with the finish reason; "
            "the node does too unless it is behind its engine, when it merges a request's "
            "chunks that reached it together (at zero cost it is: fewer, larger chunks), so "
            "the target is on requests/s, the same work for both. *chunks/request* is what "
            "the load generator received per completed request.\n\n"
            + table(["contender", "requests/s", "chunks/s", "chunks/request", "errors"], rows)
            + f"\n\nnode / bare: **{ratio_rps:.2f}** (requests/s), **{ratio_cps:.2f}** (chunks/s); target ≥ 0.5 (requests/s)."
        )
        write_section("plane", "Plane capacity (sim engine at zero cost)", body)
    finally:
        node.kill()
        bare.kill()
        server.stop()


if __name__ == "__main__":
    main()
