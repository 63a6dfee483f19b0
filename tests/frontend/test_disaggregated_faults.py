"""Faults in the disaggregated flow, through the frontend: two prefill sim nodes (a slow
prefill: 3 ms per prompt token) and one decode sim node serve one model. The decode side
takes each request's KV cache from its prefill node's bootstrap server, as with SGLang,
so it depends on the prefill node until the transfer is done.

- A client that goes away at any moment (prefill running and the decode waiting for its
  KV cache, or decoding) leaves nothing running and no KV cache held on either side.
- A prefill node killed during the prefill: the decode cannot get the KV cache
  (`kv_transfer_failed`), and the frontend runs the prefill again on the other prefill
  node with the same decode node (the only one: blaming it would leave nothing to decode
  with). The client sees a pause, then exactly an uninterrupted run's tokens.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_chat_ids,
    sim_fleet,
    wait_until,
)
from tests.node.harness import NodeProcess, free_ports

PREFILLS = ("prefill", "prefill2")
PREFILL_SIM = {"prefill_time_per_token": 0.003}  # the ~1,000-token prompt below: ~3 s
DECODE_SIM = {"decode_time_per_step": 0.01}


def _messages() -> list[dict[str, str]]:
    """A prompt no node has cached (its head is new), so its prefill takes the whole ~3 s."""
    return [{"role": "user", "content": f"{uuid.uuid4().hex} Tell me more. " + "word " * 200}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-disagg-faults")) as fleet:
        for name in PREFILLS:
            fleet.node(
                name,
                node={"mode": "prefill"},
                disaggregation={"bootstrap_port": free_ports()},
                engine__sim=PREFILL_SIM,
            )
        fleet.node("decode", node={"mode": "decode"}, engine__sim=DECODE_SIM)
        frontend = fleet.frontend()
        fleet.wait_ready()
        frontend.wait_instances(3)
        yield {"frontend": frontend, **fleet.nodes}


def _nodes(fleet: dict[str, Any]) -> dict[str, NodeProcess]:
    """The fleet's live nodes, by name."""
    names = (*PREFILLS, "decode")
    return {n: fleet[n] for n in names if fleet[n].proc.poll() is None}


def _busy_prefill(fleet: dict[str, Any]) -> NodeProcess | None:
    for name in PREFILLS:
        node: NodeProcess = fleet[name]
        if node.proc.poll() is None and node_metric(node, "sgl_node_inflight_requests"):
            return node
    return None


def _idle(fleet: dict[str, Any]) -> bool:
    """Nothing in flight, running or holding KV cache pages on any live node."""
    return all(
        node_metric(node, name) == 0
        for node in _nodes(fleet).values()
        for name in (
            "sgl_node_inflight_requests",
            "sgl_node_requests_running",
            "sgl_node_requests_waiting",
            "sgl_node_kv_active_blocks",
        )
    )


def _cancelled(node: NodeProcess) -> float:
    return node_metric(node, "sgl_node_requests_total", {"outcome": "cancelled"})


def _outcomes(fleet: dict[str, Any]) -> dict[str, list[str]]:
    """Every live node's request outcome counts (what a failed assertion says)."""
    return {
        name: [
            line
            for line in node.http("/metrics")[1].decode().splitlines()
            if line.startswith("sgl_node_requests_total{")
        ]
        for name, node in _nodes(fleet).items()
    }


@pytest.mark.parametrize("moment", ["prefilling", "decoding"])
def test_a_client_gone_at_any_moment_leaves_no_request_and_no_kv_on_either_side(
    fleet: dict[str, Any], moment: str
) -> None:
    frontend: Frontend = fleet["frontend"]
    assert _idle(fleet)
    before = {name: _cancelled(node) for name, node in _nodes(fleet).items()}
    if moment == "prefilling":  # the prefill runs (~3 s); the decode waits for its KV cache
        with pytest.raises(openai.APITimeoutError):  # the client gives up after 1 s
            frontend.client(timeout=1.0).chat.completions.create(
                model="sim",
                messages=_messages(),  # type: ignore[arg-type]
                max_tokens=300,
                stream=True,
            )
    else:
        stream = frontend.client().chat.completions.create(
            model="sim",
            messages=_messages(),  # type: ignore[arg-type]
            max_tokens=300,
            stream=True,
        )
        pieces = 0
        for chunk in stream:
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
            if pieces == 10:
                break
        stream.close()
    wait_until(lambda: _idle(fleet), 15, f"every node idle after a client left while {moment}")
    after = {name: _cancelled(node) for name, node in _nodes(fleet).items()}
    assert after["decode"] == before["decode"] + 1, (before, after)
    if moment == "prefilling":  # the prefill was cancelled too (it had ~2 s to go)
        cancelled = sum(after[n] - before[n] for n in PREFILLS)
        if cancelled != 1:  # said in full (pytest cuts a long assertion message short)
            print("outcomes:", _outcomes(fleet))
        assert cancelled == 1, (before, after)


def test_a_prefill_node_killed_mid_prefill_the_prefill_runs_again_on_the_other(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    tokens = 40
    messages = _messages()
    answer: list[str] = []

    def ask() -> None:  # the stream starts (headers) only with its first token
        stream = frontend.client().chat.completions.create(
            model="sim",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=tokens,
            stream=True,
        )
        answer.extend(c.choices[0].delta.content or "" for c in stream if c.choices)

    client = threading.Thread(target=ask)
    client.start()
    busy: list[NodeProcess] = []

    def prefilling() -> bool:  # the node that has it, taken as it is seen busy
        node = _busy_prefill(fleet)
        busy.extend([node] if node is not None else [])
        return bool(busy)

    wait_until(prefilling, 10, "a prefill running")
    victim = busy[0]
    killed_at = time.monotonic()
    victim.kill()
    client.join(60)
    paused = time.monotonic() - killed_at
    assert "".join(answer) == sim_answer(sim_chat_ids(messages), tokens)
    assert frontend.metric("sgl_frontend_failovers_total", {"reason": "prefill_lost"}) >= 1
    (survivor,) = [fleet[n] for n in PREFILLS if fleet[n] is not victim]
    assert node_metric(survivor, "sgl_node_requests_total", {"outcome": "length"}) >= 1
    print(f"answered {paused:.1f} s after the prefill node was killed")
    wait_until(lambda: _idle(fleet), 15, "every node idle after the pair went over")
