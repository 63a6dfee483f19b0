"""Nodes that die, join and leave behind one frontend.

Three sim nodes (20 ms per decode step, 2 ms per prefill token; a 3 s lease) on one NATS,
and a frontend. Nodes are killed with SIGKILL of their whole process group, as a crash
of the machine would: nothing deregisters, nothing answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_fleet,
    wait_until,
)
from tests.node.harness import NodeProcess, start_node

LEASE = {"lease_ttl": 3.0, "heartbeat": 1.0}
SIM = {"decode_time_per_step": 0.02, "prefill_time_per_token": 0.002}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-failover")) as fleet:
        for name in ("n1", "n2", "n3"):
            fleet.node(name, engine__sim=SIM, discovery=LEASE)
        frontend = fleet.frontend(discovery=LEASE)
        fleet.wait_ready()
        frontend.wait_instances(3)
        nodes = list(fleet.nodes.values())
        yield {"server": fleet.server, "tmp": fleet.tmp, "nodes": nodes, "frontend": frontend}


def _alive(nodes: list[NodeProcess]) -> list[NodeProcess]:
    return [n for n in nodes if n.proc.poll() is None]


def _busiest(nodes: list[NodeProcess]) -> NodeProcess | None:
    loads = [(node_metric(n, "sgl_node_inflight_requests"), i) for i, n in enumerate(nodes)]
    load, index = max(loads)
    return nodes[index] if load > 0 else None


def test_a_request_whose_node_dies_before_its_first_token_is_served_by_another(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    nodes = _alive(fleet["nodes"])
    prompt = "long prompt " * 125  # 1500 tokens: 3 s of prefill
    ids = [b + 3 for b in prompt.encode()]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            stream = frontend.client().completions.create(
                model="sim", prompt=prompt, max_tokens=5, stream=True
            )
            outcome["text"] = "".join(c.choices[0].text for c in stream if c.choices)
        except openai.APIError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    holder: list[NodeProcess] = []

    def taken() -> bool:
        node = _busiest(nodes)
        if node is not None:
            holder.append(node)
        return node is not None

    wait_until(taken, 30.0, "a node took the request")
    holder[0].kill()
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["text"] == sim_answer(ids, 5)
    assert frontend.metric("sgl_frontend_failovers_total") >= 1


def test_a_node_killed_mid_run_fails_no_request_its_streams_continue_on_the_survivors(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    nodes = _alive(fleet["nodes"])
    assert len(nodes) >= 2  # 3, or 2 after the first test killed one: alone or in any order
    answers: dict[int, str] = {}
    lock = threading.Lock()

    def ask(i: int, stream: bool) -> str:
        client = frontend.client()
        messages = [{"role": "user", "content": f"burst {i}"}]
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model="sim",
                    messages=messages,
                    max_tokens=60,
                    stream=True,  # type: ignore[arg-type]
                )
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            answer = client.chat.completions.create(
                model="sim",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=60,
            )
            return answer.choices[0].message.content or ""
        except openai.APIError as exc:
            return f"error: {exc.message}"

    def run(i: int) -> None:
        text = ask(i, stream=bool(i % 2))
        with lock:
            answers[i] = text

    migrated_before = frontend.metric("sgl_frontend_migrations_total", {"reason": "node_lost"})
    first_tokens = "sgl_node_time_to_first_token_seconds_count"
    started_before = [node_metric(n, first_tokens) for n in nodes]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    victim: list[NodeProcess] = []

    def decoding() -> bool:  # a node has 4 streams under way (their first tokens sent)
        for node, before in zip(nodes, started_before, strict=True):
            if node_metric(node, first_tokens) - before >= 4 and _busiest([node]) is not None:
                victim.append(node)
                return True
        return False

    wait_until(decoding, 60.0, "streams under way on a node")
    victim[0].kill()
    survivors = [n for n in nodes if n is not victim[0]]
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a request never ended"
    # Nothing failed: each answer is the one an uninterrupted run gives (asked again now,
    # on the survivor), those of the killed node's streams continued from their last token.
    assert sorted(answers) == list(range(12))
    with ThreadPoolExecutor(12) as pool:  # together: the sim batches them (1.2 s each alone)
        again = dict(zip(answers, pool.map(lambda i: ask(i, stream=False), answers), strict=True))
    for i, text in answers.items():
        assert text == again[i], (i, text)
    migrated = frontend.metric("sgl_frontend_migrations_total", {"reason": "node_lost"})
    assert migrated - migrated_before >= 1  # at least one stream had its first token there

    def served() -> float:
        return sum(
            node_metric(n, "sgl_node_requests_total", {"outcome": "length"}) for n in survivors
        )

    before = served()
    client = frontend.client()
    for i in range(5):
        answer = client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": f"after {i}"}], max_tokens=3
        )
        assert answer.choices[0].finish_reason == "length"
    after = served()
    assert after - before == 5
    # the dead node's lease runs out (3 s after its last heartbeat): its record goes
    _removed(frontend, victim[0], "lease expired")
    wait_until(
        lambda: frontend.health()["registered"] == len(survivors), 30.0, "the dead node unlisted"
    )


def _removed(frontend: Frontend, node: NodeProcess, why: str) -> None:
    """Wait for the frontend's record of why it dropped `node`'s discovery record."""
    frontend.proc.wait_log(
        lambda r: (
            r.get("event") == "instance removed"
            and node.instance_id in str(r.get("key"))
            and r.get("why") == why
        ),
        timeout=60,
    )


def test_nodes_that_join_are_listed_and_an_ordered_stop_deletes_the_record(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    count = frontend.health()["registered"]
    late = start_node(
        fleet["tmp"],
        name="late",
        embedded_nats=False,
        nats_url=fleet["server"].url,
        engine__sim=SIM,
        discovery=LEASE,
    )
    try:
        late.wait_ready(60)
        wait_until(
            lambda: frontend.health()["registered"] == count + 1, 30.0, "the new node listed"
        )
        answer = frontend.client().chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        assert answer.choices[0].finish_reason == "length"
        late.proc.terminate()  # an ordered stop deletes the record first, not its lease
        _removed(frontend, late, "deleted")
        wait_until(lambda: frontend.health()["registered"] == count, 30.0, "the node unlisted")
        assert late.proc.wait(30) == 0
    finally:
        late.kill()
