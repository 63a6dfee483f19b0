"""KV cache events: SGLang's ZMQ wire format (decoded) and ours on NATS.

SGLang publishes `[topic, seq (8 bytes, big-endian), msgpack([ts, [event...], dp_rank])]`
per batch. Events are maps tagged by `type` in 0.5.x (`{"type": "BlockStored", ...}`) and
arrays in older versions (`["BlockStored", ...]`); both decode here into the same types.
On NATS, the relay publishes `KvEventBatch` (JSON) stamped with instance id and DP rank.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from messages.codec import DecodeError

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KvEvent",
    "KvEventBatch",
    "KvHead",
    "KvResyncRequest",
    "Resync",
    "SglangEventBatch",
    "block_hashes",
    "decode_sglang_batch",
    "encode_sglang_batch",
    "head_subject",
    "resync_subject",
    "sequence_number",
]


class _Event(msgspec.Struct, frozen=True, tag_field="type", tag=True, omit_defaults=True, gc=False):
    """What the event types share: tagged by `type` (the class name), defaults
    left out. They hold only numbers, strings and lists of them, so they can never be part
    of a reference cycle: `gc=False` spares the collector from tracking the many a busy
    relay decodes (measured: ~10% of a batch's decoding time)."""


class BlockStored(_Event, frozen=True):
    """Pages entered the cache: one hash per page, chained on `parent_block_hash`."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None  # always present on SGLang's wire (None without LoRA)
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class BlockRemoved(_Event, frozen=True):
    """Pages left the cache (evicted)."""

    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(_Event, frozen=True):
    """The cache was emptied (engine start, flush, or a relay resync)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class SglangEventBatch(msgspec.Struct, frozen=True, array_like=True):
    """SGLang's `KVEventBatch` as it is on the wire: `[ts, events, dp_rank]`."""

    ts: float
    events: list[KvEvent]
    dp_rank: int | None = None


_map_decoder = msgspec.msgpack.Decoder(SglangEventBatch)
_encoder = msgspec.msgpack.Encoder()
_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}
_TYPES: dict[str, type[Any]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def _from_array(raw: Any) -> SglangEventBatch:
    # Older SGLang: ["BlockStored", block_hashes, parent, token_ids, block_size, lora_id, ...]
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise DecodeError("KVEventBatch", "", "expected [ts, events, dp_rank]")
    ts, events, *rest = raw
    converted = []
    for i, event in enumerate(events if isinstance(events, list) else []):
        if not isinstance(event, list) or not event or event[0] not in _FIELDS:
            raise DecodeError("KVEventBatch", f"events[{i}]", "unknown event form")
        names = _FIELDS[event[0]]
        values = dict(zip(names, event[1:], strict=False))
        try:
            converted.append(msgspec.convert(values, _TYPES[event[0]], strict=True))
        except msgspec.ValidationError as exc:
            raise DecodeError("KVEventBatch", f"events[{i}]", str(exc)) from None
    if not isinstance(events, list):
        raise DecodeError("KVEventBatch", "events", "expected a list")
    try:
        return SglangEventBatch(ts=float(ts), events=converted, dp_rank=rest[0] if rest else None)
    except (TypeError, ValueError) as exc:
        raise DecodeError("KVEventBatch", "ts", str(exc)) from None


def decode_sglang_batch(payload: bytes) -> SglangEventBatch:
    """Decode SGLang's msgpack payload (map or array event form) or raise `DecodeError`."""
    try:
        return _map_decoder.decode(payload)
    except msgspec.DecodeError as first:
        try:
            raw = msgspec.msgpack.decode(payload)
        except msgspec.DecodeError:
            raise DecodeError("KVEventBatch", "", f"malformed msgpack: {first}") from None
        try:
            return _from_array(raw)
        except DecodeError:
            raise DecodeError("KVEventBatch", "", str(first)) from None


def encode_sglang_batch(batch: SglangEventBatch) -> bytes:
    """Encode exactly as SGLang 0.5.x does (map-form events)."""
    return _encoder.encode(batch)


def sequence_number(frame: bytes) -> int:
    """SGLang's sequence frame: 8 bytes, big-endian (unsigned; -1 marks a replay's end)."""
    if len(frame) != 8:
        raise DecodeError("sequence", "", f"expected 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def block_hashes(
    token_ids: Sequence[int], page_size: int, parent: bytes | None = None
) -> list[tuple[int, bytes]]:
    """SGLang's page hashes for the full pages of `token_ids`: SHA-256 chained on the previous
    page's digest over the page's token ids (uint32 little-endian; uint64 after a 0xff marker
    when an id does not fit). Returns (int64 id as published, digest to chain on) per page.
    """
    out = []
    prev = parent
    full = len(token_ids) - len(token_ids) % page_size if page_size > 0 else 0
    # The common case, every id a uint32 (the frontend hashes each prompt to route it):
    # one range check and one pack for the whole prompt, then a slice per page.
    packed = (
        struct.pack(f"<{full}I", *token_ids[:full])
        if full and min(token_ids[:full]) >= 0 and max(token_ids[:full]) < 2**32
        else None
    )
    for start in range(0, full, page_size):
        h = hashlib.sha256()
        if prev is not None:
            h.update(prev)
        if packed is not None:
            h.update(packed[4 * start : 4 * (start + page_size)])
        else:
            page = token_ids[start : start + page_size]
            if all(0 <= t < 2**32 for t in page):
                h.update(struct.pack(f"<{len(page)}I", *page))
            else:
                wide = (t & (2**64 - 1) for t in page)
                h.update(b"\xff" + struct.pack(f"<{len(page)}Q", *wide))
        digest = h.digest()
        out.append((int.from_bytes(digest[:8], "big", signed=True), digest))
        prev = digest
    return out


class Resync(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a batch carries a resync (AllBlocksCleared): the relay lost track of the engine."""

    # subscriber_gap: a subscriber lost batches on the way and asked (`KvResyncRequest`)
    reason: Literal["relay_start", "gap", "publisher_restart", "undecodable", "subscriber_gap"]
    missed_batches: int = 0  # for gaps: how many batches were skipped
    gaps_total: int = 0  # gaps seen by this relay since it started
    # The `seq` of the first batch the relay publishes after this resync, when it knows it
    # (absent: it does not). A subscriber then sees a lost batch right after a resync as a
    # gap too; without it, the first batch it got after a resync set its count, and the
    # batches lost before that one went unnoticed until the next resync.
    next_seq: int | None = None


class KvResyncRequest(msgspec.Struct, frozen=True):
    """From a subscriber that lost batches of one rank on the way (a gap in `seq`), on
    `resync_subject(...)`: the rank's relay publishes a resync, then the publisher's history
    up to what it relayed when the publisher still holds all of it, so every subscriber's
    view of the rank is rebuilt (or starts empty: never stale)."""

    instance_id: str
    dp_rank: int


class KvHead(msgspec.Struct, frozen=True):
    """The sequence number of the last batch a rank's relay published, on
    `head_subject(...)`: 1 s after a batch when none follows, then again at doubling
    intervals (up to 16 s) while the rank stays quiet. A subscriber that lost the *last*
    batches of a burst sees no later batch, hence no gap: the head shows it, and the
    subscriber asks for a resync (`KvResyncRequest`) as for any gap."""

    instance_id: str
    dp_rank: int
    seq: int


def head_subject(events_subject: str) -> str:
    """Where an instance's relays publish their `KvHead`s (`{events subject}.head`)."""
    return f"{events_subject}.head"


def resync_subject(events_subject: str, instance_id: str) -> str:
    """Where an instance's relays take `KvResyncRequest`s (`{events subject}.resync.{id}`;
    one token more than the events subject, so event subscribers never see them)."""
    return f"{events_subject}.resync.{instance_id}"


class KvEventBatch(msgspec.Struct, frozen=True, omit_defaults=True):
    """A batch of KV events on NATS, from one instance and DP rank."""

    instance_id: str
    dp_rank: int
    seq: int  # the engine publisher's sequence number (-1 for a relay-made resync)
    ts: float
    events: list[KvEvent]
    resync: Resync | None = None
