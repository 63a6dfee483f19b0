"""What the node adds to TTFT, per request, by how long the machine sat idle before it.

One node with the real engine; a client process sends one request at a time, after an idle
gap that cycles through GAPS (so drift hits every gap alike). Each measured request follows
an unmeasured one to the same target after the same gap, so the gap is exactly how long
that target sat idle. Before and after each request
the node's /metrics give SGLang's own TTFT (its tokenizer manager taking the request →
first token, the span the in-process contender of `request_path` measures) and the node's
(its NATS callback → first chunk handed to NATS) for exactly that request, so each request
yields two exact differences: node − SGLang (the node and its engine host) and client −
SGLang (all the node adds, NATS included). Medians per gap.

The baselines, in the same run and after the same gaps: a bare nats-py request/reply to a
responder in a process of its own (one NATS hop each way, nothing else), and a bare ZMQ
round trip to another process shaped like the engine host channel (PUSH/PULL over ipc each
way, a thread blocked in a poll at the far end) — what waking an idle process costs on
this machine, whatever the process. The target (issue 18): what the node adds to the
client's TTFT (client − SGLang), at p50, is at most one of each (their p50s added), back
to back and after 1 s idle.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.ttft_idle
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import zmq

from supervisor.client import NodeClient
from tests.benchmarks import _workload
from tests.benchmarks._common import median, percentile, python, table, write_section
from tests.benchmarks.request_path import Node

GAPS = (0.0, 0.25, 1.0, 3.0)  # seconds of idle before a request
ROUNDS = 15  # measured requests per gap and target
_ECHO = "bench.ttft_idle.echo"
_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def on(msg):
        await msg.respond(b"x")
    await nc.subscribe(sys.argv[2], cb=on)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
_ZMQ_RESPONDER = """
import sys, zmq
ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
pull.bind(sys.argv[1]); push.bind(sys.argv[2])
print("ready", flush=True)
poller = zmq.Poller(); poller.register(pull, zmq.POLLIN)
while True:
    poller.poll()
    push.send(pull.recv())
