"""One workload for the three request-path contenders: C workers, each sending R requests
one after another (R = `requests_per_worker(C)`); each request streams MAX_TOKENS tokens
(EOS ignored, greedy)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from messages.request import GenerateRequest, SamplingOptions, StopConditions

PROMPT = "Write a short story about a lighthouse keeper and a cat."
MAX_TOKENS = 32
REQUESTS_PER_WORKER = 2
# At concurrency 1 the TTFT difference between contenders is about a millisecond on a
# ~140 ms TTFT: a single worker sends more requests so its median rests on enough samples.
SINGLE_WORKER_REQUESTS = 8


def requests_per_worker(concurrency: int) -> int:
    return SINGLE_WORKER_REQUESTS if concurrency == 1 else REQUESTS_PER_WORKER


def node_request() -> GenerateRequest:
    """The workload's request as the node's client sends it (a fresh id each time)."""
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=PROMPT,
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=MAX_TOKENS, ignore_eos=True),
    )


# A stream yields (tokens in this chunk) per chunk.
Stream = Callable[[], AsyncIterator[int]]


async def run(stream: Stream, concurrency: int) -> dict[str, Any]:
    """Drive `concurrency` workers; output tokens/s, TTFTs and inter-token gaps."""
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for _ in range(requests_per_worker(concurrency)):
            sent = time.monotonic()
            last = None
            async for n in stream():
                if n <= 0:
                    continue
                now = time.monotonic()
                if last is None:
                    ttft.append(now - sent)
                else:
                    itl.append((now - last) / n)
                last = now
                tokens += n

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "tps": tokens / (time.monotonic() - started),
        "ttft": ttft,
        "itl": itl,
        "tokens": tokens,
    }
