"""The sglang backend: a real SGLang engine on the CPU, in a real engine host process.

One host with the built-in SmolLM2 model serves the whole module (one engine start,
about 25 s), driven through the real channel (msgpack over ZMQ), with the node's side of
every socket played by the test: a PULL bound at the metrics endpoint, a SUB on the KV
event port, the Prometheus directory. The host is stopped with SIGTERM by the
module's last test using it; a second host is SIGKILLed while its engine starts, to show
SGLang's children die with it.

"""

from __future__ import annotations

import itertools
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from actors.engine_host import output_stream
from actors.engine_host.__main__ import READY_LINE
from actors.engine_host.output_stream import FrameReader
from actors.engine_host.spec import HostSpec
from messages.codec import decode_msgpack, encode_msgpack
from messages.engine import (
    EngineInfo,
    HostAbort,
    HostChunk,
    HostControl,
    HostControlReply,
    HostGenerate,
    HostOutput,
)
from messages.kv import AllBlocksCleared, BlockStored, block_hashes, decode_sglang_batch
from messages.metrics import decode_scheduler_metrics
from messages.request import ChatMessage, OutputOptions, SamplingOptions, StopConditions
from supervisor.chaos import free_ports

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 240.0
GREEDY = SamplingOptions(temperature=0.0)
FRANCE = [ChatMessage(role="user", content="What is the capital of France?")]
FIGURES: dict[str, float] = {}


# --- the node's side of the host's sockets ---------------------------------------------------


def free_port(span: int = 1) -> int:
    """A TCP port p with p .. p+span-1 free (the KV publisher binds port + rank), below
    the ephemeral range (see supervisor.chaos.free_ports)."""
    return free_ports(span)


