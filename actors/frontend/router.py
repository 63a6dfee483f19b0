"""`Router`: which (instance, DP rank) takes a request. Pure decisions, no I/O.

Policies (`frontend.routing`):

- `kv`: for each candidate rank, `matched` = how many leading page hashes of the prompt
  the rank holds (the KV index), and

      cost = (pages − matched) × kv_block_weight + load × load_weight

  where `load` is the rank's running + waiting requests: the larger of what its last
  `LoadMetrics` said and what this frontend has in flight to it (metrics arrive once a
  second; the frontend's own count reacts at once to a burst). Lowest cost wins; ties
  are broken at random.
- `round_robin`: the candidates in a stable order (instance id, rank), in turn, per pool.
- `random`: uniformly.

Decode instances of a disaggregated pair are chosen by load alone (their KV comes from
the prefill instance): `choose(..., use_kv=False)`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from messages.discovery import InstanceRecord

__all__ = ["Candidate", "Decision", "Policy", "Router", "kv_cost"]

Policy = Literal["kv", "round_robin", "random"]


@dataclass(frozen=True)
class Candidate:
    """One DP rank of one instance, with what the router needs to weigh it."""

    record: InstanceRecord
    dp_rank: int
    matched_blocks: int  # leading prompt blocks already cached there
    load: int  # requests running + waiting

    @property
    def instance_id(self) -> str:
        """The instance's id."""
        return self.record.instance_id


@dataclass(frozen=True)
class Decision:
    """The chosen candidate, the prompt's block count and the policy that chose."""

    candidate: Candidate
    prompt_blocks: int
    policy: Policy
    cost: float


def kv_cost(
    candidate: Candidate, prompt_blocks: int, kv_block_weight: float, load_weight: float
) -> float:
    """The KV policy's cost of sending a prompt of `prompt_blocks` pages to `candidate`."""
    uncached = max(0, prompt_blocks - candidate.matched_blocks)
    return uncached * kv_block_weight + candidate.load * load_weight


class Router:
    """Chooses among candidates by policy; see the module docstring."""

    def __init__(
        self,
        policy: Policy,
        kv_block_weight: float = 1.0,
        load_weight: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.policy: Policy = policy
        self.kv_block_weight = kv_block_weight
        self.load_weight = load_weight
        self.rng = rng or random.Random()
        self._turns: dict[str, int] = {}

    def choose(
        self,
        candidates: Sequence[Candidate],
        prompt_blocks: int,
        pool: str,
        use_kv: bool = True,
    ) -> Decision:
        """The candidate for a prompt of `prompt_blocks` pages; `pool` names the set of
        candidates (model and mode) for round-robin turns. `candidates` must not be empty."""
        if not candidates:
            msg = "no candidates to choose from"
            raise ValueError(msg)
        ordered = sorted(candidates, key=lambda c: (c.instance_id, c.dp_rank))
        if self.policy == "round_robin":
            turn = self._turns.get(pool, 0)
            self._turns[pool] = turn + 1
            return Decision(ordered[turn % len(ordered)], prompt_blocks, self.policy, 0.0)
        if self.policy == "random":
            return Decision(self.rng.choice(ordered), prompt_blocks, self.policy, 0.0)
        kv_weight = self.kv_block_weight if use_kv else 0.0
        costs = [kv_cost(c, prompt_blocks, kv_weight, self.load_weight) for c in ordered]
        best = min(costs)
        tied = [c for c, cost in zip(ordered, costs, strict=True) if cost == best]
        return Decision(self.rng.choice(tied), prompt_blocks, self.policy, best)
