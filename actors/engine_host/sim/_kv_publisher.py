"""SGLang's `ZmqEventPublisher`, frame for frame: a PUB socket, sequence numbers and replay.

Live: `[topic, seq (8 bytes big-endian), msgpack([ts, events, dp_rank])]`, seq from 0,
+1 per batch. Replay (a ROUTER, when enabled): a DEALER sends `[b"", start_seq]` and gets
`[b"", topic, seq, payload]` for each buffered batch with seq >= start_seq, then the end
marker `[b"", b"", b"\\xff" * 8, b""]`. The last 10 000 batches are buffered.

One thread per publisher owns the PUB and ROUTER sockets (ZMQ sockets are not
thread-safe) and blocks on a poller over them and an inproc channel that carries, in
order, the batches and commands of any thread that calls `publish`.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import structlog
import zmq

from messages.kv import KvEvent, SglangEventBatch, encode_sglang_batch

__all__ = ["END_SEQ", "KvEventPublisher"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)
BUFFER_STEPS = 10_000  # SGLang's default buffer_steps
PUB_HWM = 100_000  # SGLang's default hwm
_BATCH, _RESET, _STOP = b"batch", b"reset", b"stop"
_ids = itertools.count()
log = structlog.get_logger(__name__)


class KvEventPublisher:
    """The KV event publisher of one DP rank. `publish` is thread-safe."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        dp_rank: int,
        endpoint: str,
        topic: str,
        replay_endpoint: str | None = None,
    ) -> None:
        self.dp_rank = dp_rank
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self._topic = topic.encode()
        self._ctx = ctx
        self._channel = f"inproc://sim-kv-publisher-{next(_ids)}"
        self._send_lock = threading.Lock()
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=BUFFER_STEPS)
        self._next_seq = 0
        self._thread: threading.Thread | None = None
        self._sender: zmq.Socket[bytes] | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._next_seq

    def start(self) -> None:
        """Bind the sockets (errors raise here) and start the publisher thread."""
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(PUB_HWM)
        sockets = [pub]
        replay: zmq.Socket[bytes] | None = None
        try:
            pub.bind(self.endpoint)
            if self.replay_endpoint is not None:
                replay = self._ctx.socket(zmq.ROUTER)
                sockets.append(replay)
                replay.setsockopt(zmq.LINGER, 0)
                replay.bind(self.replay_endpoint)
            inbox = self._ctx.socket(zmq.PULL)
            sockets.append(inbox)
            inbox.setsockopt(zmq.LINGER, 0)
            inbox.set_hwm(0)  # unbounded: a producer must never block (or hang on close)
            inbox.bind(self._channel)
            sender = self._ctx.socket(zmq.PUSH)
            sockets.append(sender)
            sender.setsockopt(zmq.LINGER, 0)
            sender.set_hwm(0)
            sender.connect(self._channel)
        except zmq.ZMQError:
            for socket in sockets:
                socket.close(linger=0)
            raise
        self._sender = sender
        self._thread = threading.Thread(
            target=self._run,
            args=(pub, replay, inbox),
            name=f"sim-kv-publisher-{self.dp_rank}",
            daemon=True,
        )
        self._thread.start()

    def publish(self, events: list[KvEvent]) -> None:
        """Send one batch (stamped now, with this rank); a no-op for no events."""
        if events:
            batch = SglangEventBatch(ts=time.time(), events=events, dp_rank=self.dp_rank)
            self._send(_BATCH, encode_sglang_batch(batch))

    def reset_sequence(self) -> None:
        """Restart at seq 0 with an empty replay buffer, as a restarted publisher would."""
        self._send(_RESET)

    def close(self, timeout: float) -> bool:
        """Stop the thread (it closes its sockets); False if it did not stop in time."""
        if self._thread is None:
            return True
        self._send(_STOP)
        self._thread.join(timeout)
        with self._send_lock:
            if self._sender is not None:
                self._sender.close(linger=0)
                self._sender = None
        return not self._thread.is_alive()

    def _send(self, *frames: bytes) -> None:
        with self._send_lock:
            if self._sender is None:
                return  # closed (or never started): nothing listens any more
            self._sender.send_multipart(frames)

    def _run(
        self, pub: zmq.Socket[bytes], replay: zmq.Socket[bytes] | None, inbox: zmq.Socket[bytes]
    ) -> None:
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        if replay is not None:
            poller.register(replay, zmq.POLLIN)
        try:
            running = True
            while running:
                ready = dict(poller.poll())
                if inbox in ready:  # first: a replay must include what was published
                    running = self._drain(pub, inbox)
                if running and replay is not None and replay in ready:
                    self._serve_replay(replay)
        except Exception:
            log.exception("sim KV publisher failed", dp_rank=self.dp_rank)
        finally:
            for socket in (pub, replay, inbox):
                if socket is not None:
                    socket.close(linger=0)

    def _drain(self, pub: zmq.Socket[bytes], inbox: zmq.Socket[bytes]) -> bool:
        while True:
            try:
                kind, *rest = inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if kind == _STOP:
                return False
            if kind == _RESET:
                self._next_seq = 0
                self._buffer.clear()
                continue
            seq, payload = self._next_seq, rest[0]
            self._next_seq += 1
            pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            self._buffer.append((seq, payload))

    def _serve_replay(self, replay: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:  # SGLang logs and ignores these too
                log.warning("invalid KV replay request", frames=len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart(
                        (client, b"", self._topic, seq.to_bytes(8, "big"), payload)
                    )
            replay.send_multipart((client, b"", b"", END_SEQ, b""))
