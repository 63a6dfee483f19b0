"""Replay of the durable KV event streams for a frontend that starts after the nodes.

With `[events] durable = true` a node's relays also store their batches in a JetStream
stream (`KV_EVENTS_{namespace}_{component}`, see `actors.kv_relay.stream_name`). At
start the frontend reads every such stream of its namespace from the beginning up to its
last message at that moment, in order, so its KV index knows the blocks cached before it
came up. Batches that arrive live meanwhile are held and applied afterwards, those
already covered by the replay (same instance and rank, sequence not newer) skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.js import api

from messages.codec import DecodeError, decode_json
from messages.kv import KvEventBatch

__all__ = ["KvReplay"]

RankKey = tuple[str, int]


class KvReplay:
    """Reads the durable streams once, then hands over to the live subscription."""

    def __init__(
        self, nc: Client, namespace: str, apply: Callable[[KvEventBatch], None], log: Any
    ) -> None:
        self.nc = nc
        self.prefix = "KV_EVENTS_" + namespace.replace(".", "_") + "_"
        self.apply = apply
        self.log = log
        self.replaying = True
        self._held: list[KvEventBatch] = []
        self._last: dict[RankKey, int] = {}  # the newest sequence replayed per rank

    def live(self, batch: KvEventBatch) -> None:
        """A batch from the live subscription: held while replaying, else applied."""
        if self.replaying:
            self._held.append(batch)
        else:
            self.apply(batch)

    async def run(self, timeout: float) -> None:
        """Replay every durable stream of the namespace (within `timeout` s), then go live."""
        started = time.monotonic()
        streams = batches = 0
        try:
            js = self.nc.jetstream()
            infos = [
                i for i in await js.streams_info() if (i.config.name or "").startswith(self.prefix)
            ]
            deadline = started + timeout
            for info in infos:
                if info.state.messages == 0:
                    continue
                streams += 1
                batches += await self._read(info, deadline)
        except Exception as exc:  # noqa: BLE001 - no replay is a worse index, not a failure
            self.log.warning(
                "KV event replay incomplete; routing learns from live events",
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._go_live()
        if streams:
            self.log.info(
                "replayed durable KV events",
                streams=streams,
                batches=batches,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _read(self, info: api.StreamInfo, deadline: float) -> int:
        name = info.config.name or ""
        last_seq = info.state.last_seq
        subjects = info.config.subjects or []
        sub = await self.nc.jetstream().subscribe(
            subjects[0] if len(subjects) == 1 else ">",
            stream=name,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        count = 0
        try:
            while True:
                remaining = max(0.001, deadline - time.monotonic())
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except asyncio.TimeoutError:
                    why = f"stream {name} not replayed within the time allowed"
                    raise TimeoutError(why) from None
                with contextlib.suppress(DecodeError):
                    batch = decode_json(msg.data, KvEventBatch)
                    self.apply(batch)
                    if batch.seq >= 0:
                        key = (batch.instance_id, batch.dp_rank)
                        self._last[key] = max(batch.seq, self._last.get(key, -1))
                    count += 1
                if msg.metadata.sequence.stream >= last_seq:
                    return count
        finally:
            with contextlib.suppress(Exception):  # not left to expire: restarts would pile them up
                consumer = await sub.consumer_info()
                await self.nc.jetstream().delete_consumer(name, consumer.name)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _go_live(self) -> None:
        held, self._held = self._held, []
        self.replaying = False
        for batch in held:
            last = self._last.get((batch.instance_id, batch.dp_rank))
            if batch.resync is None and last is not None and 0 <= batch.seq <= last:
                continue  # the replay had it
            self.apply(batch)
