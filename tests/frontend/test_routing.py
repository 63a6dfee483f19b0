"""KV-aware routing across two sim nodes, against round-robin on the same nodes; and
`random` routing.

Three frontends on one NATS see the same two nodes: one routes by KV cache (`kv`), one
`round_robin`, one `random`. Each runs a shared-prefix workload (groups of prompts with a long
common prefix, interleaved); the prefix-cache hit rate is measured from the responses'
`usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.frontend.harness import Frontend, node_metric, sim_fleet, wait_until
from tests.node.harness import NodeProcess

GROUPS = 3
PER_GROUP = 4
PREFIX_LINES = 24  # about 1 KB of shared system prompt per group: ~60 pages of 16 tokens


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-routing")) as fleet:
        for name in ("a", "b"):
            fleet.node(name)
        kv = fleet.frontend("kv", routing="kv")
        rr = fleet.frontend("rr", routing="round_robin")
        random = fleet.frontend("random", routing="random")
        fleet.wait_ready()
        for frontend in fleet.frontends.values():
            frontend.wait_instances(2)
        yield {"nodes": list(fleet.nodes.values()), "kv": kv, "rr": rr, "random": random}


def _system_prompt(tag: str, group: int) -> str:
    lines = [
        f"[{tag}/{group}] rule {i}: answer briefly, cite the manual, be kind."
        for i in range(PREFIX_LINES)
    ]
    return "\n".join(lines)


def _ask(client: openai.OpenAI, system: str, question: str) -> tuple[int, int]:
    answer = client.chat.completions.create(
        model="sim",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=4,
    )
    usage = answer.usage
    assert usage is not None
    details = usage.prompt_tokens_details
    assert details is not None
    return usage.prompt_tokens, details.cached_tokens or 0


def _served(nodes: list[NodeProcess]) -> list[float]:
    return [node_metric(n, "sgl_node_requests_total", {"outcome": "length"}) for n in nodes]


def _hit_rate(frontend: Frontend, tag: str) -> float:
    client = frontend.client()
    prompt = cached = 0
    for turn in range(PER_GROUP):  # interleaved: g0 g1 g2 g0 g1 g2 ...
        for group in range(GROUPS):
            p, c = _ask(client, _system_prompt(tag, group), f"question {turn} of group {group}?")
            prompt += p
            cached += c
    return cached / prompt


def test_a_prompt_sharing_a_long_prefix_goes_to_the_node_that_cached_it(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["kv"]
    nodes: list[NodeProcess] = fleet["nodes"]
    client = frontend.client()
    system = _system_prompt("affinity", 0)
    before = _served(nodes)
    prompt, cached = _ask(client, system, "first question?")
    assert cached == 0
    wait_until(
        lambda: frontend.metric("sgl_frontend_kv_indexed_blocks") >= prompt // 16,
        5.0,
        "the frontend indexed the first prompt's blocks",
    )
    first = [after - b for after, b in zip(_served(nodes), before, strict=True)]
    home = first.index(1)
    for i in range(5):
        prompt, cached = _ask(client, system, f"follow-up {i}?")
        assert cached >= len(system) - 16  # the whole shared prefix, to the page
    served = [after - b for after, b in zip(_served(nodes), before, strict=True)]
    assert served[home] == 6
    assert served[1 - home] == 0
    assert frontend.metric("sgl_frontend_cache_hit_blocks_total") >= 5 * (len(system) // 16)


def test_kv_aware_routing_hits_the_prefix_cache_more_than_round_robin(
    fleet: dict[str, Any],
) -> None:
    kv = _hit_rate(fleet["kv"], "kv")
    round_robin = _hit_rate(fleet["rr"], "rr")
    print(f"\nprefix-cache hit rate: kv-aware {kv:.1%}, round-robin {round_robin:.1%}")
    assert kv > round_robin
    # each group misses once with kv (its first prompt), twice with round-robin (once per node)
    assert kv > 0.6
    assert round_robin < kv - 0.1


def test_random_routing_spreads_one_repeated_prompt_over_both_nodes_in_no_fixed_order(
    fleet: dict[str, Any],
) -> None:
    """The same prompt 40 times, one after another: `kv` would keep it on the node that
    cached it, `round_robin` would alternate. Which node served each is read from the
    nodes' counters. Both nodes at least 5 times: binomially, fails once in ~10^7 runs."""
    nodes: list[NodeProcess] = fleet["nodes"]
    client = fleet["random"].client()
    system = _system_prompt("random", 0)
    homes = []
    for _ in range(40):
        before = _served(nodes)
        _ask(client, system, "the same question?")
        served = [after - b for after, b in zip(_served(nodes), before, strict=True)]
        assert sorted(served) == [0, 1], served
        homes.append(served.index(1))
    assert min(homes.count(0), homes.count(1)) >= 5, homes
    assert any(a == b for a, b in itertools.pairwise(homes)), homes  # not alternating
