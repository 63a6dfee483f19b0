"""A client of SGLang's KV-event replay socket (a ROUTER beside each publisher).

Protocol (SGLang's `ZmqEventPublisher`): a DEALER sends `[b"", start_seq (8 bytes,
big-endian)]`; the publisher answers with one `[b"", topic, seq, payload]` per buffered
batch with `seq >= start_seq`, then the end marker `[b"", b"", b"\\xff" * 8, b""]`.
"""

from __future__ import annotations

import time

import zmq

__all__ = ["END_SEQ", "fetch_replay"]

END_SEQ = b"\xff" * 8


def fetch_replay(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, start_seq: int, timeout: float = 1.0
) -> list[tuple[int, bytes]] | None:
    """The buffered batches from `start_seq` on as (seq, payload), or None if the replay
    socket did not answer completely within `timeout` seconds."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        batches: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000)):
                return None
            frames = sock.recv_multipart()
            if len(frames) != 4:
                return None
            if frames[2] == END_SEQ:
                return batches
            batches.append((int.from_bytes(frames[2], "big"), frames[3]))
    finally:
        sock.close(linger=0)
