"""Chunks lost in transit between a node and the frontend are asked for again.

The frontend is paused (SIGSTOP) while the NATS server restarts under a streaming chat,
so it comes back only after the node has sent what it held: those chunks reached nobody.
The frontend notices the gap or the silence, asks the node on its resume subject, and
the client, through the official `openai` package, gets the whole answer once, in order.
And after such a restart, the frontend's view of discovery still follows the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from messages.codec import DecodeError, decode_json
from messages.request import StreamChunk
from supervisor.client_replies import in_place
from tests.frontend.harness import (
    Frontend,
    sim_answer,
    sim_chat_ids,
    start_frontend,
    wait_until,
)
from tests.node.harness import NatsServer, NodeProcess, sim_node_on_own_nats


@dataclass
class _Fabric:
    """A sim node on a NATS server of its own, and a frontend on that server."""

    tmp_path: Path
    server: NatsServer
    node: NodeProcess
    frontend: Frontend

    def restart_nats(self, down_for: float = 0.0) -> None:
        """Stop the server and start it again on its port, with its store."""
        self.server.stop()
        time.sleep(down_for)
        self.server = NatsServer.on_port(self.tmp_path, self.server.port)


@contextlib.contextmanager
def _fabric(tmp_path: Path) -> Iterator[_Fabric]:
    server, node = sim_node_on_own_nats(tmp_path)
    fabric: _Fabric | None = None
    try:
        node.wait_ready(60)
        fabric = _Fabric(tmp_path, server, node, start_frontend(tmp_path, server.url))
        fabric.frontend.wait_instances(1)
        yield fabric
    finally:
        if fabric is not None:
            fabric.frontend.kill()
            server = fabric.server  # the one running now, after any restart
        node.kill()
        server.stop()


def test_a_nats_restart_while_the_frontend_is_away_loses_no_token(tmp_path: Path) -> None:
    with _fabric(tmp_path) as fabric:
        frontend = fabric.frontend
        messages = [{"role": "user", "content": "keep talking through the outage"}]
        pieces: list[str] = []
        finish: list[str | None] = []

        def chat() -> None:
            stream = frontend.client().chat.completions.create(
                model="sim",
                messages=messages,
                max_tokens=80,
                stream=True,  # type: ignore[arg-type]
            )
            for event in stream:
                if event.choices:
                    pieces.append(event.choices[0].delta.content or "")
                    if event.choices[0].finish_reason:
                        finish.append(event.choices[0].finish_reason)

        reader = threading.Thread(target=chat)
        reader.start()
        deadline = time.monotonic() + 10
        while not pieces and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pieces, "the stream did not start"
        os.kill(frontend.proc.proc.pid, signal.SIGSTOP)
        try:
            fabric.restart_nats(down_for=0.3)  # the subject: an outage
            # the node reconnected and sent what it held
            _wait_for_the_last_chunk(fabric.server.url)
        finally:
            os.kill(frontend.proc.proc.pid, signal.SIGCONT)
        reader.join(60)
        assert not reader.is_alive()
        assert finish == ["length"]
        assert "".join(pieces) == sim_answer(sim_chat_ids(messages), 80)
        assert frontend.metric("sgl_frontend_resumed_streams_total") >= 1


def _wait_for_the_last_chunk(url: str, timeout: float = 60.0) -> None:
    """Wait until a node publishes a stream's last chunk to a reply inbox, as seen by a
    wildcard subscriber of our own on the restarted server: the node has sent what it
    held (1 s after its reconnect) while the frontend, stopped, could not read it."""

    async def go() -> None:
        nc = await nats.connect(url)
        ended = asyncio.Event()

        async def on(msg: Any) -> None:
            with contextlib.suppress(DecodeError):
                if decode_json(msg.data, StreamChunk).finish_reason is not None:
                    ended.set()

        try:
            await nc.subscribe("_INBOX.>", cb=on)
            await in_place(nc)
            await asyncio.wait_for(ended.wait(), timeout)
        finally:
            await nc.close()

    asyncio.run(go())


def test_after_a_nats_restart_a_node_that_stops_leaves_the_frontends_view_at_once(
    tmp_path: Path,
) -> None:
    """The frontend follows the discovery bucket through a JetStream consumer that lives in
    the server's memory: a restart takes it away. The frontend makes a new one once it is
    back, so a record deleted afterwards (a node stopping in order) leaves its view at
    once; a re-list alone would keep it (its key still holds the delete marker)."""
    with _fabric(tmp_path) as fabric:
        frontend, node = fabric.frontend, fabric.node
        fabric.restart_nats()
        node.wait_ready(60)  # back, and registered again
        wait_until(lambda: frontend.health().get("status") == "ok", 30, "the frontend back on NATS")
        node.proc.send_signal(signal.SIGTERM)
        took = frontend.wait_instances(0, timeout=10)
        print(f"the stopped node left the frontend's view {took:.2f} s after its SIGTERM")
        assert node.stop() == 0
        assert took < 5.0
