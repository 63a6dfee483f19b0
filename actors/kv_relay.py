"""`KvRelayActor`: one DP rank's KV events, from SGLang's ZMQ publisher to NATS.

It subscribes to the rank's PUB socket, decodes each batch (either event encoding),
stamps it with the instance id and rank, and publishes it on
`{namespace}.{component}.kv_events`. It follows the publisher's sequence numbers: a gap is
filled from the publisher's replay buffer when it has one; otherwise, and when the
sequence goes back (the publisher restarted), it first publishes a resync
(`AllBlocksCleared` for this rank) so no subscriber keeps a stale view. At start it
publishes a resync and then replays the publisher's whole history if it still holds it.
A subscriber that finds a gap in what reached it (NATS lost batches on the way, e.g. in a
cluster partition) asks on `{subject}.resync.{instance_id}` (`KvResyncRequest`): the relay
then does the same, up to what it has relayed, so every subscriber's view is rebuilt.
A gap shows only when a later batch arrives, so the relay also publishes its head (the last
sequence number it relayed, `KvHead` on `{subject}.head`) 1 s after its last batch and then
at doubling intervals up to 16 s while the rank is quiet: the last batches of a burst lost
on the way are noticed too. A head also finds publishes the NATS link lost at the tail
(while it was away) and rebuilds the subscribers' view.
Undecodable messages are counted and dropped; they never crash the relay.

The socket is read on the NATS link's event loop (a reader on the socket's descriptor),
so a batch goes from ZMQ to the NATS write buffer in one thread, with no hand-off per
burst. Work that may block (asking the publisher's replay socket to fill a gap) goes to
the actor's own thread while reading pauses, then reading resumes where it stopped; an
injected delay holds the stream the same way, with a timer instead of a sleep. A failure
in the reader crashes the actor (its supervisor restarts it), never the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import pykka
import zmq

from actors.faults.zmq_faults import ZmqFaults
from actors.kv.replay import fetch_replay
from actors.kv.sequence import SequenceTracker, consecutive_from_zero
from actors.nats.link import NatsLink
from actors.nats.replicas import explain
from actors.telemetry import node_metrics
from messages.chaos import ChaosZmq
from messages.codec import DecodeError, decode_json, encode_json
from messages.engine import EngineInfo
from messages.kv import (
    AllBlocksCleared,
    KvEventBatch,
    KvHead,
    KvResyncRequest,
    Resync,
    decode_sglang_batch,
    head_subject,
    resync_subject,
    sequence_number,
)
from messages.node import GetEngineInfo, GetLink
from supervisor.core import ChildContext, ExitReason, SupervisedActor, ask
from supervisor.plan import RelaySettings

__all__ = ["KvRelayActor", "stream_name"]

T = TypeVar("T")

_DRAIN_MAX = 256  # ZMQ messages taken per turn of the reader before other loop work runs
STREAM_WAIT = 60.0  # seconds the durable stream's creation waits for JetStream at start
REBUILD_MIN_INTERVAL = 1.0  # seconds: requests from several subscribers make one rebuild
HEAD_FIRST = 1.0  # seconds after the last batch: the head goes out
HEAD_MAX = 16.0  # then again at doubling intervals up to this, while the rank is quiet


def _recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """One multipart message without blocking (raises `zmq.Again` if none waits). As
    `recv_multipart`, a quarter cheaper: each part's `more` flag is read from the frame, not
    by a `getsockopt` call that builds an enum (measured 3.1 vs 4.4 µs per 3-part message)."""
    frame = sock.recv(zmq.NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


@dataclass(frozen=True)
class _FillGap:
    """From the reader: `frames` follow a gap the replay buffer may fill (blocking work)."""

    frames: list[bytes]


@dataclass(frozen=True)
class _Rebuild:
    """From the NATS loop: the subscribers' view of this rank must be rebuilt (reading
    paused): one asked (`subscriber_gap`), or the link lost publishes at the tail (`gap`)."""

    reason: Literal["subscriber_gap", "gap"] = "subscriber_gap"


@dataclass(frozen=True)
class _ReaderFailed:
    """From the reader: it raised; the actor crashes with it."""

    error: Exception


def stream_name(subject: str) -> str:
    """The JetStream stream holding a KV event subject (`dynamo.backend.kv_events` →
    `KV_EVENTS_dynamo_backend`)."""
    return "KV_EVENTS_" + subject.removesuffix(".kv_events").replace(".", "_")


class KvRelayActor(SupervisedActor):
    """Relays one DP rank's KV events; see the module docstring."""

    def __init__(self, context: ChildContext, settings: RelaySettings) -> None:
        super().__init__(context)
        self.durable_max_age = settings.durable_max_age
        self.durable_replicas = settings.durable_replicas
        self.fabric_path = settings.fabric
        self.engine_path = settings.engine_actor
        self.instance_id = settings.instance_id
        self.dp_rank = dp_rank = settings.dp_rank
        self.subject = settings.subject
        self.link: NatsLink | None = None
        self.info: EngineInfo | None = None
        self.tracker = SequenceTracker()
        self._zmq = zmq.Context()
        self._sub = self._zmq.socket(zmq.SUB)
        self._halt = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the reader is registered on the loop (touched on the loop only)
        self._label = str(dp_rank)
        self.faults = ZmqFaults()
        self.replay_endpoint: str | None = None
        self._batches_metric = node_metrics.KV_BATCHES.labels(self._label)
        self._event_metrics: dict[type[Any], Any] = {}
        self._batches_seen = 0
        self._events_seen: collections.Counter[type[Any]] = collections.Counter()
        self._outbox: list[tuple[str, bytes, str]] | None = None
        self._resync_sub: Any = None
        self._rebuilt_at = -REBUILD_MIN_INTERVAL
        # The head's timer and when a batch last went out (both on the loop's clock).
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_wait = HEAD_FIRST
        self._sent_at = 0.0

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
        if self.info.kv_replay_endpoints:
            self.replay_endpoint = self.info.kv_replay_endpoints[self.dp_rank]
        history = self._history()
        self._resync(self.tracker.start(self.link.dropped), next_seq=0 if history else None)
        self._catch_up(history)
        self._count()
        self._loop = self.link.loop
        self._loop.call_soon_threadsafe(self._start_reading)
        self._resync_sub = self.link.subscribe(
            resync_subject(self.subject, self.instance_id), self._on_resync_request
        )
        self.log.info("relaying kv events", endpoint=endpoint, subject=self.subject)

    def _ensure_stream(self, max_age: float) -> None:
        """Keep the events in a JetStream stream so a router started later can replay."""
        assert self.link is not None
        link = self.link
        name = stream_name(self.subject)
        replicas = self.durable_replicas

        async def ensure_once() -> None:
            assert link.nc is not None
            js = link.nc.jetstream()
            try:
                await js.stream_info(name)
                return
            except nats.js.errors.NotFoundError:
                pass
            await js.add_stream(
                name=name, subjects=[self.subject], max_age=max_age, num_replicas=replicas
            )

        async def ensure() -> None:
            # JetStream may not answer yet (a cluster that just formed, a leader being
            # elected): wait for it, saying so, rather than fail the node's start.
            deadline = time.monotonic() + STREAM_WAIT
            while True:
                try:
                    await ensure_once()
                    return
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                    if time.monotonic() > deadline:
                        msg = f"JetStream did not answer for {STREAM_WAIT:.0f} s: {exc!r}"
                        raise RuntimeError(msg) from None
                    self.log.warning(
                        "JetStream not answering yet; creating the durable kv event stream "
                        "again in 1 s",
                        stream=name,
                        error=type(exc).__name__,
                    )
                    await asyncio.sleep(1.0)
                except nats.js.errors.APIError as exc:
                    raise RuntimeError(explain(exc, "events.replicas", replicas)) from None

        link.call(ensure, timeout=STREAM_WAIT + 15)

    def on_exit(self, reason: ExitReason) -> None:
        self._halt.set()
        if self._resync_sub is not None and self.link is not None:
            self.link.unsubscribe(self._resync_sub)
        loop = self._loop
        if loop is not None and loop.is_running():
            detached = threading.Event()

            def detach() -> None:
                self._stop_reading()
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
                detached.set()

            try:
                loop.call_soon_threadsafe(detach)
                detached.wait(2)
            except RuntimeError:  # the loop closed meanwhile: it reads nothing any more
                pass
        self._sub.close(linger=0)
        self._zmq.term()

    def handle(self, message: Any) -> Any:
        if isinstance(message, _FillGap):
            self.relay(message.frames, blocking=True)
            self._count()
            self._resume()
            return None
        if isinstance(message, _Rebuild):
            self._rebuild(message.reason)
            self._count()
            self._resume()
            return None
        if isinstance(message, _ReaderFailed):
            msg = f"kv event reader failed: {type(message.error).__name__}: {message.error}"
            raise RuntimeError(msg) from message.error
        if isinstance(message, ChaosZmq):
            self.faults.set(message)
            rule = f"dropping {message.drop:.0%}, delaying {message.delay_fraction:.0%}"
            return True, f"kv_relay_{self.dp_rank}: {rule}"
        return super().handle(message)

    # --- the reader, on the NATS link's loop ------------------------------------------------

    def _resume(self) -> None:
        if self._loop is not None and not self._halt.is_set():
            self._loop.call_soon_threadsafe(self._start_reading)

    def _on_resync_request(self, _subject: str, _reply: str, data: bytes) -> None:
        """On the loop: a subscriber lost batches; reading pauses while the actor rebuilds."""
        try:
            asked = decode_json(data, KvResyncRequest)
        except DecodeError:
            return
        if asked.instance_id != self.instance_id or asked.dp_rank != self.dp_rank:
            return
        self._stop_reading()
        self._tell(_Rebuild())

    def _start_reading(self) -> None:
        if self._halt.is_set() or self._reading:
            return
        assert self._loop is not None
        self._reading = True
        self._loop.add_reader(self._sub.FD, self._readable)
        self._sent()  # the actor may have published (a resync, a history): its head follows
        self._readable()  # the descriptor is edge-triggered: take what came meanwhile

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            assert self._loop is not None
            self._loop.remove_reader(self._sub.FD)

    def _readable(self) -> None:
        if self._reading:
            held = self._turn(self._drain)
            if held is not None:
                self._hold(*held)

    def _drain(self) -> tuple[float, list[bytes]] | None:
        """Relay what is waiting, up to `_DRAIN_MAX` messages; returns a message that must
        wait (an injected delay, or a gap for the actor to fill), which pauses reading."""
        assert self._loop is not None
        for _ in range(_DRAIN_MAX):
            try:
                frames = _recv_frames(self._sub)
            except zmq.Again:
                if int(self._sub.EVENTS) & zmq.POLLIN:
                    self._loop.call_soon(self._readable)
                return None
            delay = self.faults.verdict()
            if delay is None:
                continue  # an injected drop
            if delay > 0 or not self.relay(frames, blocking=False):
                return delay, frames
        self._loop.call_soon(self._readable)  # more may wait: after other work of the loop
        return None

    def _hold(self, delay: float, frames: list[bytes]) -> None:
        """Pause reading: `frames` wait `delay` seconds, or go to the actor to fill a gap."""
        assert self._loop is not None
        self._stop_reading()
        if delay > 0:
            self._loop.call_later(delay, self._after_delay, frames)
        else:
            self._tell(_FillGap(frames))

    def _after_delay(self, frames: list[bytes]) -> None:
        if self._halt.is_set():
            return
        relayed = self._turn(self.relay, frames, False)
        if relayed:
            self._start_reading()
        elif relayed is not None:
            self._tell(_FillGap(frames))

    def _turn(self, work: Callable[..., T], *args: Any) -> T | None:
        """One turn of the reader: its publishes go out together at its end. A failure
        stops reading and crashes the actor (then None is returned)."""
        self._outbox = []
        try:
            return work(*args)
        except Exception as exc:  # noqa: BLE001 - the actor crashes with it
            self._stop_reading()
            self.log.error("kv event reader failed", error=f"{type(exc).__name__}: {exc}")
            self._tell(_ReaderFailed(exc))
            return None
        finally:
            outbox, self._outbox = self._outbox, None
            if outbox and self.link is not None:
                self.link.publish_many(outbox)
                self._sent()
            self._count()

    def _sent(self) -> None:
        """On the loop: batches went out; the head follows `HEAD_FIRST` s after the last."""
        assert self._loop is not None
        self._sent_at = self._loop.time()
        if self._head_timer is None or self._head_wait > HEAD_FIRST:  # idle until now
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_wait = HEAD_FIRST
            self._head_timer = self._loop.call_later(HEAD_FIRST, self._head)

    def _head(self) -> None:
        """On the loop: publish the head if the rank has been quiet `HEAD_FIRST` s, and
        schedule the next one (sooner again if batches went out meanwhile)."""
        assert self._loop is not None
        self._head_timer = None
        if self._halt.is_set() or self.link is None:
            return
        quiet = self._loop.time() - self._sent_at
        if quiet < HEAD_FIRST:
            self._head_wait = HEAD_FIRST
            self._head_timer = self._loop.call_later(HEAD_FIRST - quiet, self._head)
            return
        if not self.link.flowing:
            # NATS is away (or just back): a head or a rebuild now would be lost or held;
            # look again once publishes flow
            self._head_wait = HEAD_FIRST
            self._head_timer = self._loop.call_later(HEAD_FIRST, self._head)
            return
        if self._reading and self.tracker.take_lost(self.link.dropped):
            # the link lost publishes at the tail (NATS was away): rebuild the views
            self._stop_reading()
            self._tell(_Rebuild("gap"))
            return  # reading resumes after the rebuild, and its head follows
        seq = self.tracker.last_seq
        if seq is not None:
            head = KvHead(instance_id=self.instance_id, dp_rank=self.dp_rank, seq=seq)
            self.link.publish(head_subject(self.subject), encode_json(head))
        self._head_wait = min(self._head_wait * 2, HEAD_MAX)
        self._head_timer = self._loop.call_later(self._head_wait, self._head)

    def _tell(self, message: Any) -> None:
        with contextlib.suppress(pykka.ActorDeadError):  # exiting: on_exit stops the reader
            self.actor_ref.tell(message)

    # --- relaying -------------------------------------------------------------------------------

    def relay(self, frames: list[bytes], blocking: bool = True) -> bool:
        """Decode one ZMQ message and publish it; fill a gap by replay, or resync first.
        Unless `blocking`, returns False instead for a gap the replay buffer could fill."""
        try:
            if len(frames) != 3:
                raise DecodeError("KVEventBatch", "", f"expected 3 frames, got {len(frames)}")
            seq = sequence_number(frames[1])
            batch = decode_sglang_batch(frames[2])
        except DecodeError as exc:
            node_metrics.ZMQ_DROPPED.labels(f"kv_events_{self.dp_rank}").inc()
            self.log.warning("undecodable kv event message dropped", error=str(exc))
            return True
        assert self.link is not None
        can_replay = self.replay_endpoint is not None
        verdict = self.tracker.check(seq, hash(frames[2]), self.link.dropped, can_replay, blocking)
        if verdict.skip:
            return True
        if verdict.wait:
            return False
        if verdict.lost is not None:
            self._resync(verdict.lost, next_seq=seq)
        if verdict.fill is not None:
            start, end = verdict.fill
            node_metrics.KV_GAPS.labels(self._label).inc()
            if self._fill_gap(start, end):
                self.log.info("kv event gap filled by replay", start=start, end=end - 1)
            else:
                self.log.warning("kv event sequence gap", expected=start, got=end)
                self._resync(self.tracker.unfilled(start, end), next_seq=seq)
        if verdict.restart is not None:
            self.log.warning("kv event publisher restarted", last=self.tracker.last_seq, got=seq)
            self._resync(verdict.restart, next_seq=seq)
        self._publish(seq, batch.ts, batch.events, frames[2])
        return True

    def _publish(self, seq: int, ts: float, events: list[Any], payload: bytes) -> None:
        assert self.link is not None
        out = KvEventBatch(
            instance_id=self.instance_id, dp_rank=self.dp_rank, seq=seq, ts=ts, events=events
        )
        self._send(encode_json(out))
        self.tracker.published(seq, hash(payload))
        # Counted here, added to the metrics once per turn of the reader (`_count`): a
        # Prometheus counter takes a lock per increment.
        self._batches_seen += 1
        kinds = set(map(type, events))
        if len(kinds) == 1:  # the usual batch: one kind of event
            self._events_seen[kinds.pop()] += len(events)
        else:
            self._events_seen.update(map(type, events))

    def _count(self) -> None:
        """Add what was published since the last call to the metrics."""
        if self._batches_seen:
            self._batches_metric.inc(self._batches_seen)
            self._batches_seen = 0
        for kind, count in self._events_seen.items():
            metric = self._event_metrics.get(kind)
            if metric is None:
                metric = node_metrics.KV_EVENTS.labels(self._label, kind.__name__)
                self._event_metrics[kind] = metric
            metric.inc(count)
        self._events_seen.clear()

    def _send(self, data: bytes) -> None:
        if self._outbox is not None:
            self._outbox.append((self.subject, data, ""))
        else:
            assert self.link is not None
            self.link.publish(self.subject, data)

    def _replayed(self, start: int) -> list[tuple[int, bytes]] | None:
        if self.replay_endpoint is None:
            return None
        return fetch_replay(self._zmq, self.replay_endpoint, start)

    def _fill_gap(self, start: int, end: int) -> bool:
        """Publish batches start..end-1 from the replay buffer; False if it lacks any."""
        batches = [(s, p) for s, p in self._replayed(start) or [] if start <= s < end]
        if [s for s, _ in batches] != list(range(start, end)):
            return False
        for seq, payload in batches:
            try:
                batch = decode_sglang_batch(payload)
            except DecodeError:
                return False
            self._publish(seq, batch.ts, batch.events, payload)
        return True

    def _history(self) -> list[tuple[int, bytes]]:
        """The publisher's batches from 0 up to its first hole (none without a replay
        buffer)."""
        batches = self._replayed(0) or []
        return batches[: consecutive_from_zero([seq for seq, _ in batches])]

    def _catch_up(self, history: list[tuple[int, bytes]]) -> None:
        """At start, after the resync: replay the publisher's history from 0 (up to a hole:
        the resync stands for the rest), so subscribers rebuild the engine's cache exactly
        instead of starting blind."""
        if not history:
            return
        for seq, payload in history:
            try:
                batch = decode_sglang_batch(payload)
            except DecodeError:
                return
            self._publish(seq, batch.ts, batch.events, payload)
        self.log.info("caught up from the replay buffer", batches=len(history))

    def _rebuild(self, reason: Literal["subscriber_gap", "gap"]) -> None:
        """A resync, then the publisher's history from 0 up to the last batch relayed, if
        it still holds all of that (else the resync alone: subscribers start empty)."""
        now = time.monotonic()
        if now - self._rebuilt_at < REBUILD_MIN_INTERVAL:  # several subscribers asked at once
            return
        self._rebuilt_at = now
        last = self.tracker.last_seq
        why = Resync(reason=reason, gaps_total=self.tracker.gaps)
        if last is None:
            self._resync(why)
            return
        history = [(seq, payload) for seq, payload in self._history() if seq <= last]
        whole = len(history) == last + 1
        self._resync(why, next_seq=0 if whole else last + 1)
        if not whole:
            self.log.warning(
                "kv events were lost on the way; the publisher no longer holds the whole"
                " history, so the subscribers' view of this rank starts empty",
                reason=reason,
                relayed=last + 1,
                held=len(history),
            )
            return
        for seq, payload in history:
            try:
                batch = decode_sglang_batch(payload)
            except DecodeError:
                return
            self._publish(seq, batch.ts, batch.events, payload)
        self.log.info(
            "kv events were lost on the way; the subscribers' view rebuilt",
            reason=reason,
            batches=len(history),
        )

    def _resync(self, why: Resync, next_seq: int | None = None) -> None:
        """Publish a resync; `next_seq` is the sequence of the batch published next, when
        known (subscribers then count a batch lost right after it as a gap)."""
        assert self.link is not None
        if next_seq is not None:
            why = msgspec.structs.replace(why, next_seq=next_seq)
        node_metrics.KV_RESYNCS.labels(self._label, why.reason).inc()
        batch = KvEventBatch(
            instance_id=self.instance_id,
            dp_rank=self.dp_rank,
            seq=-1,
            ts=time.time(),
            events=[AllBlocksCleared()],
            resync=why,
        )
        self._send(encode_json(batch))
