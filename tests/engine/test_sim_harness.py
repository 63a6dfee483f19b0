"""Tools for the sim tests (no tests here): a chunk collector, free ports, ZMQ clients.

Everything synchronises on events with timeouts, never on bare sleeps.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec._utils
import zmq

from actors.engine_host.sim import END_SEQ, KV_METRICS_MODULE, SimEngine
from messages.engine import HostChunk, HostOutput
from messages.kv import SglangEventBatch, decode_sglang_batch
from messages.metrics import KvMetrics
from supervisor.chaos import free_ports
from supervisor.config import SimSection

WAIT = 10.0  # seconds: generous upper bound for anything that should happen "soon"


class Collector:
    """The engine's `emit`: keeps every chunk per request and wakes waiters."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.chunks: dict[str, list[HostChunk]] = defaultdict(list)
        self.order: list[str] = []  # request id of every chunk, in emission order

    def __call__(self, out: HostOutput | list[HostChunk]) -> None:
        batch = out if isinstance(out, list) else [out]
        with self._cond:
            for chunk in batch:
                assert isinstance(chunk, HostChunk)
                self.chunks[chunk.request_id].append(chunk)
                self.order.append(chunk.request_id)
            self._cond.notify_all()

    def wait_for(self, request_id: str, count: int = 1, timeout: float = WAIT) -> list[HostChunk]:
        """The chunks of `request_id` once it has `count` of them (or has finished)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self.chunks[request_id]) >= count or self._done(request_id), timeout
            )
            assert ok, f"{request_id}: {len(self.chunks[request_id])} chunks after {timeout}s"
            return list(self.chunks[request_id])

    def wait_done(self, request_id: str, timeout: float = WAIT) -> list[HostChunk]:
        """All chunks of `request_id`; the last one has a finish reason."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done(request_id), timeout)
            assert ok, f"{request_id} did not finish in {timeout}s: {self.chunks[request_id]}"
            chunks = list(self.chunks[request_id])
        finals = [c for c in chunks if c.finish_reason is not None]
        assert len(finals) == 1, f"{request_id}: {len(finals)} final chunks"
        return chunks

    def _done(self, request_id: str) -> bool:
        chunks = self.chunks[request_id]
        return bool(chunks) and chunks[-1].finish_reason is not None


def text_of(chunks: list[HostChunk]) -> str:
    return "".join(c.text for c in chunks)


def tokens_of(chunks: list[HostChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@contextlib.contextmanager
def running_sim(
    *,
    dp_size: int = 1,
    page_size: int = 4,
    replay: bool = True,
    metrics: bool = True,
    topic: str = "kv",
    **sim: Any,
) -> Iterator[tuple[SimEngine, Collector]]:
    """A started SimEngine (closed afterwards) and the collector of its chunks."""
    collector = Collector()
    base = free_ports(2 * dp_size)
    ipc_dir = tempfile.mkdtemp(prefix="sim-")  # short: ipc paths are limited to ~100 bytes
    endpoints = [f"ipc://{ipc_dir}/metrics-{r}" for r in range(dp_size)] if metrics else []
    engine = SimEngine(
        SimSection(**sim),
        dp_size=dp_size,
        page_size=page_size,
        kv_events_port=base,
        kv_topic=topic,
        metrics_endpoints=endpoints,
        emit=collector,
        replay_port=base + dp_size if replay else None,
    )
    engine.start()
    try:
        yield engine, collector
    finally:
        engine.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def replay(endpoint: str, start_seq: int, timeout: float = WAIT) -> list[list[bytes]]:
    """SGLang's replay protocol from a DEALER: every reply up to the end marker, which is
    included (last) as it came."""
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        dealer.connect(endpoint)
        dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
        replies = []
        while True:
            frames = dealer.recv_multipart()
            replies.append(frames)
            if frames[2] == END_SEQ:
                return replies
    finally:
        dealer.close()


def replay_batches(endpoint: str, start_seq: int = 0) -> list[tuple[int, SglangEventBatch]]:
    """(seq, batch) of every buffered batch from `start_seq`."""
    replies = replay(endpoint, start_seq)
    return [(int.from_bytes(f[2], "big"), decode_sglang_batch(f[3])) for f in replies[:-1]]


class KvSubscriber:
    """A SUB socket on one rank's KV event PUB, synchronised with the publisher."""

    def __init__(self, endpoint: str) -> None:
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)

    def sync(self, engine: SimEngine) -> None:
        """Flush the (idle) cache until an AllBlocksCleared arrives: from then on, no
        live batch is missed (PUB drops whatever it sends before a subscriber joined)."""
        for _ in range(100):
            ok, _, _ = engine.control("flush_cache", {})
            assert ok
            if self.socket.poll(100):
                self.drain()
                return
        raise AssertionError("the subscriber never received a batch")

    def recv(self, timeout: float = WAIT) -> list[bytes]:
        assert self.socket.poll(int(timeout * 1000)), "no KV event batch"
        frames: list[bytes] = self.socket.recv_multipart()
        return frames

    def drain(self) -> list[list[bytes]]:
        out = []
        while self.socket.poll(50):
            out.append(self.socket.recv_multipart())
        return out

    def close(self) -> None:
        self.socket.close()


class RestrictedUnpickler(pickle.Unpickler):
    """Loads KvMetrics pickles and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (KV_METRICS_MODULE, "KvMetrics"):
            return KvMetrics
        if (module, name) == ("msgspec._utils", "rebuild"):
            return msgspec._utils.rebuild  # type: ignore[attr-defined]
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def load_kv_metrics(data: bytes) -> KvMetrics:
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    assert isinstance(obj, KvMetrics)
    return obj


class MetricsSink:
    """A PULL socket bound where the sim's PUSH connects (the consumer binds)."""

    def __init__(self, endpoint: str) -> None:
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)

    def recv(self, timeout: float = WAIT) -> bytes:
        assert self.socket.poll(int(timeout * 1000)), "no metrics sample"
        data: bytes = self.socket.recv()
        return data

    def drain(self, quiet: float = 0.2) -> list[bytes]:
        out = []
        while self.socket.poll(int(quiet * 1000)):
            out.append(self.socket.recv())
        return out

    def close(self) -> None:
        self.socket.close()
