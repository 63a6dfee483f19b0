"""A node streams a request's chunks straight to the frontend (not through the NATS
server) once it has a connection to it, and a cut of the node mid-stream loses nothing:
the stream goes on through NATS and the client gets its whole answer, once, in order.
A frontend with `direct_streams = false` gets every chunk through NATS."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

from tests.frontend.harness import node_metric, sim_answer, sim_chat_ids, sim_fleet, wait_until
from tests.node.harness import NatsServer, admin_request, free_ports, start_node

TOKEN = "admin-" + uuid.uuid4().hex


def test_chunks_go_straight_to_the_frontend_and_a_cut_mid_stream_loses_none(
    tmp_path: Path,
) -> None:
    with sim_fleet(tmp_path) as fleet:
        node = fleet.chaos_node(
            "sim",
            TOKEN,
            engine__sim={"decode_time_per_step": 0.03},
        )
        frontend = fleet.frontend()
        plain = fleet.frontend("plain", frontend={"direct_streams": False})
        fleet.wait_ready()
        frontend.wait_instances(1)
        plain.wait_instances(1)
        client = frontend.client()

        def direct(path: str) -> float:
            return node_metric(node, "sgl_node_direct_streams_total", {"path": path})

        def chat(content: str, tokens: int, via: object = client) -> str:
            messages = [{"role": "user", "content": content}]
            stream = via.chat.completions.create(  # type: ignore[attr-defined]
                model="sim", messages=messages, max_tokens=tokens, stream=True
            )
            text = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)
            assert text == sim_answer(sim_chat_ids(messages), tokens)
            return text

        chat("opens the connection", 4)  # the first stream goes through NATS meanwhile
        wait_until(
            lambda: node_metric(node, "sgl_node_direct_stream_connections") == 1,
            10,
            "the node connected to the frontend",
        )
        assert frontend.metric("sgl_frontend_direct_stream_connections") == 1
        assert plain.metric("sgl_frontend_direct_stream_connections") == 0
        before = direct("direct")
        chat("straight to the frontend", 20)
        assert direct("direct") == before + 1
        assert node_metric(node, "sgl_node_direct_chunks_total") >= 20

        # the node is cut off from the fabric (NATS and its direct streams) mid-stream
        messages = [{"role": "user", "content": "keep talking through the cut"}]
        pieces: list[str] = []

        def reader() -> None:
            stream = client.chat.completions.create(
                model="sim",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=80,
                stream=True,
            )
            pieces.extend(e.choices[0].delta.content or "" for e in stream if e.choices)

        thread = threading.Thread(target=reader)
        thread.start()
        wait_until(lambda: len(pieces) > 5, 10, "the stream started")
        reply = asyncio.run(admin_request(node, TOKEN, "chaos", fault="cut_nats", duration=1.0))
        assert reply.ok, reply
        thread.join(60)
        assert not thread.is_alive()
        assert "".join(pieces) == sim_answer(sim_chat_ids(messages), 80)

        # a frontend that does not ask gets its chunks through NATS
        plain.wait_instances(1, 20)
        counted = (direct("direct"), direct("nats"))
        time.sleep(0.1)
        chat("through nats", 12, plain.client())
        assert (direct("direct"), direct("nats")) == counted


def test_a_direct_host_it_cannot_listen_on_stops_the_frontend_naming_the_key(
    tmp_path: Path,
) -> None:
    with NatsServer(tmp_path) as server:
        proc = start_node(
            tmp_path,
            name="frontend",
            embedded_nats=False,
            nats_url=server.url,
            node={"tree": "frontend"},
            frontend={"enabled": True, "port": free_ports(), "direct_host": "10.254.254.254"},
            system={"enabled": False},
        )
        try:
            assert proc.proc.wait(60) != 0
        finally:
            proc.kill()
    said = "frontend.direct_host '10.254.254.254': cannot listen for direct streams"
    wait_until(lambda: said in proc.log_path.read_text(), 5, "the error in its log")
    assert "frontend.direct_streams = false" in proc.log_path.read_text()
