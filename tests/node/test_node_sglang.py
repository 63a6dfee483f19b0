"""The node with the real SGLang engine on the CPU and the built-in SmolLM2 model.

The session's shared real-engine node (tests/conftest.py) serves the module; the kill
tests restart its engine subtree and wait until it serves again. A second node runs
dp_size 2 and is killed with -9 mid-stream at the end; the client continues its streams
on the shared node. (An ordered stop's hand-over at the drain deadline is the same on
both engines and tested on the sim: tests/node/test_continuation.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.chaos import scheduler_pids
from messages.codec import decode_json, encode_json
from messages.kv import BlockStored, KvEventBatch, block_hashes
from messages.metrics import LoadMetrics
from messages.request import (
    ChatMessage,
    GenerateRequest,
    ResumeReply,
    ResumeRequest,
    SamplingOptions,
    StopConditions,
    StreamChunk,
)
from supervisor.client import NodeClient
from tests.node.harness import (
    ROOT,
    NodeProcess,
    descendants,
    process_title,
    start_node,
    until,
    watching,
)
from tests.supervision.children import pid_alive, wait_until

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def node(sglang_fleet: dict[str, Any]) -> NodeProcess:
    node: NodeProcess = sglang_fleet["node"]
    node.wait_ready(300)
    return node


def chat(max_tokens: int = 32, **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=QUESTION)],
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=max_tokens),
        **kw,
    )


async def collect(client: NodeClient, request: GenerateRequest) -> list[tuple[float, StreamChunk]]:
    return [(time.monotonic(), chunk) async for chunk in client.generate(request, idle_timeout=120)]


def test_the_cli_in_its_own_process_answers_paris(node: NodeProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.client", "--nats", node.url, "generate", QUESTION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chunks_arrive_incrementally(node: NodeProcess) -> None:
    async def go() -> list[tuple[float, StreamChunk]]:
        async with NodeClient(node.url) as client:
            return await collect(client, chat(max_tokens=24))

    timed = asyncio.run(go())
    chunks = [c for _, c in timed]
    assert "Paris" in "".join(c.text for c in chunks)
    with_tokens = [t for t, c in timed if c.token_ids]
    assert len(with_tokens) >= 5  # one chunk per token or so, not one blob
    assert with_tokens[-1] - with_tokens[0] > 0.05  # spread over time as generated
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None

    # The node kept the stream's chunks: asked again (as after a loss in transit), it
    # sends the very same ones, whichever engine made them.
    async def again() -> ResumeReply:
        async with NodeClient(node.url) as client:
            assert client.nc is not None
            ask = encode_json(ResumeRequest(chunks[0].request_id, from_index=1))
            msg = await client.nc.request("dynamo.backend.resume", ask, timeout=5)
            return decode_json(msg.data, ResumeReply)

    answer = asyncio.run(again())
    assert answer.ended
    assert answer.chunks == chunks[1:]


def test_cancel_mid_stream_ends_cancelled_and_sglang_counts_the_abort(node: NodeProcess) -> None:
    def aborted() -> float:
        _, body = node.http("/metrics")
        lines = [
            line
            for line in body.decode().splitlines()
            if line.startswith("sglang:num_aborted_requests_total")
        ]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = aborted()

    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            request = GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompt="Write a very long story about a lighthouse keeper.",
                stop=StopConditions(max_tokens=2000, ignore_eos=True),
            )
            chunks = []
            async for chunk in client.generate(request, idle_timeout=60):
                chunks.append(chunk)
                if len(chunks) == 4:
                    await client.cancel(request.request_id)
            return chunks

    chunks = asyncio.run(go())
    assert chunks[-1].finish_reason == "cancelled"
    assert len(chunks) < 200
    assert wait_until(lambda: aborted() > before, timeout=10)


def test_a_repeated_prompt_hits_the_cache_and_kv_events_show_its_chained_pages(
    node: NodeProcess,
) -> None:
    prompt_ids = list(range(1000, 1064))  # 4 full pages of 16 tokens
    pages = [h for h, _ in block_hashes(prompt_ids, 16)]

    def stored_hashes(events: list[KvEventBatch]) -> list[int]:
        return [
            h
            for b in events
            for e in b.events
            if isinstance(e, BlockStored)
            for h in e.block_hashes
        ]

    async def go() -> tuple[list[StreamChunk], list[KvEventBatch]]:
        async with NodeClient(node.url) as client, watching(node.url, "kv-events") as events:
            finals = []
            for _ in range(2):
                request = GenerateRequest(
                    request_id=uuid.uuid4().hex,
                    token_ids=prompt_ids,
                    stop=StopConditions(max_tokens=4),
                )
                finals.append([c async for c in client.generate(request)][-1])
            await until(
                lambda: set(pages[:3]) <= set(stored_hashes(events)),
                60,
                "the prompt's pages stored",
            )
            return finals, list(events)

    finals, events = asyncio.run(go())
    assert finals[0].usage is not None
    assert finals[1].usage is not None
    assert (
        finals[1].usage.cached_tokens >= 48
    )  # SGLang never counts the last prompt page's last token
    stored = [e for b in events for e in b.events if isinstance(e, BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    assert hashes[: len(pages) - 1] == pages[: len(pages) - 1] or set(pages[:3]) <= set(hashes)
    first = next(e for e in stored if e.block_hashes[0] == pages[0])
    assert first.parent_block_hash is None
    assert first.token_ids[:16] == prompt_ids[:16]
    assert all(b.instance_id == node.instance_id and b.dp_rank == 0 for b in events)


def test_scheduler_load_metrics_and_sglang_metrics_reach_nats_and_prometheus(
    node: NodeProcess,
) -> None:
    async def go() -> list[LoadMetrics]:
        async with NodeClient(node.url) as client, watching(node.url, "metrics") as samples:
            [c async for c in client.generate(chat(max_tokens=8))]
            await until(lambda: any(not s.stale for s in samples), 60, "a fresh load sample")
            return list(samples)

    samples = asyncio.run(go())
    fresh = [s for s in samples if not s.stale]
    assert fresh, samples
    assert fresh[0].kv_total_blocks == 512  # 8192 tokens / 16
    assert fresh[0].request_total_slots > 0
    _, body = node.http("/metrics")
    text = body.decode()
    for name in (
        "sglang:prompt_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sgl_node_scheduler_metrics_samples_total",
        "sgl_node_kv_total_blocks",
    ):
        assert name in text, name


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes, from /proc (clock ticks to seconds)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _cores_used(pids: list[int], seconds: float) -> float:
    started, cpu = time.monotonic(), _cpu_seconds(pids)
    time.sleep(seconds)  # the subject: CPU time used over this span
    return (_cpu_seconds(pids) - cpu) / (time.monotonic() - started)


def test_an_idle_engine_sleeps_using_a_fraction_of_the_cpu_it_uses_busy(
    node: NodeProcess,
) -> None:
    """`sleep_on_idle`: SGLang's scheduler blocks on its sockets when idle instead of
    polling (which burns a core). Idle vs busy, the engine host and its processes."""
    host = _host_pid(node)
    pids = [host, *descendants(host)]
    idle = _cores_used(pids, 3.0)
    request = GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt="Write a very long story about a lighthouse keeper.",
        stop=StopConditions(max_tokens=2000, ignore_eos=True),
    )

    async def busy() -> float:
        async with NodeClient(node.url) as client:
            stream = client.generate(request, idle_timeout=120)
            await anext(stream)  # decoding now
            used = await asyncio.to_thread(_cores_used, pids, 3.0)
            await client.cancel(request.request_id)
            async for _ in stream:
                pass
            return used

    used = asyncio.run(busy())
    print(f"engine cores used: idle {idle:.3f}, busy {used:.3f}, ratio {idle / used:.3f}")
    assert idle < 0.25 * used, (idle, used)


GUIDED_REGEX = "[a-z ]{80}"
PERSON = {
    "type": "object",
    "properties": {
        key: {"type": "string", "minLength": 12} for key in ("name", "city", "job", "hobby")
    },
    "required": ["name", "city", "job", "hobby"],
}


def _guided(prompt: str, **guide: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        sampling=SamplingOptions(temperature=0.0, **guide),
        stop=StopConditions(max_tokens=200),
    )


def _killed_mid_stream(
    url: str,
    requests: list[GenerateRequest],
    kill: Callable[[], Any],
    on: str | None = None,
    reference_on: str | None = None,
) -> tuple[list[int], list[list[StreamChunk]]]:
    """Run `requests[0]` (greedy) once uninterrupted (on `reference_on`, or any node) for
    its reference tokens; then every request (the first again, under a new id) on `on`
    (or any node) and, once each has streamed 3 chunks, `kill()`; returns the reference
    and each stream's chunks, after checking that the kill caught every stream mid-way
    and that each went on through one seam to its end with no chunk index lost."""

    async def go() -> tuple[list[int], list[list[StreamChunk]], list[bool]]:
        async with NodeClient(url) as client:
            first = client.generate(requests[0], instance_id=reference_on, idle_timeout=120)
            reference = [t async for c in first for t in c.token_ids]
            again = msgspec.structs.replace(requests[0], request_id=uuid.uuid4().hex)
            running = [again, *requests[1:]]
            started = [asyncio.Event() for _ in running]
            streams: list[list[StreamChunk]] = [[] for _ in running]

            async def stream(k: int) -> None:
                async for chunk in client.generate(running[k], instance_id=on, idle_timeout=300):
                    streams[k].append(chunk)
                    if len(streams[k]) >= 3:
                        started[k].set()

            tasks = [asyncio.create_task(stream(k)) for k in range(len(running))]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            unfinished = [s[-1].finish_reason is None for s in streams]
            kill()
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
            return reference, streams, unfinished

    reference, streams, unfinished = asyncio.run(go())
    assert all(unfinished), unfinished  # the kill caught every stream mid-way
    for chunks in streams:
        assert chunks[-1].finish_reason in ("stop", "length"), chunks[-1]
        assert chunks[-1].migrations == 1, chunks[-1]
        assert [c.index for c in chunks] == list(range(len(chunks)))
    continued = streams[0]
    assert [t for c in continued for t in c.token_ids] == reference
    usage = continued[-1].usage
    assert usage is not None
    assert usage.completion_tokens == len(reference)
    return reference, streams


def _continues(node: NodeProcess, kill: Callable[[], Any]) -> None:
    """Three streams in flight when `kill` runs, each continued on the restarted engine:
    a greedy one to exactly the tokens of an uninterrupted run (asked first); one under a
    regex and one under a JSON schema to a whole document the constraint accepts (their
    rest generated under the constraint's derivative by what was streamed)."""
    registrations = len(node.wait_log(lambda r: r.get("event") == "registered"))
    by_regex = _guided("Write the alphabet in lower case letters:", regex=GUIDED_REGEX)
    by_schema = _guided("Describe a person in JSON:", json_schema=json.dumps(PERSON))
    _, streams = _killed_mid_stream(node.url, [chat(max_tokens=40), by_regex, by_schema], kill)
    regex_text = "".join(c.text for c in streams[1])
    assert re.fullmatch(GUIDED_REGEX, regex_text), regex_text
    person = json.loads("".join(c.text for c in streams[2]))
    assert set(person) == set(PERSON["required"]), person
    assert all(isinstance(v, str) and len(v) >= 12 for v in person.values()), person
    node.wait_log(lambda r: r.get("event") == "registered", count=registrations + 1, timeout=300)
    node.wait_ready(300)


def _host_pid(node: NodeProcess) -> int:
    _, body = node.http("/tree")
    core = {r["id"]: r for r in json.loads(body)["children"]}["core"]
    engine = {r["id"]: r for r in core["children"]}["engine"]
    return int({r["id"]: r for r in engine["children"]}["engine_host"]["pid"])


def test_kill_9_of_the_engine_host_mid_stream_the_stream_continues_exactly(
    node: NodeProcess,
) -> None:
    pid = _host_pid(node)
    # SGLang's children come from the forkserver and hold the pipe that would tell it the
    # host is gone: it must die with the host anyway (its own death signal), they with it
    titles = {child: process_title(child) for child in descendants(pid)}
    assert {"sglang::scheduler", "sglang::detokenizer"} <= set(titles.values()), titles
    _continues(node, lambda: os.kill(pid, signal.SIGKILL))
    assert _host_pid(node) != pid
    assert wait_until(lambda: not any(pid_alive(p) for p in titles), timeout=10), titles


def test_kill_9_of_sglangs_scheduler_mid_stream_the_stream_continues_exactly(
    node: NodeProcess,
) -> None:
    pids = scheduler_pids(_host_pid(node))
    assert pids, "no SGLang scheduler process found under the engine host"
    _continues(node, lambda: [os.kill(p, signal.SIGKILL) for p in pids])


def _canaries(node: NodeProcess, outcome: str) -> float:
    _, body = node.http("/metrics")
    prefix = f'sgl_node_engine_canaries_total{{outcome="{outcome}"}}'
    lines = [line for line in body.decode().splitlines() if line.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def _stored(events: list[KvEventBatch]) -> set[int]:
    return {b.dp_rank for b in events if any(isinstance(e, BlockStored) for e in b.events)}


def _fresh(metrics: list[LoadMetrics]) -> set[int]:
    return {m.dp_rank for m in metrics if not m.stale}


def _relays_both_ranks(node: NodeProcess) -> None:
    """A request pinned to each DP rank: both ranks' KV events and scheduler load metrics
    reach NATS, each from its own rank."""

    async def go() -> tuple[list[KvEventBatch], list[LoadMetrics]]:
        async with (
            NodeClient(node.url) as client,
            watching(node.url, "kv-events") as events,
            watching(node.url, "metrics") as metrics,
        ):
            for rank in (0, 1):
                request = GenerateRequest(
                    request_id=uuid.uuid4().hex,
                    token_ids=list(range(2000 + rank * 100, 2048 + rank * 100)),
                    stop=StopConditions(max_tokens=2),
                    dp_rank=rank,
                )
                [c async for c in client.generate(request, instance_id=node.instance_id)]
            await until(lambda: _stored(events) == {0, 1}, 60, "pages stored on both ranks")
            await until(lambda: _fresh(metrics) == {0, 1}, 60, "fresh metrics from both ranks")
            return list(events), list(metrics)

    events, metrics = asyncio.run(go())
    assert _stored(events) == {0, 1}
    assert _fresh(metrics) == {0, 1}  # each rank's scheduler metrics reach its own socket


def test_a_dp_size_2_node_killed_mid_stream_its_streams_continue_on_another_real_node_exactly(
    node: NodeProcess, sglang_fleet: dict[str, Any], tmp_path: Path
) -> None:
    """A second real-engine node, with dp_size 2, beside the shared one (one engine start
    covers all of this):
    - idle after its start, it gets its idle canary and answers it;
    - each DP rank relays its own KV events and load metrics;
    - idle, SGLang's data-parallel controller waits instead of spinning;
    - kill -9 of its whole process group (a machine lost) with a greedy stream and a
      regex-guided stream on it: the client library finds that no node holds them any
      more and continues both on the shared node from the tokens it has, the greedy one
      to exactly the tokens of an uninterrupted run there, the guided one to text its
      regex accepts; the dead node leaves discovery when its lease ends, and no process
      of it is left."""
    server = sglang_fleet["server"]
    other = start_node(
        tmp_path,
        backend="sglang",
        dp_size=2,
        name="dp2",
        embedded_nats=False,
        nats_url=server.url,
        engine__health={"stall_timeout": 120.0, "canary_after_idle": 1.0},
        discovery={"lease_ttl": 3.0, "heartbeat": 1.0},
    )
    try:
        other.wait_ready(600)
        assert wait_until(lambda: _canaries(other, "ok") >= 1, timeout=120)
        assert _canaries(other, "failed") == 0
        _relays_both_ranks(other)
        pids = descendants(other.proc.pid)
        assert len(pids) >= 5  # nats-server, engine host, 2 schedulers, detokenizer
        # idle, SGLang's data-parallel controller waits instead of spinning (it took a core)
        controller = [p for p in pids if process_title(p) == "sglang::data_parallel_controller"]
        assert len(controller) == 1, [process_title(p) for p in pids]
        assert _cores_used(controller, 2.0) < 0.15
        by_regex = _guided("Write the alphabet in lower case letters:", regex=GUIDED_REGEX)
        _, streams = _killed_mid_stream(
            server.url,
            [chat(max_tokens=40), by_regex],
            lambda: os.killpg(other.proc.pid, signal.SIGKILL),
            on=other.instance_id,
            reference_on=node.instance_id,
        )
        regex_text = "".join(c.text for c in streams[1])
        assert re.fullmatch(GUIDED_REGEX, regex_text), regex_text

        async def listed() -> set[str]:
            async with NodeClient(server.url) as client:
                return {r.instance_id for r in await client.instances()}

        assert wait_until(lambda: asyncio.run(listed()) == {node.instance_id}, timeout=30)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10)
    finally:
        other.kill()
