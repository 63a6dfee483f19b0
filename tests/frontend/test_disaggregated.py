"""The disaggregated flow through the frontend: a prefill sim node and a decode sim node
serve one model; the frontend pairs them (bootstrap host/port from the prefill card and a
fresh room) and streams the decode node's output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_chat_ids,
    start_frontend,
)
from tests.node.harness import NatsServer, NodeProcess, free_ports, start_node


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("frontend-disagg")
    server = NatsServer(tmp)
    common: dict[str, Any] = {"embedded_nats": False, "nats_url": server.url}
    nodes: dict[str, NodeProcess] = {}
    frontend: Frontend | None = None
    try:
        nodes["prefill"] = start_node(
            tmp,
            name="prefill",
            node={"mode": "prefill"},
            disaggregation={"bootstrap_port": free_ports()},
            **common,
        )
        nodes["decode"] = start_node(tmp, name="decode", node={"mode": "decode"}, **common)
        frontend = start_frontend(tmp, server.url)
        for node in nodes.values():
            node.wait_ready(60)
        frontend.wait_instances(2)
        yield {"frontend": frontend, **nodes}
    finally:
        if frontend is not None:
            frontend.kill()
        for node in nodes.values():
            node.kill()
        server.stop()


def _served(node: NodeProcess) -> float:
    return node_metric(node, "sgl_node_requests_total", {"outcome": "length"})


def test_a_model_with_prefill_and_decode_instances_is_served_disaggregated(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    prefill_before, decode_before = _served(fleet["prefill"]), _served(fleet["decode"])
    messages = [{"role": "user", "content": "Split me in two halves, please."}]
    client = frontend.client()
    answer = client.chat.completions.create(model="sim", messages=messages, max_tokens=10)  # type: ignore[arg-type]
    expected = sim_answer(sim_chat_ids(messages), 10)
    assert answer.choices[0].message.content == expected
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 10
    stream = client.chat.completions.create(
        model="sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    # each request ran its prefill on the prefill node and its decode on the decode node
    assert _served(fleet["prefill"]) - prefill_before == 2
    assert _served(fleet["decode"]) - decode_before == 2
    assert frontend.metric("sgl_frontend_routing_decisions_total", {"mode": "prefill"}) >= 2
    assert frontend.metric("sgl_frontend_routing_decisions_total", {"mode": "decode"}) >= 2
    assert frontend.metric("sgl_frontend_routing_decisions_total", {"mode": "aggregated"}) == 0


def test_the_prefill_nodes_prefix_cache_shows_in_the_usage(fleet: dict[str, Any]) -> None:
    client = fleet["frontend"].client()
    system = "You are a careful assistant. " * 20
    cached = []
    for question in ("first?", "second?"):
        answer = client.chat.completions.create(
            model="sim",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=3,
        )
        assert answer.usage is not None
        details = answer.usage.prompt_tokens_details
        assert details is not None
        cached.append(details.cached_tokens or 0)
    assert cached[0] == 0
    assert cached[1] >= len(system) - 16
