"""One sim engine over several nodes: the leader's engine and its followers' engines.

Like SGLang with `nnodes > 1`, the DP ranks are spread over the nodes (node k runs the
ranks `[k * dp / nnodes, (k + 1) * dp / nnodes)`) and requests enter at the leader. The
leader's engine binds a ROUTER at `dist_init_addr`; each follower's engine connects a
DEALER and says hello (`PeerHello`: its node rank, the instance id, its ranks) every
`PING` seconds. The leader sends a follower the requests (and aborts) for its ranks; the
follower runs them on its schedulers and sends back their chunks and its ranks' scheduler
metrics, which the leader pushes to the node's metrics sockets as if its own ranks had.
A follower silent for `LOST_AFTER` seconds is lost: its requests end with
`engine_restarting`, its ranks refuse work, until it says hello again. (SGLang itself
fails the whole engine when a node goes; the sim keeps the leader's own ranks serving.)

Frames are `[kind, payload]` (plus the DEALER's identity at the ROUTER); payloads are
msgpack. Follower → leader: `hello` (PeerHello), `chunks` (list of HostChunk), `metrics`
(rank, SGLang's pickled sample). Leader → follower: `welcome` (PeerWelcome), `generate`
(HostGenerate), `abort` (request id).

Each link's sockets belong to its own thread; other threads hand it frames through an
inproc PUSH socket of their own (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import structlog
import zmq

from actors.engine_host.spec import local_ranks
from messages.codec import decode_msgpack, encode_msgpack
from messages.engine import HostChunk, HostGenerate, PeerHello, PeerWelcome

__all__ = ["LOST_AFTER", "PING", "FollowerLink", "LeaderLink"]

PING = 0.5  # seconds between a follower's hellos
LOST_AFTER = 3.0  # a follower silent this long is lost
_POLL_MS = 100
log = structlog.get_logger(__name__)

Frames = list[bytes]


def tcp(addr: str) -> str:
    """`host:port` as a ZMQ TCP endpoint."""
    return f"tcp://{addr}"


class _Outbox:
    """Frames from any thread to the link's thread (a PUSH socket per sending thread)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self._ctx = ctx
        self.endpoint = f"inproc://sim-peer-{id(self)}"
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(self.endpoint)
        self._local = threading.local()
        self._sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False

    def send(self, frames: Frames) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            with self._lock:
                if self._closed:
                    return
                sock = self._ctx.socket(zmq.PUSH)
                sock.connect(self.endpoint)
                self._sockets.append(sock)
            self._local.sock = sock
        if not sock.closed:
            sock.send_multipart(frames)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close(linger=0)
        self.pull.close(linger=0)