"""


Samples = dict[float, list[dict[str, float]]]


def measure(node: Node, tmp: Path) -> tuple[Samples, Samples]:
    samples: Samples = {gap: [] for gap in GAPS}
    bare: Samples = {gap: [] for gap in GAPS}
    context = zmq.Context()
    to_far, from_far = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    from_far.setsockopt(zmq.RCVTIMEO, 10_000)  # a responder gone: an error, not a hang
    ends = (f"ipc://{tmp}/bare-in", f"ipc://{tmp}/bare-out")

    async def one(client: NodeClient) -> float:
        sent = time.monotonic()
        first = None
        async for chunk in client.generate(_workload.node_request()):
            if first is None and chunk.token_ids:
                first = time.monotonic() - sent
        assert first is not None, "the stream ended without a token"
        return first

    async def echo(client: NodeClient) -> float:
        assert client.nc is not None
        sent = time.monotonic()
        await client.nc.request(_ECHO, b"y", timeout=10)
        return time.monotonic() - sent

    def zmq_echo() -> float:
        sent = time.monotonic()
        to_far.send(b"y")
        from_far.recv()
        return time.monotonic() - sent

    async def go() -> None:
        async with NodeClient(node.node.url) as client:
            for _ in range(3):  # warm up
                await one(client)
                await echo(client)
                zmq_echo()
            for round_ in range(ROUNDS):
                print(f"round {round_ + 1}/{ROUNDS}", flush=True)
                for gap in GAPS:
                    await one(client)  # then the node sat idle exactly `gap` seconds
                    before = node.ttft_sums()
                    await asyncio.sleep(gap)
                    client_ttft = await one(client)
                    after = node.ttft_sums()
                    if any(after[k][1] - before[k][1] != 1 for k in after):
                        continue  # not exactly one request in the histograms: skip it
                    node_ttft = after["node"][0] - before["node"][0]
                    sglang_ttft = after["sglang"][0] - before["sglang"][0]
                    samples[gap].append(
                        {"client": client_ttft, "node": node_ttft, "sglang": sglang_ttft}
                    )
                    await echo(client)  # the same for the bare responders
                    await asyncio.sleep(gap)
                    nats_rtt = await echo(client)
                    zmq_echo()
                    await asyncio.sleep(gap)
                    bare[gap].append({"nats": nats_rtt, "zmq": zmq_echo()})

    responder = python("-c", _RESPONDER, node.node.url, _ECHO, stdout=subprocess.PIPE)
    zmq_responder = python("-c", _ZMQ_RESPONDER, *ends, stdout=subprocess.PIPE)
    try:
        assert responder.stdout is not None
        assert zmq_responder.stdout is not None
        responder.stdout.readline()
        zmq_responder.stdout.readline()
        to_far.connect(ends[0])
        from_far.connect(ends[1])
        asyncio.run(go())
    finally:
        for process in (responder, zmq_responder):
            process.kill()
            process.wait()
        context.destroy(linger=0)
    return samples, bare


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ttft-idle-"))
    node = Node(tmp)
    try:
        samples, bare = measure(node, tmp)
    finally:
        node.stop()
    rows, verdicts = [], []
    for gap, runs in samples.items():
        ms = {k: [r[k] * 1000 for r in runs] for k in ("client", "node", "sglang")}
        node_added = [n - s for n, s in zip(ms["node"], ms["sglang"], strict=True)]
        all_added = [c - s for c, s in zip(ms["client"], ms["sglang"], strict=True)]
        nats_p50 = median([b["nats"] * 1000 for b in bare[gap]])
        zmq_p50 = median([b["zmq"] * 1000 for b in bare[gap]])
        budget = nats_p50 + zmq_p50
        rows.append(
            (
                f"{gap:g}",
                len(runs),
                median(ms["sglang"]),
                median(ms["client"]),
                median(node_added),
                percentile(node_added, 90),
                median(all_added),
                percentile(all_added, 90),
                nats_p50,
                zmq_p50,
                "met" if median(all_added) <= budget else "missed",
            )
        )
        if gap in (0.0, 1.0):
            verdicts.append(
                f"{gap:g} s idle: client − SGLang p50 {median(all_added):.2f} ms against "
                f"{budget:.2f} ms ({'met' if median(all_added) <= budget else 'missed'})"
            )
    body = (
        f"SmolLM2-135M-Instruct, SGLang on the CPU with the node's engine settings; prompt of "
        f"{len(_workload.PROMPT)} characters, {_workload.MAX_TOKENS} output tokens (EOS ignored, greedy); "
        f"one request at a time, each after an idle gap cycling through {', '.join(f'{g:g}' for g in GAPS)} s; "
        f"{ROUNDS} requests per gap. Per request, from the node's /metrics: SGLang's own TTFT "
        "and the node's (NATS callback → first chunk handed to NATS); the client's TTFT from the "
        "client process. Medians (and p90) of the per-request differences, in ms. The node's "
        "engine host tokenizes the prompt before SGLang's span starts, so node − SGLang includes "
        "one tokenization that an in-process caller pays inside SGLang's span. The baseline: "
        "a bare nats-py request/reply to a responder in its own process, after the same gaps "
        f"({ROUNDS} each).\n\n"
        + table(
            [
                "idle before, s",
                "requests",
                "SGLang TTFT p50",
                "client TTFT p50",
                "node − SGLang p50",
                "p90",
                "client − SGLang p50",
                "p90",
                "bare NATS request/reply p50",
                "bare ZMQ round trip p50",
                "client − SGLang ≤ NATS + ZMQ",
            ],
            rows,
        )
        + "\n\nTarget (issue 18, replacing issue 6's fixed 2 ms): what the node adds to the "
        "client's TTFT at p50 is at most one bare NATS request/reply plus one bare ZMQ round "
        "trip, back to back and after 1 s idle: " + "; ".join(verdicts) + "."
    )
    write_section("ttft_idle", "TTFT added by the node, by idle time before the request", body)


if __name__ == "__main__":
    main()