class Collector:
    """A background reader of one ZMQ socket, keeping every message with its arrival time."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.messages: list[tuple[float, list[bytes]]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            if self.sock.poll(50):
                self.messages.append((time.monotonic(), self.sock.recv_multipart()))

    def wait_for(self, predicate: Any, timeout: float) -> list[tuple[float, list[bytes]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.messages):
                return self.messages
            time.sleep(0.05)
        raise AssertionError(f"condition not met in {timeout} s; got {len(self.messages)}")

    def close(self) -> None:
        self._halt.set()
        self._thread.join(2)
        self.sock.close(linger=0)


@dataclass
class Host:
    """A running engine host and the test's ends of its sockets."""

    process: subprocess.Popen[str]
    spec: HostSpec
    stderr_path: Path
    start_seconds: float
    context: zmq.Context[Any]
    commands: zmq.Socket[bytes]
    kv_events: Collector
    metrics: list[Collector]  # one PULL per DP rank's endpoint
    outputs: dict[str, queue.Queue[tuple[float, HostChunk]]] = field(default_factory=dict)
    replies: dict[int, queue.Queue[HostControlReply]] = field(default_factory=dict)
    op_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, command: Any) -> None:
        self.commands.send(encode_msgpack(command))

    def submit(self, request_id: str, **fields: Any) -> queue.Queue[tuple[float, HostChunk]]:
        with self.lock:
            q = self.outputs.setdefault(request_id, queue.Queue())
        self.send(HostGenerate(request_id=request_id, **fields))
        return q

    def stream(self, request_id: str, timeout: float = 60.0) -> list[tuple[float, HostChunk]]:
        """Every (arrival time, chunk) of a request, up to its finish."""
        q = self.outputs[request_id]
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            arrived, chunk = q.get(timeout=max(0.01, deadline - time.monotonic()))
            chunks.append((arrived, chunk))
            if chunk.finish_reason is not None:
                return chunks

    def generate(self, request_id: str, **fields: Any) -> list[HostChunk]:
        self.submit(request_id, **fields)
        return [chunk for _, chunk in self.stream(request_id)]

    def control(self, op: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        op_id = next(self.op_ids)
        with self.lock:
            q = self.replies[op_id] = queue.Queue()
        self.send(HostControl(op_id=op_id, op=op, args=args or {}))  # type: ignore[arg-type]
        return q.get(timeout=timeout)

    def read_outputs(self, sock: socket.socket, halt: threading.Event) -> None:
        frames = FrameReader()
        sock.settimeout(0.05)
        with sock:
            while not halt.is_set():
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return  # the host is gone
                self._take(frames.feed(data))

    def _take(self, frames: list[bytes]) -> None:
        for frame in frames:
            output = decode_msgpack(frame, HostOutput)
            with self.lock:
                if isinstance(output, HostControlReply):
                    self.replies.setdefault(output.op_id, queue.Queue()).put(output)
                else:
                    q = self.outputs.setdefault(output.request_id, queue.Queue())
                    q.put((time.monotonic(), output))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def host_spec(tmp: Path, dp_size: int = 1, **overrides: Any) -> HostSpec:
    port = free_port(span=2 * dp_size)
    return HostSpec(
        backend="sglang",
        command_endpoint=f"ipc://{tmp}/commands.ipc",
        output_socket=f"{tmp}/outputs.sock",
        dp_size=dp_size,
        page_size=16,
        kv_events_port=port,
        kv_topic="kv-test",
        replay_port=port + dp_size,  # clear of the DP ranks' PUB ports
        metrics_endpoints=[f"ipc://{tmp}/metrics{r}.ipc" for r in range(dp_size)],
        model_path="builtin:smollm2-135m-instruct",
        prometheus_dir=str(tmp / "prometheus"),
        **overrides,
    )


def host_env(spec: HostSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        PYTHONPATH=str(REPO),
        SGLNODE_SGLANG_CPU="1",
        PROMETHEUS_MULTIPROC_DIR=spec.prometheus_dir,
        SGL_NODE_LOG_LEVEL="info",
    )
    return env


def launch(spec: HostSpec, tmp: Path) -> subprocess.Popen[str]:
    Path(spec.prometheus_dir).mkdir(parents=True, exist_ok=True)
    with (tmp / "host.stderr").open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-u", "-m", "actors.engine_host", msgspec.json.encode(spec).decode()],
            cwd=REPO,
            env=host_env(spec),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def wait_ready(process: subprocess.Popen[str], stderr: Path, timeout: float) -> None:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if READY_LINE in lines.get(timeout=0.5):
                return
        except queue.Empty:
            if process.poll() is not None:
                break
    raise AssertionError(f"host not ready (exit {process.poll()}):\n{stderr.read_text()[-5000:]}")


@dataclass
class Started:
    host: Host
    halt: threading.Event
    reader: threading.Thread


def start_host(tmp: Path, dp_size: int = 1) -> Started:
    spec = host_spec(tmp, dp_size)
    context: zmq.Context[Any] = zmq.Context()
    metrics = []
    for endpoint in spec.metrics_endpoints:  # the MetricsActor's end: bound before the engine
        pull = context.socket(zmq.PULL)
        pull.bind(endpoint)
        metrics.append(Collector(pull))
    kv = context.socket(zmq.SUB)
    kv.setsockopt(zmq.SUBSCRIBE, spec.kv_topic.encode())
    for rank in range(dp_size):
        kv.connect(f"tcp://127.0.0.1:{spec.kv_events_port + rank}")
    started = time.monotonic()
    process = launch(spec, tmp)
    wait_ready(process, tmp / "host.stderr", START_TIMEOUT)
    commands = context.socket(zmq.PUSH)
    commands.connect(spec.command_endpoint)
    outputs = output_stream.connect(spec.output_socket)
    host = Host(
        process=process,
        spec=spec,
        stderr_path=tmp / "host.stderr",
        start_seconds=time.monotonic() - started,
        context=context,
        commands=commands,
        kv_events=Collector(kv),
        metrics=metrics,
    )
    halt = threading.Event()
    reader = threading.Thread(target=host.read_outputs, args=(outputs, halt), daemon=True)
    reader.start()
    return Started(host, halt, reader)


def stop_host(started: Started) -> None:
    host = started.host
    if host.process.poll() is None:
        host.process.send_signal(signal.SIGTERM)
        try:
            host.process.wait(60)
        except subprocess.TimeoutExpired:
            host.process.kill()
    started.halt.set()
    started.reader.join(2)
    host.kv_events.close()
    for collector in host.metrics:
        collector.close()
    host.commands.close(linger=0)
    host.context.term()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return {p for p in found if alive(p)}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.fixture(scope="module")
def shared_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Started]]:
    """The module's one engine host (a list so that `host` can replace a stopped one)."""
    started = [start_host(tmp_path_factory.mktemp("host"))]
    FIGURES["host start (s)"] = started[0].host.start_seconds
    yield started
    stop_host(started[0])
    if FIGURES:
        print("\nsglang backend figures: " + ", ".join(f"{k} {v:.2f}" for k, v in FIGURES.items()))