class _Link:
    """A thread that polls one socket and the outbox."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], socket_type: int, name: str) -> None:
        self.ctx = ctx
        self.socket = ctx.socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.outbox = _Outbox(ctx)
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float) -> bool:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.socket.close(linger=0)
        self.outbox.close()
        return True

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.outbox.pull, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(_POLL_MS))
                if self.outbox.pull in ready:
                    self._send_pending()
                if self.socket in ready:
                    while True:
                        try:
                            self.received(self.socket.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                self.tick()
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                log.error("multi-node link failed", error=str(exc))
                time.sleep(0.1)
            except Exception:
                log.exception("multi-node link: a message could not be handled")

    def _send_pending(self) -> None:
        while True:
            try:
                frames = self.outbox.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # the peer is away: what was for it is gone, and said so
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("multi-node: peer away, message dropped", dropped=self.dropped)

    def received(self, frames: Frames) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        pass


class _Follower:
    def __init__(self, identity: bytes, hello: PeerHello, now: float) -> None:
        self.identity = identity
        self.hello = hello
        self.seen = now


class LeaderLink(_Link):
    """The leader's side (see the module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        dist_init_addr: str,
        instance_id: str,
        nnodes: int,
        dp_size: int,
        emit: Callable[[list[HostChunk]], None],
        push_metrics: Callable[[int, bytes], None],
    ) -> None:
        super().__init__(ctx, zmq.ROUTER, "sim-leader-link")
        self.addr = dist_init_addr
        self.instance_id = instance_id
        self.nnodes = nnodes
        self.dp_size = dp_size
        self._emit = emit
        self._push_metrics = push_metrics
        self._lock = threading.Lock()
        self._followers: dict[int, _Follower] = {}  # by node rank
        self._live: dict[str, int] = {}  # request id -> rank, for forwarded requests
        self._joined = threading.Condition(self._lock)

    def start(self) -> None:
        self.socket.bind(tcp(self.addr))
        super().start()
        log.info("multi-node leader listening", dist_init_addr=self.addr, nnodes=self.nnodes)

    def wait_joined(self, timeout: float) -> None:
        """Block until every follower has said hello; `TimeoutError` names the missing."""
        deadline = time.monotonic() + timeout
        next_note = time.monotonic()
        with self._joined:
            while len(self._followers) < self.nnodes - 1:
                now = time.monotonic()
                missing = sorted(set(range(1, self.nnodes)) - set(self._followers))
                if now >= deadline:
                    msg = (
                        f"node ranks {missing} did not join at {self.addr} within "
                        f"{timeout:g}s (node.join_timeout); start them with node.nnodes = "
                        f"{self.nnodes} and node.dist_init_addr = {self.addr!r}"
                    )
                    raise TimeoutError(msg)
                if now >= next_note:
                    log.info(
                        "waiting for followers",
                        joined=len(self._followers),
                        expected=self.nnodes - 1,
                        missing_node_ranks=missing,
                    )
                    next_note = now + 5.0
                self._joined.wait(min(0.5, deadline - now))
        log.info("every follower joined", nnodes=self.nnodes)

    def node_of(self, rank: int) -> int:
        return rank // (self.dp_size // self.nnodes)

    def available(self, rank: int) -> str:
        """'' if `rank`'s follower is connected, else why not."""
        node = self.node_of(rank)
        with self._lock:
            if node in self._followers:
                return ""
        return f"DP rank {rank} runs on node rank {node}, which is not connected"

    def load(self, rank: int) -> int:
        with self._lock:
            return sum(1 for r in self._live.values() if r == rank)

    def forward(self, cmd: HostGenerate, rank: int) -> None:
        with self._lock:
            follower = self._followers.get(self.node_of(rank))
            if follower is None:
                identity = None
            else:
                identity = follower.identity
                self._live[cmd.request_id] = rank
        if identity is None:
            self._fail([cmd.request_id], self.available(rank))
            return
        self.outbox.send([identity, b"generate", encode_msgpack(cmd)])

    def abort(self, request_id: str) -> bool:
        """Forward an abort; False if the request is not a forwarded one."""
        with self._lock:
            rank = self._live.get(request_id)
            follower = None if rank is None else self._followers.get(self.node_of(rank))
        if follower is None:
            return rank is not None
        self.outbox.send([follower.identity, b"abort", encode_msgpack(request_id)])
        return True

    def received(self, frames: Frames) -> None:
        if len(frames) != 3:
            log.warning("multi-node: malformed frames ignored", parts=len(frames))
            return
        identity, kind, payload = frames
        match kind:
            case b"hello":
                self._hello(identity, decode_msgpack(payload, PeerHello))
            case b"chunks":
                chunks = decode_msgpack(payload, list[HostChunk])
                with self._lock:
                    for chunk in chunks:
                        if chunk.finish_reason is not None:
                            self._live.pop(chunk.request_id, None)
                self._emit(chunks)
            case b"metrics":
                rank, sample = decode_msgpack(payload, tuple[int, bytes])
                self._push_metrics(rank, sample)
            case _:
                log.warning("multi-node: unknown frame kind ignored", kind=kind[:32])

    def _hello(self, identity: bytes, hello: PeerHello) -> None:
        expected = list(local_ranks(self.dp_size, self.nnodes, hello.node_rank))
        problem = ""
        if hello.instance_id != self.instance_id:
            problem = (
                f"instance id {hello.instance_id!r} is not the leader's "
                f"{self.instance_id!r} (set node.instance_id alike on every node)"
            )
        elif not 0 < hello.node_rank < self.nnodes:
            problem = f"node rank {hello.node_rank} is not a follower rank of {self.nnodes} nodes"
        elif hello.ranks != expected:
            problem = f"node rank {hello.node_rank} should run DP ranks {expected}"
        if problem:
            log.error("multi-node: follower refused", node_rank=hello.node_rank, why=problem)
            self.outbox.send([identity, b"welcome", encode_msgpack(PeerWelcome(False, problem))])
            return
        restarted: list[str] = []
        with self._joined:
            known = self._followers.get(hello.node_rank)
            if known is not None and known.identity == identity:
                known.seen = time.monotonic()
                return
            if known is not None:  # the follower's engine restarted: its requests are gone
                restarted = self._take_live_of(hello.node_rank)
            self._followers[hello.node_rank] = _Follower(identity, hello, time.monotonic())
            self._joined.notify_all()
        log.info("follower joined", node_rank=hello.node_rank, dp_ranks=hello.ranks)
        self.outbox.send([identity, b"welcome", encode_msgpack(PeerWelcome(True))])
        if restarted:
            why = f"node rank {hello.node_rank}'s engine restarted"
            self._fail(restarted, why)

    def _take_live_of(self, node_rank: int) -> list[str]:
        gone = [rid for rid, rank in self._live.items() if self.node_of(rank) == node_rank]
        for rid in gone:
            del self._live[rid]
        return gone

    def tick(self) -> None:
        now = time.monotonic()
        lost: list[tuple[int, list[str]]] = []
        with self._lock:
            for node_rank, follower in list(self._followers.items()):
                if now - follower.seen > LOST_AFTER:
                    del self._followers[node_rank]
                    lost.append((node_rank, self._take_live_of(node_rank)))
        for node_rank, requests in lost:
            log.error(
                "follower lost: its DP ranks refuse work until it joins again",
                node_rank=node_rank,
                silent_for=LOST_AFTER,
                requests_failed=len(requests),
            )
            self._fail(requests, f"node rank {node_rank} was lost (silent {LOST_AFTER:g}s)")

    def _fail(self, request_ids: list[str], why: str) -> None:
        if request_ids:
            self._emit(
                [
                    HostChunk(
                        request_id=rid,
                        finish_reason="error",
                        error_code="engine_restarting",
                        error_message=why,
                    )
                    for rid in request_ids
                ]
            )


