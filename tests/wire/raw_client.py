"""A third-party client of sgl-node, written from README.md's "Wire protocol" alone.

It uses nats-py and the standard library only: none of the project's modules (no client
library, no message classes), so that it shows what the README promises a client author
who writes one in any language. `tests/wire/test_raw_client.py` runs it against a sim node
in the default test run; if the README and the node part ways, that test fails.

What it does, each as the README describes it:
- **discovery**: the instances bucket (JetStream KV), one JSON record per instance;
- **generate**: publish a request with a fresh inbox as the reply subject, read chunks
  until one has a `finish_reason`; fields with default values are omitted, so a missing
  field is read as its default; no-responders (header `Status: 503`) means nobody serves
  the subject;
- **resume**: a gap in `index` or silence: ask the resume subject for the chunks from the
  next index, drop duplicates by index, keep asking (no-responders right after a reconnect)
  until `LOST_AFTER`;
- **cancel**: publish `{"request_id"}` on the cancel subject;
- **KV events and load metrics**: subscribe, and recompute block hashes by the README rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["LOST_AFTER", "RawClient", "block_hash_ids", "is_no_responders", "sim_bytes_ids"]

PROBE_AFTER = 2.0  # seconds of silence before asking the resume subject
LOST_AFTER = 15.0  # seconds without any answer before giving the stream up
RESUME_TIMEOUT = 1.0
BUCKET = "sgl_node_instances"  # discovery.bucket's default


def sim_bytes_ids(text: str) -> list[int]:
    """The `sim-bytes` tokenizer of the README: one token per UTF-8 byte, id = byte + 3."""
    return [b + 3 for b in text.encode()]


def block_hash_ids(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The README's block hashes: one per full page; SHA-256 over the previous page's
    digest (nothing for the first page) then the page's ids as uint32 little-endian; the
    id is the digest's first 8 bytes, big-endian signed."""
    ids, previous = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        page = token_ids[start : start + block_size]
        digest = hashlib.sha256(previous + struct.pack(f"<{block_size}I", *page)).digest()
        ids.append(int.from_bytes(digest[:8], "big", signed=True))
        previous = digest
    return ids


def is_no_responders(msg: Msg) -> bool:
    """NATS's answer when nobody subscribes to the subject: status 503, no body."""
    headers = msg.headers or {}
    return headers.get("Status") == "503" and not msg.data


def new_request_id() -> str:
    """1-128 characters from '!' to '~'."""
    return secrets.token_hex(16)


class RawClient:
    """One NATS connection and the README's operations on it."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        """Connect to the NATS server at `url`."""
        return cls(await nats.connect(url, connect_timeout=5))

    async def close(self) -> None:
        """Close the connection."""
        await self.nc.close()

    # --- discovery --------------------------------------------------------------------------

    async def instances(self) -> list[dict[str, Any]]:
        """The records of the instances bucket (one per live instance)."""
        kv = await self.nc.jetstream().key_value(BUCKET)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        records = []
        for key in keys:
            entry = await kv.get(key)
            if entry.value:
                records.append(json.loads(entry.value))
        return records

    # --- generate ---------------------------------------------------------------------------

    async def generate(
        self,
        subject: str,
        request: dict[str, Any] | bytes,
        resume_subject: str = "",
        on_chunk: Callable[[dict[str, Any]], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Send `request` (a dict, or raw bytes) to `subject`; the chunks in index order up to
        the one with a `finish_reason`. No-responders gives `[{"no_responders": True}]`.
        `on_chunk` is called with each chunk as it comes (it may be a coroutine)."""
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        request_id = "" if isinstance(request, bytes) else str(request["request_id"])
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            queue.put_nowait(msg)

        sub = await self.nc.subscribe(inbox, cb=deliver)
        try:
            await self.nc.publish(subject, data, reply=inbox)
            return await self._read_stream(queue, request_id, resume_subject, on_chunk)
        finally:
            await sub.unsubscribe()

    async def _read_stream(
        self,
        queue: asyncio.Queue[Msg],
        request_id: str,
        resume_subject: str,
        on_chunk: Callable[[dict[str, Any]], Any] | None,
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        chunks: list[dict[str, Any]] = []
        early: dict[int, dict[str, Any]] = {}  # chunks that came after a gap
        heard_at = loop.time()
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), PROBE_AFTER)
            except TimeoutError:
                msg = None
            if msg is not None:
                if is_no_responders(msg):
                    return [{"no_responders": True}]
                chunk = json.loads(msg.data)
                early[chunk.get("index", 0)] = chunk
                heard_at = loop.time()
            elif resume_subject and request_id:
                for chunk in await self.resume(resume_subject, request_id, len(chunks)):
                    early[chunk.get("index", 0)] = chunk
                    heard_at = loop.time()
            while len(chunks) in early:
                chunk = early.pop(len(chunks))
                chunks.append(chunk)
                if on_chunk is not None:
                    result = on_chunk(chunk)
                    if asyncio.iscoroutine(result):
                        await result
                if chunk.get("finish_reason") is not None:
                    return chunks
            if loop.time() - heard_at > LOST_AFTER:
                lost = {"code": "stream_lost", "message": "no node holds it", "retryable": True}
                return [*chunks, {"finish_reason": "error", "error": lost}]
            if early and resume_subject and request_id:  # a gap: ask for what is missing
                for chunk in await self.resume(resume_subject, request_id, len(chunks)):
                    early.setdefault(chunk.get("index", 0), chunk)

    async def resume(self, subject: str, request_id: str, from_index: int) -> list[dict[str, Any]]:
        """The chunks of `request_id` from `from_index` on, from the node holding the stream
        ([] when nobody answers within RESUME_TIMEOUT or nobody serves the subject yet)."""
        body = json.dumps({"request_id": request_id, "from_index": from_index}).encode()
        try:
            msg = await self.nc.request(subject, body, timeout=RESUME_TIMEOUT)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return []
        answer = json.loads(msg.data)
        return list(answer.get("chunks", []))

    async def cancel(self, subject: str, request_id: str) -> None:
        """Ask every node to cancel `request_id`."""
        await self.nc.publish(subject, json.dumps({"request_id": request_id}).encode())
        await self.nc.flush()

    async def _in_place(self) -> None:
        """Until the server has our subscriptions. Not `flush()`: nats-py 2.16 writes its
        PING ahead of commands still queued, so it can return before a SUB reaches the
        server. A message to an inbox of our own is queued behind them."""
        subject = self.nc.new_inbox()
        sub = await self.nc.subscribe(subject, max_msgs=1)
        await self.nc.publish(subject, b"")
        await sub.next_msg(5.0)

    # --- event plane ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, subject: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the JSON messages published on `subject` while the block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            queue.put_nowait(json.loads(msg.data))

        sub = await self.nc.subscribe(subject, cb=deliver)
        await self._in_place()
        try:
            yield queue
        finally:
            await sub.unsubscribe()
