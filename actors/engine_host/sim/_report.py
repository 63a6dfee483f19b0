"""What a rank reports, pure: its `stats` (control op) and its SGLang `KvMetrics` sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from actors.engine_host.sim._kv_cache import PagedKvCache
from messages.metrics import SchedulerMetrics

__all__ = ["RankCounters", "load_sample", "rank_stats"]


@dataclass
class RankCounters:
    """Running totals of one rank since start."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    finished: int = 0
    aborted: int = 0
    last_hit_rate: float = 0.0  # cached / prompt tokens of the last prefill batch

    def prefilled(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one prefill batch."""
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.prefill_steps += 1
        self.last_hit_rate = cached_tokens / prompt_tokens if prompt_tokens else 0.0


def rank_stats(
    dp_rank: int, cache: PagedKvCache, counters: RankCounters, running: int, waiting: int
) -> dict[str, Any]:
    """The `stats` control op's entry for one rank (blocks are pages)."""
    c = counters
    return {
        "dp_rank": dp_rank,
        "running": running,
        "waiting": waiting,
        "total_blocks": cache.num_blocks,
        "used_blocks": cache.used_pages,
        "cached_blocks": cache.cached_pages,
        "evictable_blocks": cache.evictable_pages,
        "free_blocks": cache.free_pages,
        "hit_rate": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
        **asdict(c),
    }


def load_sample(
    dp_rank: int,
    cache: PagedKvCache,
    counters: RankCounters,
    running: int,
    waiting: int,
    max_batch_size: int,
) -> SchedulerMetrics:
    """What SGLang's `emit_kv_metrics` would report: KV figures in tokens, usage a 0..1
    fraction rounded to 2 places with evictable (cached, unreferenced) pages counted free."""
    total_tokens = cache.num_blocks * cache.page_size
    usage = round(cache.used_pages / cache.num_blocks, 2)
    return SchedulerMetrics(
        request_active_slots=running,
        request_total_slots=max_batch_size,
        kv_active_blocks=int(usage * total_tokens),
        kv_total_blocks=total_tokens,
        num_requests_waiting=waiting,
        gpu_cache_usage_perc=usage,
        gpu_prefix_cache_hit_rate=counters.last_hit_rate,
        data_parallel_rank=dp_rank,
    )
