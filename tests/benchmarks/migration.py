"""The pause a continuation costs: for each fault, the gap between the last chunk a stream
got before the fault and the first after it (its seam), beside the same streams' ordinary
gap between chunks in the same run (the baseline); and the output rate of the node that
takes the moved streams on, before and while it absorbs them.

Two sim nodes (10 ms decode steps) on one NATS server, 8 streams of 300 tokens pinned
four to each, through the client library; the fault hits node A once every stream has
10 chunks. Then two real-engine nodes (SmolLM2 on the CPU), 4 greedy streams, two on the
node hit: its engine host killed, its scheduler killed, the whole node killed.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.migration
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.chaos import scheduler_pids
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.benchmarks._common import median, percentile, table, write_section
from tests.node.harness import NatsServer, NodeProcess, admin_request, start_node

RUNS = int(os.environ.get("SGL_NODE_BENCH_RUNS", "3"))
TOKEN = "bench-" + uuid.uuid4().hex
STREAMS = 8
TOKENS = 300
Timed = list[tuple[float, StreamChunk]]


def _host_pid(node: NodeProcess) -> int:
    _, body = node.http("/tree")
    core = {r["id"]: r for r in json.loads(body)["children"]}["core"]
    engine = {r["id"]: r for r in core["children"]}["engine"]
    return int({r["id"]: r for r in engine["children"]}["engine_host"]["pid"])


def _admin(node: NodeProcess, **fault: Any) -> None:
    reply = asyncio.run(admin_request(node, TOKEN, "chaos", **fault))
    assert reply.ok, reply


def _start(tmp: Path, name: str, url: str, backend: str = "sim") -> NodeProcess:
    token = tmp / "token"
    token.write_text(TOKEN)
    return start_node(
        tmp,
        backend=backend,
        name=f"{name}-{uuid.uuid4().hex[:6]}",
        embedded_nats=not url,
        nats_url=url,
        engine__sim={"decode_time_per_step": 0.01},
        # the sim's SIGSTOP fault waits out a 2 s stall timeout; SGLang's first batches on a
        # busy CPU are no stall
        engine__health={"stall_timeout": 2.0 if backend == "sim" else 120.0},
        shutdown={"drain_timeout": 1.0},
        admin={"enabled": True, "token_file": str(token)},
        chaos={"enabled": True},
        supervision={"backoff_initial": 0.0, "intensity": 100},
    )


async def _streams(
    url: str, targets: list[str], request: Callable[[], GenerateRequest], fault: Callable[[], None]
) -> list[Timed]:
    async with NodeClient(url) as client:
        ready = [asyncio.Event() for _ in targets]

        async def stream(i: int) -> Timed:
            timed: Timed = []
            async for chunk in client.generate(request(), instance_id=targets[i], idle_timeout=300):
                timed.append((time.monotonic(), chunk))
                if len(timed) >= 10:
                    ready[i].set()
            return timed

        tasks = [asyncio.create_task(stream(i)) for i in range(len(targets))]
        await asyncio.gather(*(e.wait() for e in ready))
        await asyncio.get_running_loop().run_in_executor(None, fault)
        return list(await asyncio.gather(*tasks))


def _measure(results: list[Timed]) -> tuple[list[float], list[float], int, float]:
    """Seam gaps, ordinary gaps, streams that did not complete, when the last seam ended."""
    seams, gaps, failed, last = [], [], 0, 0.0
    for timed in results:
        failed += timed[-1][1].finish_reason != "length"
        for (t0, c0), (t1, c1) in itertools.pairwise(timed):
            if c1.migrations > c0.migrations:
                seams.append(t1 - t0)
                last = max(last, t1)
            else:
                gaps.append(t1 - t0)
    return seams, gaps, failed, last


def _request() -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt="migrate", stop=StopConditions(max_tokens=TOKENS)
    )


def _rate(results: list[Timed], start: float, end: float) -> float:
    """Tokens per second the streams got in [start, end), the window cut to begin with
    their first chunk (streams hit early have run for less than the window)."""
    first = min((timed[0][0] for timed in results if timed), default=start)
    start = max(start, first)
    tokens = sum(len(c.token_ids) for timed in results for t, c in timed if start <= t < end)
    return tokens / (end - start) if end > start else float("nan")


Fault = Callable[[list[NodeProcess]], None]


def _run_faults(
    tmp: Path,
    backend: str,
    faults: dict[str, Fault],
    streams: int,
    runs: int,
    request: Callable[[], GenerateRequest],
) -> list[tuple[Any, ...]]:
    """Two nodes of `backend` on one NATS server; for each fault, `runs` times: `streams`
    streams, half on node A, which the fault hits once each has 10 chunks (node A is
    replaced after a fault that ends it). One table row per fault."""
    engine = "sim" if backend == "sim" else "SGLang"
    start_timeout = 60 if backend == "sim" else 600
    server = NatsServer(tmp)
    nodes = [_start(tmp, f"{backend}-a", server.url, backend)]
    nodes.append(_start(tmp, f"{backend}-b", server.url, backend))
    rows: list[tuple[Any, ...]] = []
    try:
        for node in nodes:
            node.wait_ready(start_timeout)
        for what, fault in faults.items():
            seams: list[float] = []
            gaps: list[float] = []
            absorb: list[float] = []
            failed = 0
            for _ in range(runs):
                targets = [nodes[i % 2].instance_id for i in range(streams)]
                at = [0.0]

                def hit(fault: Fault = fault, at: list[float] = at) -> None:
                    at[0] = time.monotonic()
                    fault(nodes)

                results = asyncio.run(_streams(server.url, targets, request, hit))
                s, g, f, last = _measure(results)
                seams, gaps, failed = seams + s, gaps + g, failed + f
                before = _rate(results[1::2], at[0] - 1.0, at[0])  # node B's streams
                after = _rate(results, last, last + 1.0) if last else float("nan")
                absorb.append(after / before if before else float("nan"))
                if nodes[0].proc.poll() is not None:  # stopped or killed: a fresh node A
                    nodes[0] = _start(tmp, f"{backend}-a", server.url, backend)
                nodes[0].wait_ready(start_timeout)
            rows.append(_row(what, engine, seams, gaps, failed, median(absorb)))
    finally:
        for node in nodes:
            node.kill()
        server.stop()
    return rows


def _row(
    what: str, engine: str, seams: list[float], gaps: list[float], failed: int, absorb: float
) -> tuple[Any, ...]:
    return (
        what,
        engine,
        len(seams),
        failed,
        percentile(seams, 50),
        percentile(seams, 99),
        percentile(gaps, 50) * 1000,
        absorb,
    )


def _engine_host_kill(nodes: list[NodeProcess]) -> None:
    os.kill(_host_pid(nodes[0]), signal.SIGKILL)


def _node_kill(nodes: list[NodeProcess]) -> None:
    nodes[0].kill()


def _scheduler_kill(nodes: list[NodeProcess]) -> None:
    for pid in scheduler_pids(_host_pid(nodes[0])):
        os.kill(pid, signal.SIGKILL)


SIM_FAULTS: dict[str, Fault] = {
    "engine host kill -9 (same node)": _engine_host_kill,
    "handler crash (same node)": lambda n: _admin(
        n[0], fault="crash_actor", target="core/handlers/handler-1"
    ),
    "SIGSTOP past the 2 s stall timeout (same node)": lambda n: _admin(
        n[0], fault="stop_engine_host", duration=6.0
    ),
    "SIGTERM, 1 s drain (handed to node B)": lambda n: n[0].proc.send_signal(signal.SIGTERM),
    "node kill -9 (client moves it to node B)": _node_kill,
}
REAL_FAULTS: dict[str, Fault] = {
    "engine host kill -9 (same node)": _engine_host_kill,
    "scheduler kill -9 (same node)": _scheduler_kill,
    "node kill -9 (client moves it to node B)": _node_kill,
}


def _real_request() -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt="Count from one to fifty:",
        stop=StopConditions(max_tokens=60),
    )


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    rows = _run_faults(tmp, "sim", SIM_FAULTS, STREAMS, RUNS, _request)
    rows += _run_faults(tmp, "sglang", REAL_FAULTS, 4, max(1, RUNS // 2), _real_request)
    header = [
        "fault",
        "engine",
        "seams",
        "not completed",
        "pause p50 (s)",
        "pause p99 (s)",
        "ordinary gap p50 (ms)",
        "output rate after / before",
    ]
    body = (
        f"{RUNS} runs per sim fault of {STREAMS} streams x {TOKENS} tokens (sim, 10 ms decode "
        "steps), half on the node hit; the real engine: two nodes serving SmolLM2-135M-Instruct "
        f"on the CPU, {max(1, RUNS // 2)} run(s) per fault of 4 greedy streams of 60 tokens, "
        "half on the node hit. *Pause*: from the last chunk before a "
        "stream's seam to the first after it (each seam is one stream moved or continued). "
        "*Ordinary gap*: between the other chunks of the same streams (the baseline). *Output "
        "rate*: tokens per second over all streams in the second after the last seam, over the "
        "surviving node's rate in the second before the fault (or since its streams began, if less). Restart backoff is off "
        "(`supervision.backoff_initial = 0`), as in the recovery benchmark. With the real "
        "engine the rate column says little: its 60-token streams (~5 s) end long before an "
        "engine restart, so after the last seam only the moved streams run (n/a: a window "
        "without any token, so no ratio).\n\n" + table(header, rows)
    )
    write_section("migration", "The pause a continuation costs", body)


if __name__ == "__main__":
    main()