@pytest.fixture
def host(shared_host: list[Started], tmp_path_factory: pytest.TempPathFactory) -> Host:
    """The shared host, started again if a test stopped it (the SIGTERM test does: in
    random order, the tests after it get a fresh one)."""
    if shared_host[0].host.process.poll() is not None:
        stop_host(shared_host[0])
        shared_host[0] = start_host(tmp_path_factory.mktemp("host"))
    return shared_host[0].host


def unique_ids(n: int, seed: int) -> list[int]:
    """Token ids no other test sends (so no prefix cache hit from elsewhere)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def text_of(chunks: list[HostChunk]) -> str:
    return "".join(c.text for c in chunks)


# --- the engine's facts ------------------------------------------------------------------------


def test_info_reports_the_real_engine(host: Host) -> None:
    reply = host.control("info")
    assert reply.ok, reply.message
    info = EngineInfo(**reply.data)
    spec = host.spec
    assert info.backend == "sglang"
    assert info.model_name == "smollm2-135m-instruct"
    assert info.context_length == 8192
    assert info.page_size == 16
    assert info.total_kv_blocks == 8192 // 16  # max_total_tokens 8192, in pages
    assert info.max_batch_size > 0
    assert info.dp_size == 1
    assert info.kv_event_endpoints == [f"tcp://127.0.0.1:{spec.kv_events_port}"]
    assert info.kv_event_topic == "kv-test"
    assert info.metrics_endpoints == spec.metrics_endpoints
    assert info.eos_token_ids == [2]
    assert info.version == "0.5.23"
    assert info.prometheus_dir == spec.prometheus_dir


# --- streaming -----------------------------------------------------------------------------------


def test_chat_messages_stream_incrementally_and_answer_paris(host: Host) -> None:
    sent = time.monotonic()
    host.submit("france", messages=FRANCE, sampling=GREEDY, stop=StopConditions(max_tokens=32))
    timed = host.stream("france")
    chunks = [c for _, c in timed]
    assert "Paris" in text_of(chunks)
    assert len(chunks) > 3  # one per token, not one at the end
    # One token per chunk, as SGLang steps; a step or two may share a chunk when the
    # host's loop was late (another test's load on the same two cores), never many.
    sizes = [len(c.token_ids) for c in chunks]
    assert sum(n == 1 for n in sizes) >= len(sizes) // 2, sizes
    assert max(sizes) <= max(2, sum(sizes) // 4), sizes
    assert timed[-1][0] - timed[0][0] > 0.05  # spread over time
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert last.usage.prompt_tokens > 20  # the chat template wrapped the question
    FIGURES["chat TTFT (s)"] = timed[0][0] - sent


def test_token_id_input_streams_token_ids_and_text(host: Host) -> None:
    chunks = host.generate(
        "ids",
        token_ids=unique_ids(24, seed=1),
        sampling=GREEDY,
        stop=StopConditions(max_tokens=8, ignore_eos=True),
    )
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert text_of(chunks)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 24


def test_text_is_left_out_when_not_asked_for(host: Host) -> None:
    chunks = host.generate(
        "no-text",
        prompt="Once upon a time",
        stop=StopConditions(max_tokens=4, ignore_eos=True),
        output=OutputOptions(text=False),
    )
    assert text_of(chunks) == ""
    assert sum(len(c.token_ids) for c in chunks) == 4


def test_logprobs_come_with_each_token(host: Host) -> None:
    chunks = host.generate(
        "logprobs",
        messages=FRANCE,
        sampling=GREEDY,
        stop=StopConditions(max_tokens=5, ignore_eos=True),
        output=OutputOptions(logprobs=2),
    )
    logprobs = [lp for c in chunks for lp in c.logprobs or []]
    assert [lp.token_id for lp in logprobs] == [t for c in chunks for t in c.token_ids]
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in logprobs)
    assert all(lp.top[0][0] == lp.token_id for lp in logprobs)  # greedy: the best one


def test_a_repeated_prompt_hits_the_prefix_cache(host: Host) -> None:
    prompt = unique_ids(40, seed=2)
    stop = StopConditions(max_tokens=2, ignore_eos=True)
    first = host.generate("cache-1", token_ids=prompt, sampling=GREEDY, stop=stop)[-1]
    second = host.generate("cache-2", token_ids=prompt, sampling=GREEDY, stop=stop)[-1]
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= 32  # two full pages of the 40-token prompt


def test_a_canary_is_served_like_any_request(host: Host) -> None:
    chunks = host.generate(
        "canary-1",
        token_ids=[1, 2, 3],
        sampling=GREEDY,
        stop=StopConditions(max_tokens=1, ignore_eos=True),
        output=OutputOptions(text=False),
        canary=True,
    )
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 1


def test_sixty_four_tokens_stream_in_many_chunks_and_their_timing_is_recorded(host: Host) -> None:
    # No rate is asserted (speed belongs to tests/benchmarks); the figures are printed.
    sent = time.monotonic()
    host.submit(
        "rate",
        prompt="Write a long story about a dragon.",
        sampling=GREEDY,
        stop=StopConditions(max_tokens=64, ignore_eos=True),
    )
    timed = host.stream("rate")
    tokens = sum(len(c.token_ids) for _, c in timed)
    assert tokens == 64
    assert len(timed) >= 16  # streamed as generated, not handed over whole
    FIGURES["64-token TTFT (s)"] = timed[0][0] - sent
    FIGURES["decode tokens/s"] = (tokens - 1) / (timed[-1][0] - timed[0][0])
    FIGURES["64-token total (s)"] = timed[-1][0] - sent


# --- abort ---------------------------------------------------------------------------------------


def test_abort_mid_stream_ends_cancelled(host: Host) -> None:
    q = host.submit(
        "abort-me",
        prompt="Count from one to a thousand.",
        stop=StopConditions(max_tokens=500, ignore_eos=True),
    )
    seen = [q.get(timeout=30)[1] for _ in range(3)]
    assert all(c.finish_reason is None for c in seen)
    host.send(HostAbort("abort-me"))
    rest = [c for _, c in host.stream("abort-me")]
    last = rest[-1]
    assert last.finish_reason == "cancelled"
    assert last.usage is not None
    assert 3 <= last.usage.completion_tokens < 500
    # the engine is free again: the next request is served at once
    after = host.generate("after-abort", token_ids=[1, 2, 3], stop=StopConditions(max_tokens=1))
    assert after[-1].finish_reason in ("stop", "length")


def test_abort_right_after_submit_ends_cancelled(host: Host) -> None:
    host.submit("abort-early", prompt="Hello", stop=StopConditions(max_tokens=300, ignore_eos=True))
    host.send(HostAbort("abort-early"))
    assert host.stream("abort-early")[-1][1].finish_reason == "cancelled"


def test_abort_of_an_unknown_request_is_ignored(host: Host) -> None:
    host.send(HostAbort("never-sent"))
    assert host.control("probe").ok


# --- refusals ------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_an_invalid_request(host: Host) -> None:
    chunks = host.generate("too-long", token_ids=[100] * 9000)
    assert len(chunks) == 1
    assert chunks[0].finish_reason == "error"
    assert chunks[0].error_code == "invalid_request"
    assert "9000 tokens" in chunks[0].error_message
    assert "context length 8192" in chunks[0].error_message


def test_a_prompt_over_the_nodes_limit_is_an_invalid_request(host: Host) -> None:
    chunks = host.generate("over-limit", messages=FRANCE, max_prompt_tokens=10)
    assert [(c.finish_reason, c.error_code) for c in chunks] == [("error", "invalid_request")]
    assert "node's limit of 10" in chunks[0].error_message


def test_a_request_sglang_refuses_is_an_invalid_request(host: Host) -> None:
    # 8000 prompt tokens + 500 new ones exceed the context: SGLang's own check refuses it
    chunks = host.generate("too-much", token_ids=[100] * 8000, stop=StopConditions(max_tokens=500))
    assert [(c.finish_reason, c.error_code) for c in chunks] == [("error", "invalid_request")]
    assert "context length" in chunks[0].error_message


def test_a_dp_rank_the_engine_does_not_have_is_an_invalid_request(host: Host) -> None:
    chunks = host.generate("bad-rank", token_ids=[1, 2, 3], dp_rank=3)
    assert [(c.finish_reason, c.error_code) for c in chunks] == [("error", "invalid_request")]


# --- what the node's relays and metrics actor receive -----------------------------------------


def test_kv_events_carry_the_prompts_page_hashes(host: Host) -> None:
    prompt = unique_ids(48, seed=3)  # three full pages
    expected = [h for h, _ in block_hashes(prompt, 16)]
    host.generate("kv", token_ids=prompt, sampling=GREEDY, stop=StopConditions(max_tokens=1))

    def stored(messages: list[tuple[float, list[bytes]]]) -> list[int]:
        hashes = []
        for _, (topic, _seq, payload) in messages:
            assert topic == b"kv-test"
            for event in decode_sglang_batch(payload).events:
                if isinstance(event, BlockStored):
                    hashes.extend(event.block_hashes)
        return hashes

    host.kv_events.wait_for(lambda m: set(expected) <= set(stored(m)), timeout=10)
    batches = [decode_sglang_batch(p) for _, (_t, _s, p) in host.kv_events.messages]
    assert all(b.dp_rank == 0 for b in batches)
    seqs = [int.from_bytes(s, "big") for _, (_t, s, _p) in host.kv_events.messages]
    assert seqs == sorted(seqs)


def test_kv_event_replay_serves_the_buffered_batches(host: Host) -> None:
    assert host.spec.replay_port is not None
    dealer = host.context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{host.spec.replay_port}")
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(5000), "no replay answer"
            _empty, _topic, seq, payload = dealer.recv_multipart()
            if seq == b"\xff" * 8:
                break
            replayed.append(decode_sglang_batch(payload))
    finally:
        dealer.close(linger=0)
    assert isinstance(replayed[0].events[0], AllBlocksCleared)  # the cache's start, seq 0
    assert any(isinstance(e, BlockStored) for b in replayed for e in b.events)


def test_scheduler_metrics_arrive_at_the_nodes_endpoint(host: Host) -> None:
    host.generate("metrics", token_ids=unique_ids(20, seed=4), stop=StopConditions(max_tokens=2))
    messages = host.metrics[0].wait_for(lambda m: len(m) > 0, timeout=10)
    samples = [decode_scheduler_metrics(frames[0]) for _, frames in messages]
    last = samples[-1]
    assert last.kv_total_blocks == 8192  # tokens, as SGLang reports them
    assert last.request_total_slots > 0
    assert last.data_parallel_rank == 0


def test_the_prometheus_dir_gets_sglangs_metrics(host: Host) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=host.spec.prometheus_dir)  # type: ignore[no-untyped-call]
    names = {metric.name for metric in registry.collect()}
    assert "sglang:num_requests" in names or "sglang:prompt_tokens" in names, sorted(names)[:20]
    assert any(name.startswith("sglang:") for name in names)
    assert "sglang:token_usage" in names  # a scheduler gauge (the scheduler process's file)


# --- control operations --------------------------------------------------------------------------


def test_probe_and_stats_answer(host: Host) -> None:
    probe = host.control("probe")
    assert (probe.ok, probe.data) == (True, {"inflight": 0})
    stats = host.control("stats")
    assert stats.ok, stats.message
    assert len(stats.data["ranks"]) == 1
    rank = stats.data["ranks"][0]
    assert rank["effective_max_running_requests_per_dp"] > 0
    assert rank["memory_usage"]["token_capacity"] == 8192


def test_flush_cache_clears_the_prefix_cache(host: Host) -> None:
    before = len(host.kv_events.messages)
    reply = host.control("flush_cache")
    assert reply.ok, reply.message

    def cleared(messages: list[tuple[float, list[bytes]]]) -> bool:
        return any(
            isinstance(e, AllBlocksCleared)
            for _, (_t, _s, p) in messages[before:]
            for e in decode_sglang_batch(p).events
        )

    host.kv_events.wait_for(cleared, timeout=10)


def test_memory_release_is_refused_on_the_cpu(host: Host) -> None:
    for op in ("release_memory", "resume_memory"):
        reply = host.control(op)
        assert not reply.ok
        assert "not supported on the CPU" in reply.message
    assert host.control("probe").ok  # the scheduler is unharmed


def test_update_weights_reloads_the_model(host: Host) -> None:
    reply = host.control("update_weights", {"model_path": host.spec.model_path})
    assert reply.ok, reply.message
    chunks = host.generate("after-update", messages=FRANCE, sampling=GREEDY)
    assert "Paris" in text_of(chunks)
    bad = host.control("update_weights", {"model_path": "/nonexistent"})
    assert not bad.ok
    assert "not a local directory" in bad.message


def test_profile_runs_on_the_cpu(host: Host, tmp_path: Path) -> None:
    start = host.control("start_profile", {"output_dir": str(tmp_path)})
    assert start.ok, start.message
    host.generate("profiled", token_ids=[1, 2, 3], stop=StopConditions(max_tokens=2))
    stop = host.control("stop_profile", timeout=300)
    assert stop.ok, stop.message
    assert any(tmp_path.iterdir())
    refused = host.control("start_profile", {"activities": ["GPU"]})
    assert not refused.ok


def test_unknown_control_ops_are_refused(host: Host) -> None:
    reply = host.control("chaos")
    assert not reply.ok
    assert "not supported by the sglang backend" in reply.message


# --- configuration errors -----------------------------------------------------------------------


def test_an_unknown_sglang_arg_stops_the_host_with_a_clear_error(tmp_path: Path) -> None:
    spec = host_spec(tmp_path)
    spec = msgspec.structs.replace(spec, sglang={"attention_backnd": "torch_native"})
    process = launch(spec, tmp_path)
    assert process.wait(120) != 0
    stderr = (tmp_path / "host.stderr").read_text()
    assert (
        "engine.sglang.attention_backnd: not a field of SGLang's ServerArgs "
        "(did you mean 'attention_backend'?)"
    ) in stderr


# --- stopping ------------------------------------------------------------------------------------


def test_sigterm_stops_the_host_with_exit_0_and_no_child_left(host: Host) -> None:
    children = descendants(host.process.pid)
    assert len(children) >= 2  # scheduler + detokenizer (and multiprocessing's helpers)
    q = host.submit(
        "in-flight",
        prompt="Tell me a story.",
        stop=StopConditions(max_tokens=500, ignore_eos=True),
    )
    assert q.get(timeout=30)[1].finish_reason is None
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(60) == 0
    assert wait_gone(children, 10) == set()
    last = host.stream("in-flight", timeout=15)[-1][1]
    assert (last.finish_reason, last.error_code) == ("error", "engine_restarting")
    assert "Traceback" not in host.stderr()
