"""Every instance marked down for a moment (each answered "no responders": its NATS
connection was away, as in a rolling restart of the servers) is a pause for a request,
not a 503: the frontend waits up to `ALL_DOWN_WAIT` for one to be heard from again."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from tests.frontend.harness import sim_fleet
from tests.node.harness import admin_request

TOKEN = "admin-" + uuid.uuid4().hex


def test_a_request_while_the_only_instance_is_unreachable_for_a_moment_is_served(
    tmp_path: Path,
) -> None:
    with sim_fleet(tmp_path) as fleet:
        node = fleet.chaos_node(
            "sim",
            TOKEN,
            discovery={"lease_ttl": 10.0, "heartbeat": 1.0},
        )
        frontend = fleet.frontend()
        fleet.wait_ready()
        frontend.wait_instances(1)
        client = frontend.client()
        ask = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert client.chat.completions.create(**ask).choices[0].finish_reason == "length"
        reply = asyncio.run(admin_request(node, TOKEN, "chaos", fault="cut_nats", duration=1.0))
        assert reply.ok, reply
        time.sleep(0.3)  # its subscriptions are gone from the server
        started = time.monotonic()
        answer = client.chat.completions.create(**ask)
        waited = time.monotonic() - started
        assert answer.choices[0].finish_reason == "length"
        downs = frontend.metric("sgl_frontend_failovers_total", {"reason": "no_responders"})
        assert downs >= 1  # it was marked down, then heard from again
        print(f"served {waited:.2f} s after it was sent, the instance unreachable meanwhile")
