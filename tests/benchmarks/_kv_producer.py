"""Publishes KV event batches in SGLang's exact format as fast as it can (or at a rate).

    python -m tests.benchmarks._kv_producer ENDPOINT SECONDS EVENTS_PER_BATCH

Each batch carries EVENTS_PER_BATCH BlockStored events of one page (16 tokens), stamped
with the wall time it was published (for the relay latency).
"""

from __future__ import annotations

import sys
import time

import zmq

from messages.kv import BlockStored, SglangEventBatch, encode_sglang_batch


def main(endpoint: str, seconds: float, per_batch: int) -> None:
    sock = zmq.Context().socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(endpoint)
    time.sleep(1.0)  # let subscribers connect
    events = [
        BlockStored(
            block_hashes=[i],
            parent_block_hash=i - 1 if i else None,
            token_ids=list(range(16)),
            block_size=16,
            lora_id=None,
            medium="GPU",
        )
        for i in range(per_batch)
    ]
    seq = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        payload = encode_sglang_batch(SglangEventBatch(ts=time.time(), events=events, dp_rank=0))
        sock.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])
        seq += 1
        if seq % 64 == 0:
            time.sleep(0)  # let the receivers' threads run on a 2-core machine
    print(seq, flush=True)
    time.sleep(2.0)
    sock.close(linger=1000)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
