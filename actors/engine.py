"""`EngineActor`: the node's side of the engine host channel.

It submits requests to the engine host process, routes each output chunk back to the
handler that asked, runs control operations, and watches the engine's health: a canary
when idle, and stall detection while busy. When it stops for any reason (the host died,
the engine is unhealthy, the node stops), every in-flight request ends at once with
`engine_restarting`, so no client waits for output that will never come.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from actors.engine_host import output_stream
from actors.engine_output import OutputReader
from actors.engine_state.admission import InflightTable
from actors.engine_state.health import (
    CanaryFailed,
    CanaryOk,
    Decision,
    Health,
    SendCanary,
    Unhealthy,
)
from actors.telemetry import node_metrics
from messages.chaos import ChaosFailProbes, ChaosFailRequests
from messages.codec import encode_msgpack
from messages.engine import (
    EngineInfo,
    HostAbort,
    HostChunk,
    HostControl,
    HostControlReply,
    HostEmbed,
    HostGenerate,
)
from messages.node import (
    AbortGenerate,
    EngineControl,
    EngineOutput,
    EngineOutputs,
    EngineStatus,
    GetEngineInfo,
    GetEngineStatus,
    GetLink,
    SubmitEmbed,
    SubmitGenerate,
)
from messages.request import BootstrapInfo, OutputOptions, SamplingOptions, StopConditions
from supervisor.core import (
    ChildContext,
    ExitReason,
    LoopThread,
    SupervisedActor,
    ask,
    whereis,
)
from supervisor.plan import EngineSettings

__all__ = ["INFO_TIMEOUT", "EngineActor", "EngineUnhealthyError"]

_CANARY_PREFIX = "canary-"
_WARMUP_PREFIX = "warmup-"
FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang's: a request that transfers no KV (warm-up, health)
# The host answers `info` at once; the margin is for a machine busy starting many
# processes. The engine_actor's start timeout (supervisor/tree.py) covers this plus the
# prefill warm-up.
INFO_TIMEOUT = 60.0


class EngineUnhealthyError(RuntimeError):
    """The engine failed its canaries or stopped making progress."""


@dataclass(frozen=True)
class _HealthTick:
    """Time for the periodic health check."""


class EngineActor(SupervisedActor):
    """Owns the channel to the engine host; see the module docstring."""

    def __init__(self, context: ChildContext, settings: EngineSettings) -> None:
        super().__init__(context)
        self.settings = settings
        self.mode = settings.mode
        self._warmup: tuple[threading.Event, list[HostChunk]] = (threading.Event(), [])
        self.info: EngineInfo | None = None
        self._zmq = zmq.Context()
        self._commands = self._zmq.socket(zmq.PUSH)
        self._outputs: socket.socket | None = None  # the host's output stream, once connected
        # The in-flight table is shared with the reader thread: touched under the lock.
        self._inflight = InflightTable(settings.max_inflight, settings.max_streams_per_client)
        self._lock = threading.Lock()
        self.health = Health(settings.health, context.clock.now())
        self._pending: dict[int, Future[HostControlReply]] = {}
        self._op_ids = itertools.count(1)
        self._reader: OutputReader | None = None
        self._private_loop: LoopThread | None = None
        self._canary_count = itertools.count(1)
        self._fail_next = 0  # chaos: requests still to be failed on purpose

    # --- start and stop ------------------------------------------------------------------

    def on_start_up(self) -> None:
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.connect(self.settings.command_endpoint)
        self._outputs = output_stream.connect(self.settings.output_socket)
        # The host's output is read on the NATS link's loop, where the handlers it goes
        # to run (see actors.engine_output); alone, on a loop of its own.
        if self.settings.fabric:
            loop = ask(self.settings.fabric, GetLink(), timeout=10).loop
        else:
            self._private_loop = LoopThread("engine-output")
            loop = self._private_loop.loop
        self._reader = OutputReader(self._outputs, loop, self._on_reply, self._route)
        self._reader.start()
        reply = self._handshake()
        if not reply.ok:
            msg = f"engine host refused info: {reply.message}"
            raise RuntimeError(msg)
        self.info = EngineInfo(**reply.data)
        if self.mode == "prefill":
            self._warm_up()
        self.send_every(1.0, _HealthTick())
        self.log.info(
            "engine connected",
            backend=self.info.backend,
            model=self.info.model_name,
            dp_size=self.info.dp_size,
            kv_blocks=self.info.total_kv_blocks,
        )

    def _handshake(self) -> HostControlReply:
        """Ask the host for its info, again every second until it answers (an answer the
        host sent with no reader connected, the one of a previous incarnation say, was
        dropped: the host never blocks on a missing reader)."""
        clock = self.context.clock
        deadline = clock.now() + INFO_TIMEOUT
        while True:
            op_id = next(self._op_ids)
            future: Future[HostControlReply] = Future()
            self._pending[op_id] = future
            self._send(HostControl(op_id=op_id, op="info", args={}))
            try:
                return future.result(timeout=max(0.0, min(1.0, deadline - clock.now())))
            except TimeoutError:
                self._pending.pop(op_id, None)
            if clock.now() >= deadline:
                msg = (
                    f"the engine host at {self.settings.command_endpoint} did not answer "
                    f"'info' within {INFO_TIMEOUT:g}s although it printed ready"
                )
                raise TimeoutError(msg)

    def on_undelivered(self, message: Any) -> None:
        # A request told to this actor just as it stopped: answer it, never leave it silent.
        if isinstance(message, SubmitGenerate | SubmitEmbed):
            engine_id = message.engine_id if isinstance(message, SubmitGenerate) else ""
            chunk = HostChunk(
                engine_id or message.request.request_id,
                finish_reason="error",
                error_code="engine_restarting",
                error_message="the engine stopped before taking the request; retry shortly",
            )
            self._deliver(message.reply_path, chunk)

    def _warm_up(self) -> None:
        """Prefill nodes serve only after a short request through a fake bootstrap."""
        done, chunks = self._warmup
        started = self.context.clock.now()
        timeout = self.settings.warmup_timeout
        self._send(self._probe(f"{_WARMUP_PREFIX}{time.time_ns()}"))
        if not done.wait(timeout):
            msg = f"the prefill warm-up did not finish within {timeout:g}s"
            raise TimeoutError(msg)
        last = chunks[-1]
        if last.finish_reason not in ("stop", "length"):
            msg = f"the prefill warm-up failed: {last.error_code} {last.error_message}"
            raise RuntimeError(msg)
        seconds = round(self.context.clock.now() - started, 3)
        self.log.info("prefill warm-up done", seconds=seconds)

    def _probe(self, request_id: str) -> HostGenerate | HostEmbed:
        """A one-token request in this mode's shape (canaries and the warm-up)."""
        if self.mode == "embedding":
            return HostEmbed(request_id=request_id, token_ids=[[1, 2, 3]])
        fake = None
        if self.mode in ("prefill", "decode"):
            fake = BootstrapInfo(host=FAKE_BOOTSTRAP_HOST, port=8998, room=0)
        return HostGenerate(
            request_id=request_id,
            token_ids=[1, 2, 3],
            sampling=SamplingOptions(temperature=0.0),
            stop=StopConditions(max_tokens=1, ignore_eos=True),
            output=OutputOptions(text=False),
            canary=True,
            bootstrap=fake,
        )

    def on_exit(self, reason: ExitReason) -> None:
        if self._reader is not None:
            self._reader.stop()
        with self._lock:
            inflight = self._inflight.take_all()
        why = f"the engine stopped ({reason.describe()}); it restarts by policy, retry"
        for request_id, entry in inflight.items():
            self._deliver(
                entry.reply_path,
                HostChunk(
                    request_id=request_id,
                    finish_reason="error",
                    error_code="engine_restarting",
                    error_message=why,
                ),
            )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(why))
        if self._private_loop is not None:
            self._private_loop.stop()
        self._commands.close(linger=0)
        if self._outputs is not None:
            self._outputs.close()
        self._zmq.term()
        node_metrics.INFLIGHT.set(0)

    # --- messages -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case SubmitGenerate():
                self._submit(message)
            case SubmitEmbed():
                self._submit_embed(message)
            case AbortGenerate(request_id=request_id):
                with self._lock:
                    known = request_id in self._inflight
                if known:
                    self._send(HostAbort(request_id))
            case GetEngineInfo():
                return self.info
            case GetEngineStatus():
                with self._lock:
                    inflight = len(self._inflight)
                return EngineStatus(
                    healthy=self.health.healthy,
                    inflight=inflight,
                    consecutive_probe_failures=self.health.failures,
                    detail=self.health.detail,
                )
            case EngineControl(op=op, args=args):
                return self._control(op, args)  # a Future: the caller waits, not this actor
            case _HealthTick():
                self._check_health()
            case EngineOutput(chunk=chunk):
                self._canary_done(chunk)
            case ChaosFailProbes(count=count):
                self.health.inject_failures(count)
                if self.health.canary is None:
                    self._send_canary()
                return True, f"the next {count} canaries fail"
            case ChaosFailRequests(count=count):
                self._fail_next = count
                return True, f"the next {count} requests end with engine_error"
            case _:
                return super().handle(message)
        return None

    def _submit(self, message: SubmitGenerate) -> None:
        request = message.request
        engine_id = message.engine_id or request.request_id
        if not self._admit(engine_id, request.client_id, message.reply_path):
            return
        self._send(
            HostGenerate(
                request_id=engine_id,
                token_ids=request.token_ids,
                prompt=request.prompt,
                messages=request.messages,
                sampling=request.sampling,
                stop=request.stop,
                output=request.output,
                dp_rank=request.dp_rank,
                priority=request.priority,
                max_prompt_tokens=message.max_prompt_tokens,
                bootstrap=request.bootstrap_info,
                lora=request.lora,
                continuation_ids=message.continuation_ids,
            )
        )

    def _admit(self, request_id: str, client: str, reply_path: str) -> bool:
        """Enter a request in the table, or answer its refusal at once."""
        if self._fail_next > 0:
            self._fail_next -= 1
            failed = HostChunk(
                request_id,
                finish_reason="error",
                error_code="engine_error",
                error_message="the engine failed this request (injected fault: fail_requests)",
            )
            self._deliver(reply_path, failed)
            return False
        now = self.context.clock.now()
        with self._lock:
            refusal = self._inflight.admit(request_id, client, reply_path, now)
            node_metrics.INFLIGHT.set(len(self._inflight))
        if refusal is not None:
            chunk = HostChunk(
                request_id,
                finish_reason="error",
                error_code=refusal.code,
                error_message=refusal.message,
            )
            self._deliver(reply_path, chunk)
            return False
        self.health.active(now)
        return True

    def _submit_embed(self, message: SubmitEmbed) -> None:
        request = message.request
        if self._admit(request.request_id, request.client_id, message.reply_path):
            self._send(
                HostEmbed(
                    request_id=request.request_id,
                    texts=message.texts,
                    token_ids=message.token_ids,
                    max_prompt_tokens=message.max_prompt_tokens,
                )
            )

    # --- the channel ----------------------------------------------------------------------

    def _send(self, command: Any) -> None:
        self._commands.send(encode_msgpack(command), copy=False)

    def _control(self, op: str, args: dict[str, Any]) -> Future[HostControlReply]:
        op_id = next(self._op_ids)
        future: Future[HostControlReply] = Future()
        self._pending[op_id] = future
        self._send(HostControl(op_id=op_id, op=op, args=args))  # type: ignore[arg-type]
        return future

    def _on_reply(self, reply: HostControlReply) -> None:
        future = self._pending.pop(reply.op_id, None)
        if future is not None and not future.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # raced a cancel
                future.set_result(reply)

    def _route(self, chunks: list[HostChunk]) -> None:
        """Hand chunks to the handlers that asked for them: one message per handler (on
        the reader's loop, with the handlers)."""
        now = self.context.clock.now()
        self.health.active(now)
        by_handler: dict[str, list[HostChunk]] = {}
        with self._lock:
            for chunk in chunks:
                # Requests first: a client's id may well begin like a canary's.
                finished = chunk.finish_reason is not None
                entry = self._inflight.progress(chunk.request_id, now, finished)
                if entry is not None:
                    by_handler.setdefault(entry.reply_path, []).append(chunk)
                elif chunk.request_id.startswith(_WARMUP_PREFIX):
                    self._warmup[1].append(chunk)
                    if chunk.finish_reason is not None:
                        self._warmup[0].set()
                elif chunk.request_id.startswith(_CANARY_PREFIX):
                    self.actor_ref.tell(EngineOutput(chunk))  # canary bookkeeping is the actor's
                # else: already failed (engine restart) or unknown
            node_metrics.INFLIGHT.set(len(self._inflight))
        for reply_path, batch in by_handler.items():
            handler = whereis(reply_path)
            if handler is not None:
                handler.tell(EngineOutputs(batch))

    def _deliver(self, reply_path: str, chunk: HostChunk) -> None:
        handler = whereis(reply_path)
        if handler is not None:
            handler.tell(EngineOutputs([chunk]))

    # --- health ---------------------------------------------------------------------------

    def _check_health(self) -> None:
        now = self.context.clock.now()
        with self._lock:
            stalled = len(self._inflight.stalled(now, self.settings.health.stall_timeout))
            busy = bool(self._inflight)
        wanted = self.info is None or self.info.accepts_requests
        self._carry_out(self.health.tick(now, stalled, busy, canaries_wanted=wanted))

    def _send_canary(self) -> None:
        request_id = f"{_CANARY_PREFIX}{next(self._canary_count)}-{time.time_ns()}"
        self.health.canary_sent(request_id, self.context.clock.now())
        self._send(self._probe(request_id))

    def _canary_done(self, chunk: HostChunk) -> None:
        if chunk.finish_reason is not None:
            self._carry_out(self.health.canary_ended(chunk.finish_reason, chunk.error_message))

    def _carry_out(self, decision: Decision) -> None:
        """Do what the health core decided."""
        match decision:
            case SendCanary():
                self._send_canary()
            case CanaryOk(after_failures=after):
                node_metrics.CANARIES.labels("ok").inc()
                if after:
                    self.log.info("engine healthy again", after_failures=after)
            case CanaryFailed():
                node_metrics.CANARIES.labels("failed").inc()
                self.log.warning(
                    "engine canary failed", failures=decision.failures, why=decision.why
                )
                if decision.abort:
                    self._send(HostAbort(decision.abort))
                if decision.fatal:
                    msg = f"engine unhealthy after {decision.failures} failed canaries: "
                    raise EngineUnhealthyError(msg + decision.why)
                if decision.again:
                    self._send_canary()
            case Unhealthy(why=why):
                raise EngineUnhealthyError(why)
            case None:
                pass
