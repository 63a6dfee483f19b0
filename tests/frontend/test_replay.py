"""A frontend started after the nodes learns their caches from the durable KV event
streams (`[events] durable = true`): its first requests already go where the prefix is."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.frontend.harness import Frontend, node_metric, sim_fleet, start_frontend
from tests.frontend.test_routing import _ask, _system_prompt
from tests.node.harness import NatsServer, NodeProcess

PREFIXES = 3


async def _replay_consumers(url: str) -> int:
    nc = await nats.connect(url)
    try:
        infos = await nc.jetstream().streams_info()
        return sum(
            i.state.consumer_count for i in infos if (i.config.name or "").startswith("KV_EVENTS_")
        )
    finally:
        await nc.close()


def _served(nodes: list[NodeProcess]) -> list[float]:
    return [node_metric(n, "sgl_node_requests_total", {"outcome": "length"}) for n in nodes]


@pytest.fixture
def durable_fleet(tmp_path: Path) -> Iterator[tuple[NatsServer, list[NodeProcess]]]:
    with sim_fleet(tmp_path) as fleet:
        for name in ("a", "b"):
            fleet.node(name, events={"durable": True})
        fleet.wait_ready()
        yield fleet.server, list(fleet.nodes.values())


def test_a_late_frontend_routes_by_the_replayed_kv_events(
    tmp_path: Path, durable_fleet: tuple[NatsServer, list[NodeProcess]]
) -> None:
    server, nodes = durable_fleet
    homes: list[int] = []
    frontends: list[Frontend] = []
    try:
        early = start_frontend(tmp_path, server.url, name="early", routing="round_robin")
        frontends.append(early)
        early.wait_instances(2)
        client = early.client()
        for i in range(PREFIXES):  # round-robin spreads the prefixes over both nodes
            before = _served(nodes)
            _ask(client, _system_prompt("replay", i), "first question?")
            homes.append(
                [after - b for after, b in zip(_served(nodes), before, strict=True)].index(1)
            )
        assert set(homes) == {0, 1}
        early.kill()

        late = start_frontend(tmp_path, server.url, name="late", routing="kv")
        frontends.append(late)
        late.wait_instances(2)
        # Before any request through it, it already indexes the blocks of every prefix.
        assert late.metric("sgl_frontend_kv_indexed_blocks") >= PREFIXES * 50
        client = late.client()
        for i, home in enumerate(homes):
            before = _served(nodes)
            system = _system_prompt("replay", i)
            _, cached = _ask(client, system, "a follow-up?")
            served = [after - b for after, b in zip(_served(nodes), before, strict=True)]
            assert served[home] == 1, (i, homes, served)
            assert cached >= len(system) - 16
        log = late.proc.log_path.read_text()
        assert "replayed durable KV events" in log
        assert asyncio.run(_replay_consumers(server.url)) == 0  # the replay's are gone
    finally:
        for frontend in frontends:
            frontend.kill()
