"""The engine host process: `python -m actors.engine_host SPEC_JSON`.

Runs one engine backend (sim or sglang) in its own process, so the engine's crashes,
signal handlers and child processes never touch the supervisor. The main thread owns
the engine (SGLang installs signal handlers only there); a command thread reads the
channel. Prints `engine host ready` once the engine is up (the readiness probe).
SIGTERM stops the engine and exits 0.

`SGLNODE_SGLANG_CPU=1` in the environment (the node sets it for backend = sglang on the
CPU) prepares SGLang's CPU path at import, before anything can import SGLang: see
`prepare_cpu_process`. SGLang's spawned children do not re-run this module (multiprocessing
skips a package's `__main__`); they are prepared by `sglang_children`, their targets' module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import msgspec
import structlog
import zmq

from actors.engine_host.backend import Backend
from actors.engine_host.channel import HostChannel
from actors.engine_host.sglang_children import prepare_cpu_process
from actors.engine_host.spec import HostSpec
from messages.engine import (
    HostAbort,
    HostChunk,
    HostControl,
    HostControlReply,
    HostEmbed,
    HostGenerate,
    HostShutdown,
)
from supervisor.logs import configure_logging

# SGLang's CPU path and the sgl_kernel stand-in, when SGLNODE_SGLANG_CPU=1 (else a no-op).
prepare_cpu_process()

READY_LINE = "engine host ready"


def build_backend(spec: HostSpec, channel: HostChannel) -> Backend:
    """The backend the spec asks for."""
    if spec.backend == "sim":
        from actors.engine_host.sim import MultiNode, SimEngine

        multinode = None
        if spec.nnodes > 1:
            multinode = MultiNode(
                spec.nnodes,
                spec.node_rank,
                spec.dist_init_addr,
                spec.instance_id,
                spec.join_timeout,
            )
        return SimEngine(
            spec.sim,
            dp_size=spec.dp_size,
            page_size=spec.page_size,
            kv_events_port=spec.kv_events_port,
            kv_topic=spec.kv_topic,
            metrics_endpoints=spec.metrics_endpoints,
            emit=channel.send,
            model_name=spec.served_model_name or "sim",
            replay_port=spec.replay_port,
            mode=spec.mode,
            transfer_seconds_per_token=spec.transfer_seconds_per_token,
            multinode=multinode,
            bootstrap=(spec.bootstrap_host, spec.bootstrap_port),
        )
    if spec.backend == "sglang":
        from actors.engine_host.sglang_backend import SglangBackend

        return SglangBackend(spec, emit=channel.send)
    msg = f"unknown engine backend {spec.backend!r}"
    raise ValueError(msg)


class CommandLoop:
    """Reads commands and hands them to the backend (on its own thread)."""

    def __init__(self, backend: Backend, channel: HostChannel, stop: threading.Event) -> None:
        self.backend = backend
        self.channel = channel
        self.stop = stop
        self.log = structlog.get_logger().bind(path="engine_host")

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                command = self.channel.recv()  # until a command, or a stop wakes it
            except zmq.ZMQError:
                if self.stop.is_set():
                    return  # the channel closed under a stop
                raise
            if command is None:
                continue
            try:
                self.dispatch(command)
            except Exception as exc:
                self.log.exception("command failed", command=type(command).__name__)
                if isinstance(command, HostGenerate):
                    self.channel.send(
                        HostChunk(
                            request_id=command.request_id,
                            finish_reason="error",
                            error_code="engine_error",
                            error_message=f"{type(exc).__name__}: {exc}",
                        )
                    )

    def dispatch(self, command: Any) -> None:
        match command:
            case HostGenerate():
                self.backend.submit(command)
            case HostEmbed():
                self.backend.embed(command)
            case HostAbort(request_id=request_id):
                self.backend.abort(request_id)
            case HostControl():
                # Control ops may take long (flush, weights): never block aborts behind them.
                threading.Thread(target=self.control, args=(command,), daemon=True).start()
            case HostShutdown():
                self.stop.set()
                self.backend.close()

    def control(self, command: HostControl) -> None:
        # Every control op gets exactly one reply, whatever fails: the caller is waiting.
        try:
            if command.op == "info":
                ok, message, data = True, "", msgspec.to_builtins(self.backend.info())
            else:
                ok, message, data = self.backend.control(command.op, dict(command.args))
            reply = HostControlReply(command.op_id, ok, message, msgspec.to_builtins(data))
            self.channel.send(reply)
        except Exception as exc:
            self.log.exception("control op failed", op=command.op)
            failed = HostControlReply(command.op_id, False, f"{type(exc).__name__}: {exc}", {})
            self.channel.send(failed)


def main(argv: list[str]) -> int:
    """Run the host; returns the exit code."""
    configure_logging(os.environ.get("SGL_NODE_LOG_LEVEL", "info"), "json")
    log = structlog.get_logger().bind(path="engine_host")
    if len(argv) != 1:
        print("usage: python -m actors.engine_host SPEC_JSON", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(argv[0], type=HostSpec)
    channel = HostChannel(spec.command_endpoint, spec.output_socket)
    stop = threading.Event()
    backend = build_backend(spec, channel)

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

        def close() -> None:
            channel.wake()  # the command loop sees the stop
            backend.close()

        threading.Thread(target=close, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    log.info("starting engine", backend=spec.backend, dp_size=spec.dp_size)
    backend.start()
    commands = threading.Thread(
        target=CommandLoop(backend, channel, stop).run, name="commands", daemon=True
    )
    commands.start()
    print(READY_LINE, flush=True)
    serve = getattr(backend, "serve", None)
    if serve is not None:
        serve()  # a backend with an event loop runs it on this (main) thread
    else:
        while not stop.wait(0.5):
            pass
    stop.set()
    backend.close()
    channel.wake()
    commands.join(2.0)  # its socket must not close under it
    channel.close()
    stuck = [
        t.name
        for t in threading.enumerate()
        if t.is_alive() and t is not threading.current_thread()
    ]
    # outputs dropped: sent while no EngineActor was connected (before its start, or after
    # it stopped first, as in an ordered stop)
    log.info("engine host stopped", threads_left=stuck, outputs_dropped=channel.unsent)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # The engine is closed and its outputs flushed: exit now, whatever thread is still
    # alive (a stuck backend thread must not keep the host past its shutdown timeout).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
