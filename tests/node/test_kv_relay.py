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

from actors.fabric import FabricActor
from actors.kv_relay import KvRelayActor
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
from supervisor import ActorStart, ChildContext, ChildSpec, Root, SupervisedActor, SupervisorFlags
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
            await nc.flush()
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


@contextlib.contextmanager
def relay_tree(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], Collector, Root]]:
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
    )
    collector = Collector(server.url)
    root = Root(
        "relaytest",
        SupervisorFlags(intensity=0),
        [
            ChildSpec(
                "fabric", ActorStart(FabricActor, ([server.url], "relay-test", 5.0, 1 << 20))
            ),
            ChildSpec("engine", ActorStart(EngineInfoOnly, (info,))),
            ChildSpec(
                "relay",
                ActorStart(
                    KvRelayActor, ("relaytest/fabric", "relaytest/engine", "inst-1", 0, SUBJECT)
                ),
            ),
        ],
    )
    try:
        assert root.wait_ready(10)
        time.sleep(0.3)  # ZMQ's slow joiner: let the SUB connect before publishing
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


def send(pub: zmq.Socket[bytes], seq: int, events: list[Any], rank: int = 0) -> None:
    payload = encode_sglang_batch(SglangEventBatch(ts=time.time(), events=events, dp_rank=rank))
    pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])


STORED = BlockStored(
    block_hashes=[11, 12],
    parent_block_hash=None,
    token_ids=list(range(32)),
    block_size=16,
    lora_id=None,
    medium="GPU",
)


def test_the_relay_starts_with_a_resync_then_relays_in_order(relay: Any) -> None:
    pub, collector, _ = relay
    send(pub, 0, [AllBlocksCleared()])
    send(pub, 1, [STORED])
    send(pub, 2, [BlockRemoved(block_hashes=[12], medium="GPU")])
    batches = collector.wait(4)
    assert batches[0].resync is not None
    assert batches[0].resync.reason == "relay_start"
    assert [b.seq for b in batches[1:]] == [0, 1, 2]
    assert batches[2].events == [STORED]
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
    assert batches[3].seq == 3


def test_a_publisher_restart_publishes_a_resync(relay: Any) -> None:
    pub, collector, _ = relay
    send(pub, 7, [STORED])
    send(pub, 0, [AllBlocksCleared()])
    batches = collector.wait(4)
    assert batches[2].resync is not None
    assert batches[2].resync.reason == "publisher_restart"
    assert batches[3].seq == 0


def test_garbage_is_dropped_and_counted_and_the_relay_carries_on(relay: Any) -> None:
    pub, collector, root = relay
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
    from actors import node_metrics

    assert (
        node_metrics.REGISTRY.get_sample_value(
            "sgl_node_zmq_messages_dropped_total", {"socket": "kv_events_0"}
        )
        >= 4
    )
    assert all(row.restarts == 0 for row in root.which_children())
