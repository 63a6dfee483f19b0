"""KvRelayActor against a real ZMQ publisher in SGLang's format and a real NATS server:
sequence gaps and publisher restarts produce a resync; garbage is counted, never fatal."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import zmq
from msgspec.structs import replace as struct_replace

from actors.fabric import FabricActor
from actors.kv.replay import END_SEQ
from actors.kv_relay import KvRelayActor
from messages.chaos import ChaosZmq
from messages.codec import decode_json
from messages.engine import EngineInfo
from messages.kv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    SglangEventBatch,
    encode_sglang_batch,
)
from messages.node import GetEngineInfo
from supervisor.client_replies import in_place
from supervisor.core import (
    ActorStart,
    Backoff,
    ChildContext,
    ChildSpec,
    Root,
    SupervisedActor,
    SupervisorFlags,
    ask,
)
from supervisor.plan import FabricSettings, RelaySettings
from tests.node.harness import NatsServer, free_ports

SUBJECT = "test.kv.kv_events"


class EngineInfoOnly(SupervisedActor):
    """Stands where EngineActor stands, answering only GetEngineInfo (the relay's one ask)."""

    def __init__(self, context: ChildContext, info: EngineInfo) -> None:
        super().__init__(context)
        self.info = info

    def handle(self, message: Any) -> Any:
        if isinstance(message, GetEngineInfo):
            return self.info
        return super().handle(message)


class Collector:
    """A NATS subscriber on its own thread, collecting relayed batches."""

    def __init__(self, url: str) -> None:
        self.batches: list[KvEventBatch] = []
        self.nc: Any = None
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, args=(url,), daemon=True).start()
        assert self.ready.wait(10)

    def _run(self, url: str) -> None:
        async def main() -> None:
            nc = self.nc = await nats.connect(url)

            async def on(msg: Any) -> None:
                with self.cond:
                    self.batches.append(decode_json(msg.data, KvEventBatch))
                    self.cond.notify_all()

            await nc.subscribe(SUBJECT, cb=on)
            await in_place(nc)
            self.ready.set()
            while True:
                await asyncio.sleep(3600)

        self.loop.run_until_complete(main())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(5)

    def wait(self, count: int, timeout: float = 10.0) -> list[KvEventBatch]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.batches) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    msg = f"got {len(self.batches)} batches, wanted {count}: {self.batches}"
                    raise TimeoutError(msg)
                self.cond.wait(remaining)
            return list(self.batches)


def dropped() -> float:
    """Undecodable messages the relay of rank 0 dropped, in this process."""
    from actors.telemetry import node_metrics

    value = node_metrics.REGISTRY.get_sample_value(
        "sgl_node_zmq_messages_dropped_total", {"socket": "kv_events_0"}
    )
    return value or 0.0


def joined(pub: zmq.Socket[bytes], timeout: float = 30.0) -> None:
    """Wait out ZMQ's slow joiner: send a probe (three frames, not msgpack: dropped and
    counted, never relayed) until the relay counts one; its SUB is then connected."""
    before = dropped()
    deadline = time.monotonic() + timeout
    while dropped() == before:
        assert time.monotonic() < deadline, "the relay's SUB never connected"
        pub.send_multipart([b"kv-events", bytes(8), b"\xc1"])
        time.sleep(0.05)


@contextlib.contextmanager
def relay_tree(
    tmp_path: Path,
    replay_endpoint: str | None = None,
    relay_class: type[KvRelayActor] = KvRelayActor,
    flags: SupervisorFlags | None = None,
) -> Iterator[tuple[zmq.Socket[bytes], Collector, Root]]:
    """A KvRelayActor fed by a test PUB in SGLang's format, relaying to a real NATS."""
    server = NatsServer(tmp_path)
    port = free_ports()
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    info = EngineInfo(
        backend="sim",
        model_name="m",
        context_length=1024,
        page_size=16,
        total_kv_blocks=10,
        max_batch_size=4,
        dp_size=1,
        kv_event_endpoints=[f"tcp://127.0.0.1:{port}"],
        kv_event_topic="kv-events",
        metrics_endpoints=[],
        kv_replay_endpoints=[replay_endpoint] if replay_endpoint else [],
    )
    collector = Collector(server.url)
    root = Root(
        "relaytest",
        flags or SupervisorFlags(intensity=0),
        [
            ChildSpec(
                "fabric",
                ActorStart(
                    FabricActor,
                    (
                        FabricSettings(
                            servers=[server.url], client_name="relay-test", pending_size=1 << 20
                        ),
                    ),
                ),
            ),
            ChildSpec("engine", ActorStart(EngineInfoOnly, (info,))),
            ChildSpec(
                "relay",
                ActorStart(
                    relay_class,
                    (
                        RelaySettings(
                            fabric="relaytest/fabric",
                            engine_actor="relaytest/engine",
                            instance_id="inst-1",
                            dp_rank=0,
                            subject=SUBJECT,
                        ),
                    ),
                ),
            ),
        ],
    )
    try:
        assert root.wait_ready(10)
        joined(pub)
        yield pub, collector, root
    finally:
        root.stop_and_wait(10)
        collector.close()
        pub.close(0)
        context.term()
        server.stop()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], Collector, Root]]:
    with relay_tree(tmp_path) as parts:
        yield parts