class FollowerLink(_Link):
    """A follower's side (see the module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        dist_init_addr: str,
        hello: PeerHello,
        submit: Callable[[HostGenerate], None],
        abort: Callable[[str], None],
    ) -> None:
        super().__init__(ctx, zmq.DEALER, "sim-follower-link")
        self.addr = dist_init_addr
        self.hello = encode_msgpack(hello)
        self._submit = submit
        self._abort = abort
        self._next_hello = 0.0
        self._welcome: PeerWelcome | None = None
        self._welcomed = threading.Event()

    def start(self) -> None:
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # no queue of hellos while the leader is away
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.socket.connect(tcp(self.addr))
        super().start()
        log.info("multi-node follower connecting", dist_init_addr=self.addr)

    def wait_joined(self, timeout: float) -> None:
        """Block until the leader welcomed this follower; raise with its reason if it
        refused, `TimeoutError` if it never answered."""
        if not self._welcomed.wait(timeout):
            msg = f"the leader at {self.addr} did not answer within {timeout:g}s"
            raise TimeoutError(msg)
        if self._welcome is not None and not self._welcome.ok:
            msg = f"the leader refused this node: {self._welcome.message}"
            raise RuntimeError(msg)
        log.info("joined the leader", dist_init_addr=self.addr)

    def send_chunks(self, chunks: list[HostChunk]) -> None:
        self.outbox.send([b"chunks", encode_msgpack(chunks)])

    def send_metrics(self, rank: int, sample: bytes) -> None:
        self.outbox.send([b"metrics", encode_msgpack((rank, sample))])

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_hello:
            self._next_hello = now + PING
            with contextlib.suppress(zmq.Again):  # not connected yet: the next ping retries
                self.socket.send_multipart([b"hello", self.hello], zmq.NOBLOCK)

    def received(self, frames: Frames) -> None:
        if len(frames) != 2:
            log.warning("multi-node: malformed frames ignored", parts=len(frames))
            return
        kind, payload = frames
        match kind:
            case b"welcome":
                welcome = decode_msgpack(payload, PeerWelcome)
                if not self._welcomed.is_set() or not welcome.ok:
                    self._welcome = welcome
                self._welcomed.set()
                if welcome.ok:
                    log.info("the leader welcomed this node")
            case b"generate":
                self._submit(decode_msgpack(payload, HostGenerate))
            case b"abort":
                self._abort(decode_msgpack(payload, str))
            case _:
                log.warning("multi-node: unknown frame kind ignored", kind=kind[:32])
