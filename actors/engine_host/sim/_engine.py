"""`SimEngine`: the sim backend's face to the engine host.

It validates requests (exact errors), routes them to a DP rank, and answers control ops.
The work happens in one `RankScheduler` thread and one `KvEventPublisher` thread per DP
rank. Lock order: the engine's `_lock` (request ids, released flag, life cycle) before a
rank's lock, never the reverse; `emit` is never called under either.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import secrets
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import zmq

from actors.engine_host.sim._bootstrap import (
    FETCH_TIMEOUT,
    BootstrapServer,
    TransferFailed,
    fetch_room,
)
from actors.engine_host.sim._guided import guided_document
from actors.engine_host.sim._kv_publisher import KvEventPublisher
from actors.engine_host.sim._metrics_pusher import MetricsPusher, kv_metrics_pickle
from actors.engine_host.sim._model import prompt_offset
from actors.engine_host.sim._multinode import FollowerLink, LeaderLink
from actors.engine_host.sim._request import SimRequest
from actors.engine_host.sim._scheduler import RankScheduler
from actors.engine_host.sim._tokenizer import SimTokenizer
from actors.engine_host.sim._validation import (
    Refused,
    check_guidance,
    check_limits,
    prompt_ids,
)
from actors.engine_host.spec import local_ranks
from messages.engine import (
    EngineInfo,
    HostChunk,
    HostChunks,
    HostEmbed,
    HostGenerate,
    HostOutput,
    PeerHello,
)
from messages.metrics import SchedulerMetrics
from messages.request import Usage

if TYPE_CHECKING:
    from supervisor.config import SimSection

__all__ = ["SIM_VERSION", "MultiNode", "SimEngine"]

SIM_VERSION = "sgl-node-sim/1 (SGLang 0.5.23 wire formats)"
STOP_TIMEOUT = 2.0  # seconds per thread on close
log = structlog.get_logger(__name__)


def tcp_endpoint(host: str, port: int) -> str:
    """`tcp://host:port`, with brackets for an IPv6 address."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang's: warm-up and health requests, nothing transferred
EMBEDDING_DIM = 384


