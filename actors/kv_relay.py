"""`KvRelayActor`: one DP rank's KV events, from SGLang's ZMQ publisher to NATS.

It subscribes to the rank's PUB socket, decodes each batch (either event encoding),
stamps it with the instance id and rank, and publishes it on
`{namespace}.{component}.kv_events`. It follows the publisher's sequence numbers: on a
gap, or when the sequence goes back (the publisher restarted), it first publishes a
resync (`AllBlocksCleared` for this rank) so no subscriber keeps a stale view. It also
publishes one when it starts, as it cannot know what it missed before. Undecodable
messages are counted and dropped; they never crash the relay.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import nats.js.errors
import zmq

from actors import node_metrics
from actors.nats_link import NatsLink
from messages.codec import DecodeError, encode_json
from messages.control import ExitReason
from messages.engine import EngineInfo
from messages.kv import AllBlocksCleared, KvEventBatch, Resync, decode_sglang_batch, sequence_number
from messages.node import GetEngineInfo, GetLink
from supervisor import ChildContext, SupervisedActor, ask

__all__ = ["KvRelayActor", "stream_name"]


def stream_name(subject: str) -> str:
    """The JetStream stream holding a KV event subject (`dynamo.backend.kv_events` →
    `KV_EVENTS_dynamo_backend`)."""
    return "KV_EVENTS_" + subject.removesuffix(".kv_events").replace(".", "_")


class KvRelayActor(SupervisedActor):
    """Relays one DP rank's KV events; see the module docstring."""

    def __init__(
        self,
        context: ChildContext,
        fabric_path: str,
        engine_path: str,
        instance_id: str,
        dp_rank: int,
        subject: str,
        durable_max_age: float | None = None,
    ) -> None:
        super().__init__(context)
        self.durable_max_age = durable_max_age
        self.fabric_path = fabric_path
        self.engine_path = engine_path
        self.instance_id = instance_id
        self.dp_rank = dp_rank
        self.subject = subject
        self.link: NatsLink | None = None
        self.info: EngineInfo | None = None
        self.last_seq: int | None = None
        self.gaps = 0
        self._zmq = zmq.Context()
        self._sub = self._zmq.socket(zmq.SUB)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._label = str(dp_rank)
        self._dropped_seen = 0

    def on_start_up(self) -> None:
        self.link = ask(self.fabric_path, GetLink(), timeout=10)
        self.info = ask(self.engine_path, GetEngineInfo(), timeout=10)
        assert self.info is not None
        assert self.link is not None
        endpoint = self.info.kv_event_endpoints[self.dp_rank]
        self._sub.setsockopt(zmq.RCVHWM, 0)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.info.kv_event_topic.encode())
        self._sub.connect(endpoint)
        if self.durable_max_age is not None:
            self._ensure_stream(self.durable_max_age)
        self._dropped_seen = self.link.dropped
        self._resync(Resync(reason="relay_start"))
        self._thread = threading.Thread(
            target=self._run, name=f"kv-relay-{self.dp_rank}", daemon=True
        )
        self._thread.start()
        self.log.info("relaying kv events", endpoint=endpoint, subject=self.subject)

    def _ensure_stream(self, max_age: float) -> None:
        """Keep the events in a JetStream stream so a router started later can replay."""
        assert self.link is not None
        link = self.link
        name = stream_name(self.subject)

        async def ensure() -> None:
            assert link.nc is not None
            js = link.nc.jetstream()
            try:
                await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=name, subjects=[self.subject], max_age=max_age)

        link.call(ensure, timeout=10)

    def on_exit(self, reason: ExitReason) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sub.close(linger=0)
        self._zmq.term()

    def handle(self, message: Any) -> Any:
        return super().handle(message)

    def _run(self) -> None:
        while not self._halt.is_set():
            if not self._sub.poll(100):
                continue
            frames = self._sub.recv_multipart()
            self.relay(frames)

    def relay(self, frames: list[bytes]) -> None:
        """Decode one ZMQ message and publish it (plus a resync first when needed)."""
        try:
            if len(frames) != 3:
                raise DecodeError("KVEventBatch", "", f"expected 3 frames, got {len(frames)}")
            seq = sequence_number(frames[1])
            batch = decode_sglang_batch(frames[2])
        except DecodeError as exc:
            node_metrics.ZMQ_DROPPED.labels(f"kv_events_{self.dp_rank}").inc()
            self.log.warning("undecodable kv event message dropped", error=str(exc))
            return
        assert self.link is not None
        if self.link.dropped != self._dropped_seen:
            # Publishes were lost while NATS was away: subscribers' views are stale.
            self._dropped_seen = self.link.dropped
            self._resync(Resync(reason="gap", gaps_total=self.gaps))
        last = self.last_seq
        if last is not None and seq > last + 1:
            self.gaps += 1
            node_metrics.KV_GAPS.labels(self._label).inc()
            self.log.warning("kv event sequence gap", expected=last + 1, got=seq)
            self._resync(Resync(reason="gap", missed_batches=seq - last - 1, gaps_total=self.gaps))
        elif last is not None and seq <= last:
            self.log.warning("kv event publisher restarted", last=last, got=seq)
            self._resync(Resync(reason="publisher_restart", gaps_total=self.gaps))
        self.last_seq = seq
        out = KvEventBatch(
            instance_id=self.instance_id,
            dp_rank=self.dp_rank,
            seq=seq,
            ts=batch.ts,
            events=batch.events,
        )
        self.link.publish(self.subject, encode_json(out))
        node_metrics.KV_BATCHES.labels(self._label).inc()
        for event in batch.events:
            node_metrics.KV_EVENTS.labels(self._label, type(event).__name__).inc()

    def _resync(self, why: Resync) -> None:
        assert self.link is not None
        node_metrics.KV_RESYNCS.labels(self._label, why.reason).inc()
        batch = KvEventBatch(
            instance_id=self.instance_id,
            dp_rank=self.dp_rank,
            seq=-1,
            ts=time.time(),
            events=[AllBlocksCleared()],
            resync=why,
        )
        self.link.publish(self.subject, encode_json(batch))
