"""The ceiling for the request plane: a bare nats-py responder that answers each request
with the same chunks as a node streaming `max_tokens` tokens: one per token, the last
carrying its token, the finish reason and the usage (as the node's does), so both
contenders send `max_tokens` chunks per request.

    python -m tests.benchmarks._bare_responder URL SUBJECT
"""

from __future__ import annotations

import asyncio
import sys

import nats

from messages.codec import decode_json, encode_json
from messages.request import GenerateRequest, StreamChunk, Usage
from supervisor.client_replies import in_place


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url)

    async def on(msg: nats.aio.msg.Msg) -> None:
        request = decode_json(msg.data, GenerateRequest)
        n = request.stop.max_tokens
        for i in range(n - 1):
            chunk = StreamChunk(
                request_id=request.request_id, index=i, token_ids=[100 + i % 26], text="a"
            )
            await nc.publish(msg.reply, encode_json(chunk))
        end = StreamChunk(
            request_id=request.request_id,
            index=n - 1,
            token_ids=[100 + (n - 1) % 26],
            text="a",
            finish_reason="length",
            usage=Usage(prompt_tokens=9, completion_tokens=n),
        )
        await nc.publish(msg.reply, encode_json(end))

    await nc.subscribe(subject, queue=subject, cb=on)
    await in_place(nc)
    print("ready", flush=True)
    while True:
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
