"""Routing: KV-aware vs round-robin through the OpenAI frontend, on a shared-prefix workload.

Four sim nodes (0.5 ms per uncached prompt token, 10 ms per decode step) on one NATS, two
frontends on them (`kv` and `round_robin`). A run: G groups of R chat requests; the
requests of a group share a long system prompt (~1500 tokens) and differ in their
question; the order is shuffled (seeded), 8 requests in flight at a time, streamed.
Figures per run: prefix-cache hit rate (Σ cached / Σ prompt tokens, from the usage),
TTFT p50 / p99, requests per second; the table holds the medians over the runs, which
alternate between the policies (each run uses fresh prefixes, and the nodes hold enough
KV blocks that nothing is evicted across runs).

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.routing
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from tests.benchmarks._common import median, percentile, table, write_section
from tests.frontend.harness import Frontend, start_frontend
from tests.node.harness import NatsServer, NodeProcess, start_node

RUNS = int(os.environ.get("SGL_NODE_BENCH_RUNS", "5"))
NODES = 4
GROUPS = 8
PER_GROUP = 8
CONCURRENCY = 8
MAX_TOKENS = 16
SIM = {
    "prefill_time_per_token": 0.0005,
    "decode_time_per_step": 0.01,
    "num_blocks": 16384,  # no eviction across runs: each run's figures are its own
}


def _system_prompt(tag: str, group: int) -> str:
    line = f"[{tag} group {group}] Answer briefly, cite the manual, and be kind to the user."
    return "\n".join(f"{i}: {line}" for i in range(18))


async def _run(frontend: Frontend, tag: str, seed: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(
        base_url=frontend.base_url, api_key="not-needed", max_retries=0, timeout=120
    )
    work = [(g, r) for g in range(GROUPS) for r in range(PER_GROUP)]
    random.Random(seed).shuffle(work)
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    ttft: list[float] = []
    totals = {"prompt": 0, "cached": 0}

    async def worker() -> None:
        while not queue.empty():
            group, turn = queue.get_nowait()
            sent = time.monotonic()
            first = None
            stream = await client.chat.completions.create(
                model="sim",
                messages=[
                    {"role": "system", "content": _system_prompt(tag, group)},
                    {"role": "user", "content": f"question {turn} for group {group}?"},
                ],
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - sent
                if chunk.usage is not None:
                    totals["prompt"] += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    totals["cached"] += (details.cached_tokens or 0) if details else 0
            ttft.append(first if first is not None else time.monotonic() - sent)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started
    await client.close()
    return {
        "hit_rate": totals["cached"] / max(1, totals["prompt"]),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "rps": len(work) / elapsed,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    server = NatsServer(tmp)
    nodes: list[NodeProcess] = []
    frontends: dict[str, Frontend] = {}
    results: dict[str, list[dict[str, float]]] = {"kv": [], "round_robin": []}
    try:
        for i in range(NODES):
            nodes.append(
                start_node(
                    tmp,
                    name=f"n{i}",
                    embedded_nats=False,
                    nats_url=server.url,
                    engine__sim=SIM,
                    logging={"level": "warning"},
                )
            )
        for policy in results:
            frontends[policy] = start_frontend(tmp, server.url, name=policy, routing=policy)
        for node in nodes:
            node.wait_ready(120)
        for frontend in frontends.values():
            frontend.wait_instances(NODES)
        for run in range(RUNS):
            for policy, runs in results.items():  # alternating
                figures = asyncio.run(_run(frontends[policy], f"{policy}-{run}", seed=run))
                runs.append(figures)
                print(policy, run, figures, flush=True)
    finally:
        for frontend in frontends.values():
            frontend.kill()
        for node in nodes:
            node.kill()
        server.stop()
    rows: list[list[Any]] = []
    for policy, runs in results.items():
        rows.append(
            [
                policy,
                len(runs),
                f"{median([r['hit_rate'] for r in runs]):.1%}",
                median([r["ttft_p50"] for r in runs]) * 1000,
                median([r["ttft_p99"] for r in runs]) * 1000,
                median([r["rps"] for r in runs]),
            ]
        )
    body = (
        f"{NODES} sim nodes (0.5 ms per uncached prompt token, 10 ms per decode step), one "
        f"frontend per policy on the same nodes. A run: {GROUPS} groups × {PER_GROUP} chat "
        f"requests sharing a ~1500-token system prompt per group, shuffled, {CONCURRENCY} in "
        f"flight, {MAX_TOKENS} tokens each, streamed through the official openai client. "
        "Hit rate = Σ cached / Σ prompt tokens (the usage's `cached_tokens`). Medians over "
        "the runs, which alternate between the policies.\n\n"
        + table(
            [
                "routing",
                "runs",
                "prefix-cache hit rate",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "requests/s",
            ],
            rows,
        )
    )
    write_section("routing", "KV-aware routing vs round-robin (frontend, sim nodes)", body)


if __name__ == "__main__":
    main()
