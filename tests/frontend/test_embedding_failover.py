"""An embedding request whose node dies with it in hand is sent again to another node.

A request/reply never answered (the node was killed after the request reached it) used
to wait for the request's whole deadline. Now the frontend watches the instance while it
waits, as it does a quiet stream: nothing heard from it and no answer to a probe means it
is lost, and the request goes to another embedding instance.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.frontend.harness import sim_fleet
from tests.supervision.children import wait_until

EMBED = {"node": {"mode": "embedding"}, "engine": {"served_model_name": "sim-embed"}}


def test_an_embedding_request_whose_node_is_killed_with_it_is_answered_by_another(
    tmp_path: Path,
) -> None:
    with sim_fleet(tmp_path) as fleet:
        doomed = fleet.node("embed-a", **EMBED)
        fleet.node("embed-b", **EMBED)
        fleet.wait_ready()
        frontend = fleet.frontend()
        frontend.wait_instances(2)
        client = frontend.client(timeout=60, max_retries=0)
        # Stopped, node A still holds its subscription: a request routed to it is taken
        # and never answered. Requests are sent one at a time until one is held so.
        os.kill(doomed.proc.pid, signal.SIGSTOP)
        held: dict[str, Any] = {}

        def embed() -> None:
            try:
                held["answer"] = client.embeddings.create(model="sim-embed", input=["held"])
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                held["error"] = exc

        for _ in range(30):
            thread = threading.Thread(target=embed)
            thread.start()
            thread.join(1.0)
            if thread.is_alive():
                break  # node A has it
            held.clear()
        else:
            raise AssertionError("no request was routed to the stopped node in 30 tries")
        started = time.monotonic()
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # dies with the request in hand
        doomed.proc.wait(10)
        thread.join(60)
        assert not thread.is_alive()
        assert "error" not in held, held
        (item,) = held["answer"].data
        assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-5)
        took = time.monotonic() - started
        failovers = frontend.metric("sgl_frontend_failovers_total", {"reason": "node_lost"})
        assert failovers >= 1, (failovers, took)
        assert wait_until(lambda: frontend.health().get("instances") == 1, timeout=30)
