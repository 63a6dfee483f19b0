"""The disaggregated flow through the frontend: a prefill sim node and two decode sim
nodes serve one model; the frontend pairs a prefill with a decode (bootstrap host/port
from the prefill card and a fresh room) and streams the decode node's output. A decode
node lost mid-stream: the stream goes on as a new pair, token-identical."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_chat_ids,
    sim_fleet,
)
from tests.node.harness import NodeProcess, free_ports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-disagg")) as fleet:
        fleet.node(
            "prefill", node={"mode": "prefill"}, disaggregation={"bootstrap_port": free_ports()}
        )
        for name in ("decode", "decode2"):
            fleet.node(name, node={"mode": "decode"}, engine__sim=DECODE_SIM)
        frontend = fleet.frontend()
        fleet.wait_ready()
        frontend.wait_instances(3)
        yield {"frontend": frontend, **fleet.nodes}


DECODE_SIM = {"decode_time_per_step": 0.01}  # a 300-token stream runs 3 s


def _served(*nodes: NodeProcess) -> float:
    return sum(node_metric(n, "sgl_node_requests_total", {"outcome": "length"}) for n in nodes)


def _decoders(fleet: dict[str, Any]) -> list[NodeProcess]:
    return [fleet[name] for name in ("decode", "decode2") if fleet[name].proc.poll() is None]


def test_a_model_with_prefill_and_decode_instances_is_served_disaggregated(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    prefill_before, decode_before = _served(fleet["prefill"]), _served(*_decoders(fleet))
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
    # each request ran its prefill on the prefill node and its decode on a decode node
    assert _served(fleet["prefill"]) - prefill_before == 2
    assert _served(*_decoders(fleet)) - decode_before == 2
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


def test_a_decode_node_killed_mid_stream_the_stream_goes_on_as_a_new_pair(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    messages = [{"role": "user", "content": "A long answer, decoded in two places."}]
    tokens = 300
    before = {id(n): _served(n) for n in _decoders(fleet)}
    stream = frontend.client().chat.completions.create(
        model="sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=tokens,
        stream=True,
    )
    pieces: list[str] = []
    victim: NodeProcess | None = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if victim is None and len(pieces) == 20:  # mid-stream: kill the decode node serving it
            victim = next(
                n for n in _decoders(fleet) if node_metric(n, "sgl_node_inflight_requests")
            )
            victim.kill()
    assert victim is not None
    assert "".join(pieces) == sim_answer(sim_chat_ids(messages), tokens)
    assert frontend.metric("sgl_frontend_migrations_total") >= 1
    # the rest was prefilled again (prompt + tokens so far) and decoded on the other node
    (survivor,) = _decoders(fleet)
    assert _served(survivor) - before[id(survivor)] == 1
