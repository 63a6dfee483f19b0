"""A load generator in its own process: C concurrent streaming requests for S seconds.

    python -m tests.benchmarks._load URL SUBJECT CONCURRENCY SECONDS MAX_TOKENS [PROMPT]

Prints one JSON line: requests completed, errors, lost (no chunk for 30 s), this client's
NATS disconnects, chunks received (all, and those of completed requests, so a benchmark
can say how many chunks a request took), elapsed seconds, and per request the time to first chunk and the gaps between chunks (seconds).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import nats

from messages.codec import decode_json, encode_json
from messages.request import GenerateRequest, StopConditions, StreamChunk


async def main(
    url: str, subject: str, concurrency: int, seconds: float, max_tokens: int, prompt: str
) -> None:
    done = {
        "requests": 0,
        "chunks": 0,
        "completed_chunks": 0,
        "errors": 0,
        "lost": 0,
        "disconnects": 0,
    }
    closing = asyncio.Event()

    async def on_disconnect() -> None:  # a lost stream then is this client's, not a node's
        if closing.is_set():
            return  # our own close at the end
        done["disconnects"] += 1
        print("load generator: disconnected from NATS", file=sys.stderr, flush=True)

    async def on_error(exc: Exception) -> None:
        print(f"load generator: NATS error {type(exc).__name__}: {exc}", file=sys.stderr)

    nc = await nats.connect(url, disconnected_cb=on_disconnect, error_cb=on_error)
    ttft: list[float] = []
    gaps: list[float] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        inbox_prefix = nc.new_inbox()
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def on(msg: object) -> None:
            queue.put_nowait((msg.subject, msg.data))  # type: ignore[attr-defined]

        await nc.subscribe(inbox_prefix + ".*", cb=on)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            reply = f"{inbox_prefix}.{n}"
            request = GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompt=prompt,
                stop=StopConditions(max_tokens=max_tokens),
            )
            sent = time.monotonic()
            await nc.publish(subject, encode_json(request), reply=reply)
            last = sent
            first = True
            received = 0
            while True:
                try:
                    got, data = await asyncio.wait_for(queue.get(), 30)
                except TimeoutError:  # silence: the one outcome a node must never produce
                    done["lost"] += 1
                    print(f"lost: {request.request_id}", file=sys.stderr, flush=True)
                    break
                if got != reply:
                    continue  # a late answer to an earlier request counted as lost
                if not data:  # NATS's no-responders status: nobody serves the subject
                    done["errors"] += 1
                    await asyncio.sleep(0.1)
                    break
                now = time.monotonic()
                chunk = decode_json(data, StreamChunk)
                done["chunks"] += 1
                received += 1
                if first:
                    ttft.append(now - sent)
                    first = False
                else:
                    gaps.append(now - last)
                last = now
                if chunk.finish_reason is not None:
                    if chunk.finish_reason in ("stop", "length"):
                        done["requests"] += 1
                        done["completed_chunks"] += received
                    else:
                        done["errors"] += 1
                    break

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    closing.set()
    await nc.close()
    print(json.dumps({**done, "seconds": elapsed, "ttft": ttft, "gaps": gaps}))


if __name__ == "__main__":
    url, subject, concurrency, seconds, max_tokens = sys.argv[1:6]
    prompt = sys.argv[6] if len(sys.argv) > 6 else "benchmark"
    asyncio.run(main(url, subject, int(concurrency), float(seconds), int(max_tokens), prompt))
