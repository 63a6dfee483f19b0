"""`Discovery`: the live instances of the frontend's namespace, from the instances bucket.

It watches the bucket (`discovery.bucket`, keys `{ns}.{component}.{endpoint}.{id}`, and
`...{id}.lora.{name}` for adapters) with history, so puts and deletes arrive at once
(`_watch`), and re-lists it, because a lease that runs out (TTL expiry) does not always
produce a delete marker. A re-list reads the bucket's keys and its last revision in one
answer, so a record written meanwhile is never dropped by mistake. It comes when a lease
may have run out: just after the bucket's TTL has passed since a record's last write
reached the watch, and then every `RELIST_MIN` seconds until the server has expired it;
otherwise every `RELIST_MAX` seconds, for keys the watch missed. (A re-list every 0.5 s,
as before, was most of an idle frontend's CPU and a good part of the NATS server's.)

A record whose lease ran out is kept while its instance is still heard from (KV events,
load metrics within `SILENCE` seconds): the bucket can miss heartbeats for a whole lease
when JetStream has no leader for it (a partition, a rolling restart of a cluster); both
nodes once left the frontend's view for 4 s so, and the model answered 404.

An instance can also be *marked down* by the request path (NATS said nobody serves its
subject, or a probe found it gone): it is left out of routing until a newer revision of
its record shows it alive again (its heartbeat), or until its record goes.

`is_lost` is the probe for streams that went quiet: an instance is lost when nothing was
heard from it (KV events, load metrics) for `SILENCE` seconds and nobody answers its
`tree` subject. A node that is stopping in order still publishes metrics while it drains,
so its streams are not cut.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from actors.frontend.errors import FrontendError
from messages.codec import DecodeError, decode_json
from messages.discovery import InstanceRecord, ModelCard
from supervisor.client_replies import ReplyMux, is_no_responders

__all__ = ["Discovery", "ModelPool"]

RELIST_MIN = 0.5  # seconds between re-lists while a lease may have run out
RELIST_MAX = 5.0  # seconds between re-lists otherwise
EXPIRY_MARGIN = 0.2  # seconds past a lease's end before it is looked for
SILENCE = 2.5  # seconds without events or metrics before a quiet stream's node is probed
PROBE_TIMEOUT = 1.0
WATCH_SILENCE = 15.0  # seconds without any update while records exist: renew the watch
_CARD_ORDER = ("aggregated", "prefill", "decode", "embedding")
_OTHER_HALF = {"prefill": "decode", "decode": "prefill"}


@dataclass(frozen=True)
class ModelPool:
    """The instances that serve one model name: `live` ones can be routed to."""

    name: str
    live: tuple[InstanceRecord, ...]
    registered: tuple[InstanceRecord, ...]  # live ones and those marked down

    def of_mode(self, mode: str) -> list[InstanceRecord]:
        """Live instances in serving mode `mode`."""
        return [r for r in self.live if r.model.mode == mode]

    def unavailable(self) -> FrontendError:
        """Why no instance of this pool can take a generate request now."""
        modes = {r.model.mode for r in self.registered}
        if modes == {"embedding"}:
            why = f"model {self.name!r} is an embedding model: use /v1/embeddings"
            return FrontendError(400, why, param="model", code="embedding_model")
        if not self.live:
            why = f"every instance of model {self.name!r} is down; retry shortly"
        elif modes <= {"prefill", "embedding"} or modes <= {"decode", "embedding"}:
            have = "prefill" if "prefill" in modes else "decode"
            why = f"model {self.name!r} has {have} instances but no {_OTHER_HALF[have]} instance"
        else:
            why = f"no instance of model {self.name!r} can take the request"
        return FrontendError.of_code("no_instances", why)

    @property
    def card(self) -> ModelCard:
        """A representative card (tokenizer, block size): aggregated or prefill first."""
        records = self.live or self.registered
        return min(records, key=lambda r: _rank_of_mode(r.model.mode)).model


def _rank_of_mode(mode: str) -> int:
    return _CARD_ORDER.index(mode) if mode in _CARD_ORDER else len(_CARD_ORDER)


async def _watch(nc: Client, bucket: str, namespace: str) -> Any:
    """A subscription to every write under `namespace` in the bucket, from its history on:
    an ephemeral push consumer in memory, unacknowledged, with idle heartbeats.

    Not nats-py's `KeyValue.watch`: its ordered consumer polls for flow-control replies
    every 0.25 s, 4 wake-ups a second of an idle frontend (1 ms of its CPU a second, a
    tenth of the whole idle system's) for a stream of a few records a second. What the
    ordered consumer adds is kept otherwise: a write missed is made good by the record's
    next heartbeat or the next re-list, and a watch is renewed after the connection comes
    back (its consumer may have gone with the server) or when silent for `WATCH_SILENCE`.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        max_deliver=1,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=300.0,  # a frontend gone without unsubscribing: dropped then
    )
    return await nc.jetstream().subscribe(
        f"$KV.{bucket}.{namespace}.>",
        stream=f"KV_{bucket}",
        config=config,
        manual_ack=True,
        idle_heartbeat=5.0,
    )