def sim_embedding(token_ids: list[int]) -> list[float]:
    """A deterministic unit vector for a token sequence (hash-seeded; not semantic)."""
    seed = hashlib.sha256(struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _chunks_of(output: HostOutput | list[HostChunk]) -> list[HostChunk] | None:
    """The chunks an output carries; None for one that is not chunks (a control reply)."""
    if isinstance(output, HostChunk):
        return [output]
    if isinstance(output, HostChunks):
        return output.chunks
    if isinstance(output, list):
        return output
    return None


class MultiNode(msgspec.Struct, frozen=True):
    """Where this engine sits in a multi-node engine (see `_multinode`)."""

    nnodes: int
    node_rank: int
    dist_init_addr: str
    instance_id: str
    join_timeout: float = 300.0


class _ForwardedMetrics:
    """A follower rank's scheduler metrics, sent to the leader instead of a local socket."""

    def __init__(self, link: FollowerLink, rank: int) -> None:
        self.link = link
        self.rank = rank

    def send(self, sample: SchedulerMetrics) -> None:
        self.link.send_metrics(self.rank, kv_metrics_pickle(sample))

    def close(self) -> None:
        pass


def _check_arguments(
    sim: SimSection,
    dp_size: int,
    page_size: int,
    kv_events_port: int,
    replay_port: int | None,
    metrics_endpoints: list[str],
) -> None:
    """Refuse arguments the engine cannot run with (ValueError naming them)."""
    if dp_size < 1 or page_size < 1:
        raise ValueError(f"dp_size and page_size must be >= 1, got {dp_size}, {page_size}")
    if metrics_endpoints and len(metrics_endpoints) != dp_size:
        raise ValueError(
            f"metrics_endpoints: expected {dp_size} (one per DP rank) or none, "
            f"got {len(metrics_endpoints)}"
        )
    if sim.vocab_size < SimTokenizer.vocab_floor:
        raise ValueError(
            f"sim.vocab_size must be >= {SimTokenizer.vocab_floor} for the byte "
            f"tokenizer, got {sim.vocab_size}"
        )
    ports = range(kv_events_port, kv_events_port + dp_size)
    if replay_port is not None and set(ports) & set(range(replay_port, replay_port + dp_size)):
        raise ValueError(
            f"replay ports {replay_port}..{replay_port + dp_size - 1} overlap the KV "
            f"event ports {ports.start}..{ports.stop - 1}"
        )


class SimEngine:
    """A simulated SGLang engine with DP ranks; see the package docstring."""

    def __init__(
        self,
        sim: SimSection,
        *,
        dp_size: int,
        page_size: int,
        kv_events_port: int,
        kv_topic: str,
        metrics_endpoints: list[str],
        emit: Callable[[HostOutput | list[HostChunk]], None],
        model_name: str = "sim",
        bind_host: str = "127.0.0.1",
        replay_port: int | None = None,
        mode: str = "aggregated",
        transfer_seconds_per_token: float = 0.0,
        multinode: MultiNode | None = None,
        bootstrap: tuple[str, int] | None = None,
    ) -> None:
        self.mode = mode
        self.multinode = multinode
        self.transfer_seconds_per_token = transfer_seconds_per_token
        _check_arguments(sim, dp_size, page_size, kv_events_port, replay_port, metrics_endpoints)
        ports = range(kv_events_port, kv_events_port + dp_size)
        self.sim = sim
        self.dp_size = dp_size
        self.page_size = page_size
        self.model_name = model_name
        self.tokenizer = SimTokenizer()
        self._topic = kv_topic
        self._out = emit
        # Multi-node: this node's ranks; the leader's link to its followers, or a
        # follower's link to its leader, and the requests a follower runs for the leader.
        self.local = (
            local_ranks(dp_size, multinode.nnodes, multinode.node_rank)
            if multinode is not None
            else range(dp_size)
        )
        self._leader: LeaderLink | None = None
        self._follower: FollowerLink | None = None
        self._remote_ids: set[str] = set()
        self._remote_lock = threading.Lock()
        self._remote_pushers: dict[int, MetricsPusher] = {}
        self._kv_endpoints = [tcp_endpoint(bind_host, p) for p in ports]
        self._replay_endpoints = [
            tcp_endpoint(bind_host, replay_port + r) if replay_port is not None else None
            for r in range(dp_size)
        ]
        self._metrics_endpoints = list(metrics_endpoints)
        self._lock = threading.Lock()
        self._live: dict[str, RankScheduler] = {}
        self._arrivals = itertools.count()
        self._state = "new"  # new -> running -> closed
        self._init_control_state()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._publishers: dict[int, KvEventPublisher] = {}  # by global rank (local ones)
        self._ranks: list[RankScheduler] = []  # the local ranks
        self._by_rank: dict[int, RankScheduler] = {}
        self._closed = threading.Event()
        # Disaggregation: a prefill node's bootstrap server (where it listens) and the
        # rooms of its running prefills; a decode node's requests fetching their KV cache.
        self._bootstrap_at = bootstrap if mode == "prefill" else None
        self._bootstrap: BootstrapServer | None = None
        self._rooms: dict[str, int] = {}  # request id -> room (prefill)
        self._fetching: dict[str, threading.Event] = {}  # request id -> its cancel (decode)

    def _init_control_state(self) -> None:
        """What the control ops change: memory, speed, weights, adapters, sessions."""
        self._released = False
        self._slow = 1.0
        self._weight_version = ""
        self._adapters: dict[str, str] = {}
        self._sessions: set[str] = set()
        self._profiling = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the KV event sockets, connect the metrics sockets, start the schedulers
        and publish each rank's initial AllBlocksCleared. Socket errors raise here."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"SimEngine.start: the engine is {self._state}")
            self._ctx = zmq.Context()
            try:
                if self._bootstrap_at is not None:
                    self._bootstrap = BootstrapServer(*self._bootstrap_at)
                    self._bootstrap.start()
                self._start_link(self._ctx)
                for rank in self.local:
                    self._start_rank(self._ctx, rank)
            except BaseException:
                self._fail_start()
                raise
        # Outside the lock: the followers' chunks come back through emit meanwhile.
        link = self._leader or self._follower
        if link is not None and self.multinode is not None:
            try:
                link.wait_joined(self.multinode.join_timeout)
            except BaseException:
                self._fail_start()
                raise
        with self._lock:
            if self._state == "new":
                self._state = "running"
        log.info(
            "sim engine started",
            dp_size=self.dp_size,
            local_ranks=list(self.local),
            kv_events=[self._kv_endpoints[r] for r in self.local],
        )

    def _fail_start(self) -> None:
        # Called with or without `_lock` held: a plain assignment, no lock taken here.
        self._state = "closed"  # not restartable: build a new engine
        self._shutdown()
        self._closed.set()

    def _start_link(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        spec = self.multinode
        if spec is None or spec.nnodes == 1:
            return
        if spec.node_rank == 0:
            for rank in range(self.dp_size):
                if rank not in self.local and self._metrics_endpoints:
                    self._remote_pushers[rank] = MetricsPusher(ctx, self._metrics_endpoints[rank])
            self._leader = LeaderLink(
                ctx,
                spec.dist_init_addr,
                spec.instance_id,
                spec.nnodes,
                self.dp_size,
                self._emit,
                self._push_remote_metrics,
            )
            self._leader.start()
        else:
            hello = PeerHello(spec.node_rank, spec.instance_id, list(self.local))
            self._follower = FollowerLink(
                ctx, spec.dist_init_addr, hello, self._submit_for_leader, self.abort
            )
            self._follower.start()

    def _push_remote_metrics(self, rank: int, sample: bytes) -> None:
        pusher = self._remote_pushers.get(rank)
        if pusher is not None:
            pusher.send_raw(sample)

    def _submit_for_leader(self, cmd: HostGenerate) -> None:
        with self._remote_lock:
            self._remote_ids.add(cmd.request_id)
        self.submit(cmd)

    def _emit(self, output: HostOutput | list[HostChunk]) -> None:
        """Outputs go to the node; on a follower, those of the leader's requests go back to
        the leader instead."""
        if self._rooms:
            self._prefilled(output)
        if self._follower is None or not self._remote_ids:
            self._out(output)
            return
        chunks = _chunks_of(output)
        if chunks is None:
            self._out(output)
            return
        mine, theirs = [], []
        with self._remote_lock:
            for chunk in chunks:
                if chunk.request_id in self._remote_ids:
                    theirs.append(chunk)
                    if chunk.finish_reason is not None:
                        self._remote_ids.discard(chunk.request_id)
                else:
                    mine.append(chunk)
        if theirs:
            self._follower.send_chunks(theirs)
        if mine:
            self._out(mine)

    def _prefilled(self, output: HostOutput | list[HostChunk]) -> None:
        """A prefill node: the rooms of the prefills that finished are ready for decodes."""
        for chunk in _chunks_of(output) or []:
            if chunk.finish_reason is None:
                continue
            with self._lock:
                room = self._rooms.pop(chunk.request_id, None)
            if room is not None and chunk.finish_reason in ("stop", "length"):
                assert self._bootstrap is not None
                self._bootstrap.ready(room)

    def _start_rank(self, ctx: zmq.Context[zmq.Socket[bytes]], rank: int) -> None:
        publisher = KvEventPublisher(
            ctx, rank, self._kv_endpoints[rank], self._topic, self._replay_endpoints[rank]
        )
        publisher.start()
        self._publishers[rank] = publisher
        metrics: MetricsPusher | _ForwardedMetrics | None = None
        if self._follower is not None:
            metrics = _ForwardedMetrics(self._follower, rank)
        elif self._metrics_endpoints:
            metrics = MetricsPusher(ctx, self._metrics_endpoints[rank])
        scheduler = RankScheduler(
            rank,
            self.sim,
            self.page_size,
            publisher,
            metrics,
            self._emit,
            lambda: self._slow,
            self._forget,
        )
        self._ranks.append(scheduler)
        self._by_rank[rank] = scheduler
        scheduler.flush_cache()  # SGLang resets its tree at start: AllBlocksCleared first
        scheduler.start()

    def serve(self) -> None:
        """Block until `close` (the host's main thread waits here; the sim's work runs on
        its own threads)."""
        # Never an unbounded wait on the main thread: a signal delivered to another
        # thread would not wake it, and the host's SIGTERM handler would never run. (One
        # the main thread gets interrupts the wait: the bound is for the rare other case.)
        while not self._closed.wait(1.0):
            pass

    def close(self) -> None:
        """Stop every thread and close every socket; in-flight requests end with an
        `engine_restarting` error. Bounded in time: a stuck thread is left behind."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        try:
            self._shutdown()
        finally:
            self._closed.set()
        log.info("sim engine closed")

    def _shutdown(self) -> None:
        # Every thread is asked to stop, even after one failed to.
        stopped = [rank.stop(STOP_TIMEOUT) for rank in self._ranks]
        stopped += [pub.close(STOP_TIMEOUT) for pub in self._publishers.values()]
        link = self._leader or self._follower
        if link is not None:
            stopped.append(link.close(STOP_TIMEOUT))
        if self._bootstrap is not None:
            self._bootstrap.close()
        for cancel in list(self._fetching.values()):  # no lock: `_fail_start` holds it
            cancel.set()
        for pusher in self._remote_pushers.values():
            pusher.close()
        clean = all(stopped)
        if self._ctx is not None:
            if clean:
                self._ctx.term()
            else:  # terminating would wait for the stuck thread's sockets forever
                log.warning("sim engine: a thread did not stop; ZMQ context left open")
            self._ctx = None

    def info(self) -> EngineInfo:
        """What the host reports about this engine."""
        return EngineInfo(
            backend="sim",
            model_name=self.model_name,
            context_length=self.sim.context_length,
            page_size=self.page_size,
            total_kv_blocks=self.sim.num_blocks,
            max_batch_size=self.sim.max_batch_size,
            dp_size=self.dp_size,
            kv_event_endpoints=list(self._kv_endpoints),
            kv_event_topic=self._topic,
            metrics_endpoints=list(self._metrics_endpoints),
            eos_token_ids=[self.sim.eos_token_id],
            version=SIM_VERSION,
            tokenizer="sim-bytes",
            kv_replay_endpoints=[e.replace("*", "127.0.0.1") for e in self._replay_endpoints if e],
        )

    # -- requests ----------------------------------------------------------------------------

    def submit(self, cmd: HostGenerate) -> None:
        """Queue a generation; a refusal is emitted as one error chunk. Thread-safe.

        In decode mode a request carries the prefill node's bootstrap info: it waits for
        its prefill to finish there (`_bootstrap.py`), then its KV cache "arrives" after
        prompt tokens × the transfer time per token (simulated), then it decodes. A prefill
        node runs the bootstrap server. SGLang's fake bootstrap host (warm-up, canaries)
        transfers nothing.
        """
        bootstrap = cmd.bootstrap
        if bootstrap is None or bootstrap.host == FAKE_BOOTSTRAP_HOST:
            self._admit(cmd)
        elif self.mode == "prefill" and self._bootstrap is not None:
            with self._lock:
                self._rooms[cmd.request_id] = bootstrap.room
            self._admit(cmd)
        elif self.mode == "decode":
            cancel = threading.Event()
            with self._lock:
                self._fetching[cmd.request_id] = cancel
            threading.Thread(
                target=self._fetch, args=(cmd, cancel), name="sim-kv-fetch", daemon=True
            ).start()
        else:
            self._admit(cmd)

    def _fetch(self, cmd: HostGenerate, cancel: threading.Event) -> None:
        """A decode request's KV transfer (its own thread): wait for the prefill, then the
        simulated transfer time; then admit it. A cancel meanwhile ends it `cancelled`."""
        assert cmd.bootstrap is not None
        info = cmd.bootstrap
        failed: TransferFailed | None = None
        try:
            fetched = fetch_room(info.host, info.port, info.room, cancel.is_set, FETCH_TIMEOUT)
            if fetched:
                try:
                    tokens = len(prompt_ids(cmd, self.tokenizer, self.sim.vocab_size))
                except Refused:
                    tokens = 0  # refused again, with its reason, when admitted
                fetched = not cancel.wait(tokens * self.transfer_seconds_per_token * self._slow)
        except TransferFailed as exc:
            failed, fetched = exc, False
        with self._lock:
            self._fetching.pop(cmd.request_id, None)
            running = self._state == "running"
        if fetched:
            self._admit(cmd)
        elif not running:
            return  # the engine closed: the node ends the request
        elif failed is not None:
            log.warning("kv transfer failed", request_id=cmd.request_id, error=str(failed))
            self._emit(
                HostChunk(
                    request_id=cmd.request_id,
                    finish_reason="error",
                    error_code="kv_transfer_failed",
                    error_message=str(failed),
                    error_field="bootstrap_info",
                )
            )
        else:
            self._emit(HostChunk(request_id=cmd.request_id, finish_reason="cancelled"))

    def embed(self, cmd: HostEmbed) -> None:
        """Deterministic unit vectors (a simulation: similar texts are not close)."""
        inputs = cmd.token_ids or [self.tokenizer.encode(text) for text in cmd.texts or []]
        tokens = sum(len(i) for i in inputs)
        limit = cmd.max_prompt_tokens or self.sim.context_length
        if not inputs or max(len(i) for i in inputs) > limit:
            problem = f"an input has more than {limit} tokens" if inputs else "no input"
            self._emit(
                HostChunk(
                    request_id=cmd.request_id,
                    finish_reason="error",
                    error_code="invalid_request",
                    error_message=problem,
                    error_field="input",
                )
            )
            return
        self._emit(
            HostChunk(
                request_id=cmd.request_id,
                finish_reason="stop",
                embeddings=[sim_embedding(ids) for ids in inputs],
                usage=Usage(prompt_tokens=tokens, completion_tokens=0),
            )
        )

    def _admit(self, cmd: HostGenerate) -> None:
        try:
            if cmd.lora and cmd.lora not in self._adapters:
                raise Refused("invalid_request", f"LoRA adapter {cmd.lora!r} is not loaded", "lora")
            check_guidance(cmd)
            prompt = prompt_ids(cmd, self.tokenizer, self.sim.vocab_size)
            forced = _guided_tokens(cmd, prompt)
            context = prompt + cmd.continuation_ids
            with self._lock:
                rank = self._admission_rank(cmd, len(context))
                if isinstance(rank, int):  # a follower's rank: it runs the request
                    forward_to = rank
                else:
                    forward_to = None
                    self._enqueue(cmd, context, forced, rank)
            if forward_to is not None and self._leader is not None:
                self._leader.forward(msgspec.structs.replace(cmd, dp_rank=forward_to), forward_to)
        except Refused as refusal:
            self._emit(
                HostChunk(
                    request_id=cmd.request_id,
                    finish_reason="error",
                    error_code=refusal.code,
                    error_message=str(refusal),
                    error_field=refusal.field,
                )
            )

    def _enqueue(
        self,
        cmd: HostGenerate,
        context: list[int],
        forced: list[int] | None,
        rank: RankScheduler,
    ) -> None:
        """Queue `cmd` (its prompt and any continuation: `context`) on a local rank; call
        with `_lock` held."""
        req = SimRequest(
            request_id=cmd.request_id,
            prompt=context,
            stop=cmd.stop,
            output=cmd.output,
            eos_token_id=self.sim.eos_token_id,
            priority=cmd.priority or 0,
            arrival=next(self._arrivals),
            forced=forced,
            continued=len(cmd.continuation_ids),
        )
        self._live[cmd.request_id] = rank
        rank.enqueue(req)

    def abort(self, request_id: str) -> None:
        """End the request with `cancelled` (at the next step boundary if it is running).
        Unknown or finished ids are ignored. Thread-safe."""
        with self._lock:
            rank = self._live.get(request_id)
            fetching = self._fetching.get(request_id)
        if fetching is not None:  # still waiting for its KV cache: ends `cancelled`
            fetching.set()
        elif rank is not None:
            rank.abort(request_id)
        elif self._leader is not None:
            self._leader.abort(request_id)  # a follower runs it, if anyone

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)

    def _admission_rank(self, cmd: HostGenerate, prompt_tokens: int) -> RankScheduler | int:
        """The local rank for `cmd`, a follower's rank (an int) or `Refused`; call with
        `_lock` held."""
        if self._state != "running":
            raise Refused("engine_error", f"the sim engine is not running ({self._state})")
        if self._released:
            raise Refused("engine_error", "the KV cache memory is released; resume it first")
        if cmd.request_id in self._live:
            raise Refused(
                "invalid_request",
                f"request id {cmd.request_id!r} is already running",
                "request_id",
            )
        check_limits(cmd, prompt_tokens, self.sim, self.page_size, self.dp_size)
        leader = self._leader
        if cmd.dp_rank is not None and cmd.dp_rank not in self._by_rank:
            why = leader.available(cmd.dp_rank) if leader is not None else "not on this node"
            if why:
                raise Refused("engine_restarting", why)
            return cmd.dp_rank
        if cmd.dp_rank is not None:
            rank = self._by_rank[cmd.dp_rank]
        else:
            loads: list[tuple[int, int]] = [(r.load(), r.dp_rank) for r in self._ranks]
            if leader is not None:
                loads += [
                    (leader.load(r), r)
                    for r in range(self.dp_size)
                    if r not in self._by_rank and not leader.available(r)
                ]
            chosen = min(loads)[1]
            if chosen not in self._by_rank:
                return chosen
            rank = self._by_rank[chosen]
        if rank.failure:
            raise Refused("engine_error", f"DP rank {rank.dp_rank} failed: {rank.failure}")
        return rank

    # -- control -----------------------------------------------------------------------------

    def control(self, op: str, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """Run control op `op`: (ok, message, data). Thread-safe."""
        match op:
            case "info":
                return True, "", msgspec.to_builtins(self.info())
            case "stats":
                return True, "", self._stats()
            case "kv_view":
                return True, "", {"ranks": [rank.kv_view() for rank in self._ranks]}
            case "update_weights":
                self._weight_version = str(
                    args.get("weight_version") or args.get("model_path") or ""
                )
                return (
                    True,
                    "weights reloaded (simulated)",
                    {"weight_version": self._weight_version},
                )
            case "update_weight_version":
                self._weight_version = str(args.get("version", ""))
                return True, f"weight version is now {self._weight_version!r}", {}
            case "lora_load" | "lora_unload" | "lora_list":
                return self._lora(op, args)
            case "start_profile" | "stop_profile":
                return self._profile(on=op == "start_profile")
            case "session_open" | "session_close":
                return self._session(op, str(args.get("session_id", "")))
            case "flush_cache":
                return self._flush(release=False)
            case "release_memory":
                return self._flush(release=True)
            case "resume_memory":
                with self._lock:
                    self._released = False
                return True, "KV cache memory resumed", {}
            case "slow":
                return self._set_slow(args.get("factor"))
            case "reset_sequence":
                return self._reset_sequence(args.get("dp_rank"))
            case _:
                return False, f"unknown op {op!r} for the sim backend", {}

    def _profile(self, on: bool) -> tuple[bool, str, dict[str, Any]]:
        if on == self._profiling:
            return False, f"the profiler is already {'running' if on else 'stopped'}", {}
        self._profiling = on
        return True, f"profiler {'started' if on else 'stopped'} (the sim records nothing)", {}

    def _session(self, op: str, session: str) -> tuple[bool, str, dict[str, Any]]:
        if op == "session_open":
            session = secrets.token_hex(8)
            self._sessions.add(session)
            return True, "session opened", {"session_id": session}
        if session not in self._sessions:
            return False, f"no open session {session!r}", {}
        self._sessions.discard(session)
        return True, "session closed", {}

    def _reset_sequence(self, rank: object) -> tuple[bool, str, dict[str, Any]]:
        if not isinstance(rank, int) or rank not in self._publishers:
            return False, f"reset_sequence: no DP rank {rank!r} on this node", {}
        self._publishers[rank].reset_sequence()
        self._by_rank[rank].republish()  # a restarted publisher announces its cache
        return True, f"KV event sequence of DP rank {rank} restarts at 0", {}

    def _lora(self, op: str, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        name = str(args.get("name", ""))
        if op == "lora_list":
            return True, "", {"adapters": sorted(self._adapters)}
        if not name:
            return False, f"{op}: give the adapter's name", {}
        if op == "lora_load":
            if name in self._adapters:
                return False, f"adapter {name!r} is already loaded", {}
            self._adapters[name] = str(args.get("path", ""))
            return (
                True,
                f"adapter {name!r} loaded (simulated)",
                {"adapters": sorted(self._adapters)},
            )
        if self._adapters.pop(name, None) is None:
            return False, f"adapter {name!r} is not loaded", {}
        return True, f"adapter {name!r} unloaded", {"adapters": sorted(self._adapters)}

    def _set_slow(self, factor: object) -> tuple[bool, str, dict[str, Any]]:
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            return False, f"slow: factor must be a number, got {factor!r}", {}
        if not math.isfinite(factor) or factor <= 0:
            return False, f"slow: factor must be finite and > 0, got {factor!r}", {}
        self._slow = float(factor)
        return True, f"timings multiplied by {self._slow}", {"factor": self._slow}

    def _stats(self) -> dict[str, Any]:
        return {
            "backend": "sim",
            "released": self._released,
            "slow_factor": self._slow,
            "ranks": [rank.stats() for rank in self._ranks],
        }

    def _flush(self, *, release: bool) -> tuple[bool, str, dict[str, Any]]:
        # Like SGLang: only when idle. Holding _lock keeps new requests out meanwhile.
        with self._lock:
            busy = sum(rank.load() for rank in self._ranks)
            if busy:
                return False, f"the engine is not idle ({busy} requests running or waiting)", {}
            for rank in self._ranks:
                rank.flush_cache()
            if release:
                self._released = True
                return True, "KV cache flushed and memory released", {}
            return True, "KV cache flushed", {}


def _guided_tokens(cmd: HostGenerate, prompt: list[int]) -> list[int] | None:
    """The tokens of the document a `json_schema` request gets (None: no schema), after
    those a continuation already has: the grammar advanced by the prefix (a prefix the
    schema's document does not start with is refused)."""
    schema = cmd.sampling.json_schema
    if schema is None:
        return None
    document = SimTokenizer.encode(guided_document(schema, prompt_offset(prompt)))
    had = cmd.continuation_ids
    if document[: len(had)] != had:
        why = "the continued tokens are not a prefix the json_schema allows"
        raise Refused("invalid_request", why, "sampling.json_schema")
    return document[len(had) :]
