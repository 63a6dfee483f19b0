"""Chunks lost in transit are asked for again: the resume subject, on a real node (sim
engine) and a real nats-server that is stopped and restarted under streams in flight."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from messages.codec import decode_json, encode_json
from messages.request import (
    GenerateRequest,
    ResumeReply,
    ResumeRequest,
    StopConditions,
    StreamChunk,
)
from supervisor.client import NodeClient
from tests.frontend.harness import node_metric
from tests.node.harness import NatsServer, NodeProcess, sim_node_on_own_nats, start_node
from tests.node.test_node_sim import expected_text

RESUME = "dynamo.backend.resume"


def _request(prompt: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=prompt, stop=StopConditions(max_tokens=max_tokens)
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(
        tmp_path_factory.mktemp("resume-node"),
        engine__sim={"decode_time_per_step": 0.02},
        handlers={"resume_window": 3.0},
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()


def test_asking_again_returns_the_same_chunks_while_running_and_after_the_end(
    node: NodeProcess,
) -> None:
    async def go() -> None:
        nc = await nats.connect(node.url)
        try:
            request = _request("say it again", 40)
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("dynamo.backend.generate", encode_json(request), reply=inbox)
            first = [await sub.next_msg(timeout=10) for _ in range(5)]
            ask = encode_json(ResumeRequest(request.request_id, from_index=2))
            running = decode_json((await nc.request(RESUME, ask, timeout=5)).data, ResumeReply)
            assert not running.ended
            assert [c.index for c in running.chunks][:3] == [2, 3, 4]
            assert running.chunks[:3] == [decode_json(m.data, StreamChunk) for m in first[2:]]
            received = [decode_json(m.data, StreamChunk) for m in first]
            while received[-1].finish_reason is None:
                received.append(decode_json((await sub.next_msg(timeout=10)).data, StreamChunk))
            assert received[-1].finish_reason == "length"

            ask = encode_json(ResumeRequest(request.request_id))
            ended = decode_json((await nc.request(RESUME, ask, timeout=5)).data, ResumeReply)
            assert ended.ended
            assert ended.chunks == received  # the same chunks, every field

            # Unknown ids and undecodable asks get silence: nobody holds them.
            for data in (encode_json(ResumeRequest("never-sent")), b"{not json"):
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(RESUME, data, timeout=1)

            # After `resume_window` the ended stream is forgotten: asks go unanswered.
            for _ in range(30):
                try:
                    await nc.request(RESUME, ask, timeout=1)
                except nats.errors.TimeoutError:
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail("the ended stream was still held after 45 s")
        finally:
            await nc.close()

    asyncio.run(go())


def test_a_nats_server_restart_mid_stream_loses_no_chunk(tmp_path: Path) -> None:
    """The server is stopped under 4 streams and started again; the client comes back
    after the node has sent what it held, so chunks published meanwhile reach nobody:
    the client sees the gap or the silence, asks again, and every stream ends complete,
    in order, each chunk once."""
    server, node = sim_node_on_own_nats(tmp_path)
    try:
        node.wait_ready(60)
        prompts = [f"through the outage {i}" for i in range(4)]

        under_way = [asyncio.Event() for _ in prompts]

        async def stream(
            client: NodeClient, prompt: str, first: asyncio.Event
        ) -> list[StreamChunk]:
            chunks = []
            async for chunk in client.generate(_request(prompt, 80), probe_after=2.0):
                chunks.append(chunk)
                first.set()
            return chunks

        async def go() -> list[list[StreamChunk]]:
            nonlocal server
            # This client waits 3 s between reconnect attempts: longer than the node's
            # outage plus its resume delay (1 s), so what the node sends first is missed.
            options = {"reconnect_time_wait": 3.0}
            async with NodeClient(server.url, connect_options=options) as client:
                tasks = [
                    asyncio.create_task(stream(client, p, e))
                    for p, e in zip(prompts, under_way, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in under_way)), 60)
                server.stop()
                await asyncio.sleep(0.3)  # the subject: an outage the node must ride out
                server = await asyncio.to_thread(NatsServer.on_port, tmp_path, server.port)
                return await asyncio.wait_for(asyncio.gather(*tasks), 120)

        results = asyncio.run(go())
        for prompt, chunks in zip(prompts, results, strict=True):
            assert [c.index for c in chunks] == list(range(len(chunks)))
            assert chunks[-1].finish_reason == "length", chunks[-1]
            assert "".join(c.text for c in chunks) == expected_text(prompt, 80)
        assert (
            node_metric(node, "sgl_node_stream_resumes_total") > 0
        )  # the chunks came back by asking, not by luck
        assert node.wait_log(lambda r: r.get("event") == "stream resumed", timeout=5)
    finally:
        node.kill()
        server.stop()


def test_a_stream_whose_node_died_ends_with_stream_lost_not_silence(tmp_path: Path) -> None:
    """The node is killed (SIGKILL, the whole process group) with a stream in flight; no
    node holds the stream any more, so the client's resume asks go unanswered and, once
    `lost_after` passes without a word from any node, the client ends the stream itself
    with a `stream_lost` error chunk at the next index — not a hang, not a bare timeout."""
    server, node = sim_node_on_own_nats(tmp_path)
    try:
        node.wait_ready(60)

        async def go() -> tuple[list[StreamChunk], float]:
            async with NodeClient(server.url) as client:
                chunks: list[StreamChunk] = []
                killed_at = 0.0
                stream = client.generate(
                    _request("cut short", 200), probe_after=0.5, lost_after=2.0
                )
                async with asyncio.timeout(30):
                    async for chunk in stream:
                        chunks.append(chunk)
                        if len(chunks) == 3:
                            node.kill()
                            killed_at = time.monotonic()
                return chunks, time.monotonic() - killed_at

        chunks, waited = asyncio.run(go())
        assert [c.index for c in chunks] == list(range(len(chunks)))
        last = chunks[-1]
        assert last.finish_reason == "error", last
        assert last.error is not None
        assert last.error.code == "stream_lost"
        assert last.index >= 3
        # Not before lost_after (2 s) without a word; not a hang (the 30 s timeout above).
        assert waited >= 2.0, waited
    finally:
        node.kill()
        server.stop()