class Discovery:
    """The instances of one namespace; see the module docstring."""

    def __init__(
        self,
        nc: Client,
        mux: ReplyMux,
        bucket: str,
        namespace: str,
        log: Any,
        on_change: Callable[[], None],
        heard_at: Callable[[str], float | None] = lambda _: None,
    ) -> None:
        self.nc = nc
        self.mux = mux  # the frontend's reply inboxes (probes are answered there)
        self.heard_at = heard_at  # instance → loop time its last KV event or metric came
        self.bucket = bucket
        self.namespace = namespace
        self.log = log
        self.on_change = on_change
        self._records: dict[str, tuple[int, InstanceRecord]] = {}  # key → (revision, record)
        self._deleted: dict[str, int] = {}  # key → revision of its delete marker
        self._down: dict[str, int] = {}  # instance id → highest revision seen when marked
        self._probes: dict[str, asyncio.Future[bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._heard = 0.0  # loop time of the watch's last update
        self._written: dict[str, float] = {}  # key → loop time its newest revision came
        self._lease: float | None = None  # the bucket's TTL, from the last re-list

    # --- the view ---------------------------------------------------------------------------

    def records(self) -> list[InstanceRecord]:
        """Every registered record (live or marked down)."""
        return [record for _, record in self._records.values()]

    def live(self) -> list[InstanceRecord]:
        """Records of instances not marked down."""
        return [r for r in self.records() if r.instance_id not in self._down]

    def pool(self, model: str) -> ModelPool | None:
        """The instances serving `model`, or None if no record names it."""
        registered = tuple(r for r in self.records() if r.model.name == model)
        if not registered:
            return None
        live = tuple(r for r in registered if r.instance_id not in self._down)
        return ModelPool(model, live, registered)

    def models(self) -> dict[str, list[InstanceRecord]]:
        """Live records by model name."""
        out: dict[str, list[InstanceRecord]] = {}
        for record in self.live():
            out.setdefault(record.model.name, []).append(record)
        return out

    def mark_down(self, instance_id: str, why: str) -> None:
        """Leave an instance out of routing until a newer record revision shows it alive."""
        if instance_id in self._down:
            return
        revisions = [rev for rev, r in self._records.values() if r.instance_id == instance_id]
        self._down[instance_id] = max(revisions, default=0)
        self.log.warning("instance marked down", instance_id=instance_id, why=why)
        self.on_change()

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching (in the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        announced = False
        while True:
            watcher: Any = None
            try:
                kv = await self.nc.jetstream().key_value(self.bucket)
                reconnects = self.nc.stats["reconnects"]
                watcher = await _watch(self.nc, self.bucket, self.namespace)
                follow = asyncio.get_running_loop().create_task(self._follow(watcher))
                self.log.info("watching discovery", bucket=self.bucket, namespace=self.namespace)
                loop = asyncio.get_running_loop()
                self._heard = loop.time()
                while not follow.done():
                    await self._relist(kv)
                    await asyncio.sleep(self._next_relist(loop.time()))
                    if self.nc.stats["reconnects"] != reconnects:
                        # its consumer may have gone with the server: a new one replays
                        # the bucket (a few records) and follows it from there
                        self.log.info("renewing the discovery watch after a reconnect")
                        follow.cancel()
                        break
                    if self._records and loop.time() - self._heard > WATCH_SILENCE:
                        # records are rewritten every heartbeat: a silent watch is stuck
                        # (e.g. after a NATS restart); make a new one
                        self.log.warning("discovery watch silent; renewing it")
                        follow.cancel()
                        break
                if not follow.cancelled():
                    follow.result()
            except nats.js.errors.BucketNotFoundError:
                if not announced:
                    self.log.info("discovery bucket not there yet; waiting", bucket=self.bucket)
                    announced = True
            except asyncio.CancelledError:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.unsubscribe()
                raise
            except Exception as exc:  # noqa: BLE001 - NATS trouble: retry, never give up
                self.log.warning(
                    "discovery watch failed; retrying", error=f"{type(exc).__name__}: {exc}"
                )
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.unsubscribe()
            await asyncio.sleep(RELIST_MIN)

    async def _follow(self, watcher: Any) -> None:
        prefix = f"$KV.{self.bucket}."
        async for msg in watcher.messages:
            self._heard = asyncio.get_running_loop().time()
            key = msg.subject[len(prefix) :]
            revision = msg.metadata.sequence.stream
            operation = msg.headers.get("KV-Operation") if msg.headers else None
            if operation in ("DEL", "PURGE"):
                self._remove(key, revision, "deleted")
            else:
                self._upsert(key, revision, msg.data)

    def _next_relist(self, now: float) -> float:
        """Seconds until the next re-list (see the module docstring)."""
        if self._lease is None or not self._written:
            return RELIST_MAX
        due = min(self._written.values()) + self._lease + EXPIRY_MARGIN - now
        return min(RELIST_MAX, max(RELIST_MIN, due))

    def _lease_over(self, key: str, now: float) -> bool:
        """Whether the record's lease can have run out: a bucket TTL since its newest
        revision reached us. A server that answers a re-list before it has caught up (a
        restart, a leader change in a cluster) may list none of the keys; a record written
        within its lease is kept anyway (both nodes were once dropped so for 4 s, in a
        rolling restart)."""
        if self._lease is None:  # no TTL: a key that is not there was deleted or purged
            return True
        return now >= self._written.get(key, float("-inf")) + self._lease

    async def _relist(self, kv: KeyValue) -> None:
        """Make the view equal to the bucket (catches leases that expired silently).

        One `stream_info` with the bucket's subjects (no JetStream consumer: a consumer
        per re-list would outlive it and run the server out of them): a known key whose
        subject has no message left, and whose revision is not newer than the stream,
        has expired. A key the watch missed is fetched (a direct get, no consumer)."""
        js = self.nc.jetstream()
        prefix = f"$KV.{self.bucket}."
        info = await js.stream_info(
            f"KV_{self.bucket}", subjects_filter=f"{prefix}{self.namespace}.>"
        )
        high_water = int(info.state.last_seq)
        self._lease = info.config.max_age or None  # seconds; none: records never expire
        present = {subject[len(prefix) :] for subject in (info.state.subjects or {})}
        for key in present - self._records.keys() - self._deleted.keys():
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyDeletedError as exc:  # its last message is a delete
                revision = getattr(exc.entry, "revision", None)
                if revision is not None:
                    self._remove(key, int(revision), "deleted")
                continue
            except nats.js.errors.KeyNotFoundError:  # gone meanwhile
                continue
            self._upsert(key, int(entry.revision or 0), entry.value)
        now = asyncio.get_running_loop().time()
        for key, (revision, record) in list(self._records.items()):
            if key not in present and revision <= high_water and self._lease_over(key, now):
                heard = self.heard_at(record.instance_id)
                if heard is not None and now - heard < SILENCE:
                    # Its lease ran out in the bucket, yet it publishes: JetStream took no
                    # heartbeat for a lease (a cluster without a leader for the bucket,
                    # e.g. in a partition and a rolling restart). Kept; its next
                    # heartbeat writes the record again.
                    continue
                self._remove(key, revision, "lease expired")
        for key in [k for k in self._deleted if k not in present]:  # its marker expired too
            del self._deleted[key]

    # --- applying changes -------------------------------------------------------------------

    def _upsert(self, key: str, revision: int, value: bytes | None) -> None:
        known = self._records.get(key)
        if (known is not None and known[0] >= revision) or self._deleted.get(key, -1) >= revision:
            return
        if not value:
            return
        try:
            record = decode_json(value, InstanceRecord)
        except DecodeError as exc:
            self.log.warning("undecodable discovery record ignored", key=key, error=str(exc))
            return
        self._records[key] = (revision, record)
        self._written[key] = asyncio.get_running_loop().time()
        self._deleted.pop(key, None)
        down = self._down.get(record.instance_id)
        if down is not None and revision > down:
            del self._down[record.instance_id]
            self.log.info("instance alive again", instance_id=record.instance_id)
        if known is None:
            card = record.model
            self.log.info(
                "instance added",
                key=key,
                model=card.name,
                mode=card.mode,
                dp_size=card.dp_size,
                subject=record.subjects.instance,
            )
            self.on_change()

    def _remove(self, key: str, revision: int, why: str) -> None:
        self._deleted[key] = max(revision, self._deleted.get(key, -1))
        self._written.pop(key, None)
        known = self._records.pop(key, None)
        if known is None:
            return
        instance_id = known[1].instance_id
        if not any(r.instance_id == instance_id for _, r in self._records.values()):
            self._down.pop(instance_id, None)
        self.log.info("instance removed", key=key, why=why)
        self.on_change()

    # --- liveness of quiet streams ----------------------------------------------------------

    async def is_lost(self, record: InstanceRecord, heard_at: float | None) -> bool:
        """True if the instance is gone (it is then marked down); see the module docstring."""
        instance_id = record.instance_id
        if instance_id in self._down:
            return True
        loop = asyncio.get_running_loop()
        if heard_at is not None and loop.time() - heard_at < SILENCE:
            return False
        shared = self._probes.get(instance_id)
        if shared is not None:  # one probe per instance at a time; the others wait for it
            return await asyncio.shield(shared)
        probe = self._probes[instance_id] = loop.create_future()
        lost = False
        try:
            lost = await self._probe(record)
        finally:
            del self._probes[instance_id]
            if not probe.done():
                probe.set_result(lost)
        if lost:
            self.mark_down(instance_id, "nothing heard from it and no answer to a probe")
        return lost

    async def _probe(self, record: InstanceRecord) -> bool:
        # Through the reply inboxes, not nats-py's `request`: a stream's cancel (its client
        # went away) landing as the answer does must still raise (`ReplyMux.request`).
        try:
            answer = await self.mux.request(record.subjects.tree, b"", PROBE_TIMEOUT)
        except Exception:  # noqa: BLE001 - slow or unreachable is not gone: the deadline decides
            return False
        return answer is not None and is_no_responders(answer)
