"""The ceiling for the relay: ZMQ SUB → NATS publish of the raw payload, nothing else.

python -m tests.benchmarks._bare_forwarder ENDPOINT NATS_URL SUBJECT
"""

from __future__ import annotations

import asyncio
import sys

import nats
import zmq
import zmq.asyncio


async def main(endpoint: str, url: str, subject: str) -> None:
    nc = await nats.connect(url)
    sock = zmq.asyncio.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sock.connect(endpoint)
    print("ready", flush=True)
    while True:
        frames = await sock.recv_multipart()
        await nc.publish(subject, frames[2])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