def payload_of(events: list[Any], rank: int = 0) -> bytes:
    return encode_sglang_batch(SglangEventBatch(ts=time.time(), events=events, dp_rank=rank))


def send(pub: zmq.Socket[bytes], seq: int, events: list[Any], rank: int = 0) -> None:
    pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload_of(events, rank)])


STORED = BlockStored(
    block_hashes=[11, 12],
    parent_block_hash=None,
    token_ids=list(range(32)),
    block_size=16,
    lora_id=None,
    medium="GPU",
)


def kv_metric(name: str, **labels: str) -> float:
    from actors.telemetry import node_metrics

    return node_metrics.REGISTRY.get_sample_value(name, {"dp_rank": "0", **labels}) or 0.0


def test_the_relay_starts_with_a_resync_then_relays_in_order(relay: Any) -> None:
    pub, collector, _ = relay
    before = (
        kv_metric("sgl_node_kv_event_batches_total"),
        kv_metric("sgl_node_kv_events_total", type="BlockStored"),
        kv_metric("sgl_node_kv_events_total", type="BlockRemoved"),
    )
    send(pub, 0, [AllBlocksCleared()])
    send(pub, 1, [STORED, STORED])
    send(pub, 2, [BlockRemoved(block_hashes=[12], medium="GPU"), STORED])
    batches = collector.wait(4)
    after = (
        kv_metric("sgl_node_kv_event_batches_total"),
        kv_metric("sgl_node_kv_events_total", type="BlockStored"),
        kv_metric("sgl_node_kv_events_total", type="BlockRemoved"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3, 1]
    assert batches[0].resync is not None
    assert batches[0].resync.reason == "relay_start"
    assert batches[0].resync.next_seq is None  # no replay buffer: what comes next is unknown
    assert [b.seq for b in batches[1:]] == [0, 1, 2]
    assert batches[2].events == [STORED, STORED]
    assert all((b.instance_id, b.dp_rank) == ("inst-1", 0) for b in batches)


def test_a_sequence_gap_publishes_a_resync_before_the_next_batch(relay: Any) -> None:
    pub, collector, _ = relay
    send(pub, 0, [STORED])
    send(pub, 3, [STORED])
    batches = collector.wait(4)
    gap = batches[2]
    assert gap.events == [AllBlocksCleared()]
    assert gap.resync is not None
    assert (gap.resync.reason, gap.resync.missed_batches, gap.resync.gaps_total) == ("gap", 2, 1)
    assert gap.resync.next_seq == batches[3].seq == 3


def test_a_publisher_restart_publishes_a_resync(relay: Any) -> None:
    pub, collector, _ = relay
    send(pub, 7, [STORED])
    send(pub, 0, [AllBlocksCleared()])
    batches = collector.wait(4)
    assert batches[2].resync is not None
    assert batches[2].resync.reason == "publisher_restart"
    assert batches[2].resync.next_seq == batches[3].seq == 0


def test_garbage_is_dropped_and_counted_and_the_relay_carries_on(relay: Any) -> None:
    pub, collector, root = relay
    before = dropped()
    pub.send_multipart([b"kv-events", b"\x00" * 8])  # two frames
    pub.send_multipart([b"kv-events", b"\x00" * 3, b"x"])  # short sequence
    pub.send_multipart([b"kv-events", (0).to_bytes(8, "big"), b"\xc1\xc1"])  # not msgpack
    pub.send_multipart([b"kv-events", (0).to_bytes(8, "big"), msgspec.msgpack.encode({"a": 1})])
    # the older array encoding of SGLang still decodes
    legacy = msgspec.msgpack.encode(
        [1.0, [["BlockStored", [5], None, list(range(16)), 16, None]], 0]
    )
    pub.send_multipart([b"kv-events", (0).to_bytes(8, "big"), legacy])
    batches = collector.wait(2)
    assert batches[1].events == [
        BlockStored(
            block_hashes=[5],
            parent_block_hash=None,
            token_ids=list(range(16)),
            block_size=16,
            lora_id=None,
        )
    ]
    assert dropped() - before == 4
    assert all(row.restarts == 0 for row in root.which_children())


class ReplayServer:
    """SGLang's replay ROUTER, on a real socket: serves `buffer` (seq → payload) from the
    asked sequence number on, then the end marker; counts the requests."""

    def __init__(self) -> None:
        self.buffer: dict[int, bytes] = {}
        self.requests: list[int] = []
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        port = free_ports()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.sock.bind(self.endpoint)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.halt.is_set():
            if not self.sock.poll(50):
                continue
            identity, _, start = self.sock.recv_multipart()
            first = int.from_bytes(start, "big")
            self.requests.append(first)
            for seq in sorted(self.buffer):
                if seq >= first:
                    self.sock.send_multipart(
                        [identity, b"", b"kv-events", seq.to_bytes(8, "big"), self.buffer[seq]]
                    )
            self.sock.send_multipart([identity, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        self.halt.set()
        self.thread.join(5)
        self.sock.close(0)
        self.context.term()


def test_the_relay_catches_up_at_start_and_fills_a_gap_from_the_replay_buffer(
    tmp_path: Path,
) -> None:
    server = ReplayServer()
    events = {seq: [struct_replace(STORED, block_hashes=[100 + seq])] for seq in range(6)}
    for seq in range(3):
        server.buffer[seq] = payload_of(events[seq])
    try:
        with relay_tree(tmp_path, replay_endpoint=server.endpoint) as (pub, collector, root):
            caught_up = collector.wait(4)
            assert caught_up[0].resync is not None
            assert caught_up[0].resync.next_seq == 0  # the history follows it
            assert [b.seq for b in caught_up[1:]] == [0, 1, 2]
            # 3 and 4 never reach the relay live: it finds them in the replay buffer
            for seq in (3, 4, 5):
                server.buffer[seq] = payload_of(events[seq])
            send(pub, 5, events[5])
            send(pub, 6, [BlockRemoved(block_hashes=[100])])
            batches = collector.wait(8)
            assert [b.seq for b in batches[1:]] == [0, 1, 2, 3, 4, 5, 6]
            assert [b.events for b in batches[1:7]] == [events[seq] for seq in range(6)]
            assert all(b.resync is None for b in batches[1:])
            assert server.requests == [0, 3]
            assert all(row.restarts == 0 for row in root.which_children())
    finally:
        server.close()


def test_a_gap_the_replay_buffer_cannot_fill_gets_a_resync(tmp_path: Path) -> None:
    server = ReplayServer()
    try:
        with relay_tree(tmp_path, replay_endpoint=server.endpoint) as (pub, collector, _):
            send(pub, 0, [STORED])
            send(pub, 4, [STORED])  # 1..3 are not in the (empty) buffer
            batches = collector.wait(4)
            assert batches[2].resync is not None
            assert (batches[2].resync.reason, batches[2].resync.missed_batches) == ("gap", 3)
            assert batches[2].resync.next_seq == batches[3].seq == 4
            assert server.requests == [0, 1]
    finally:
        server.close()


def test_an_injected_delay_holds_the_stream_in_order(relay: Any) -> None:
    pub, collector, _ = relay
    collector.wait(1)  # the start resync
    ok, detail = ask(
        "relaytest/relay",
        ChaosZmq(drop=0.0, delay_fraction=1.0, delay=0.2, until=time.monotonic() + 30),
        timeout=5,
    )
    assert ok, detail
    started = time.monotonic()
    for seq in range(3):
        send(pub, seq, [struct_replace(STORED, block_hashes=[seq])])
    batches = collector.wait(4)
    elapsed = time.monotonic() - started
    assert [b.seq for b in batches[1:]] == [0, 1, 2]
    assert elapsed >= 0.55, elapsed  # three messages, each held 0.2 s, one after another
    assert all(b.resync is None for b in batches[1:])


class FailingRelay(KvRelayActor):
    """A relay whose reader raises on one payload: a bug in the reader, injected."""

    def relay(self, frames: list[bytes], blocking: bool = True) -> bool:
        if frames[2] == b"boom":
            msg = "injected reader failure"
            raise RuntimeError(msg)
        return super().relay(frames, blocking)


def test_a_failing_reader_crashes_the_actor_and_its_restart_relays_again(
    tmp_path: Path,
) -> None:
    flags = SupervisorFlags(intensity=3, backoff=Backoff(initial=0.0))
    with relay_tree(tmp_path, relay_class=FailingRelay, flags=flags) as (pub, collector, root):
        send(pub, 0, [STORED])
        collector.wait(2)
        pub.send_multipart([b"kv-events", (1).to_bytes(8, "big"), b"boom"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = {row.id: row for row in root.which_children()}
            if rows["relay"].restarts == 1 and rows["relay"].state == "running":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the relay was not restarted: {root.which_children()}")
        batches = collector.wait(3)  # the new relay's start resync
        assert batches[2].resync is not None
        assert batches[2].resync.reason == "relay_start"
        joined(pub)  # the new relay's SUB
        send(pub, 2, [STORED])
        assert collector.wait(4)[3].seq == 2
