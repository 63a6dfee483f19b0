"""`OutputReader`: the engine host's output stream, read on an event loop.

The `EngineActor` used to read it on a thread of its own, which then told each handler
its chunks: two thread wake-ups per decode step before the handler's publish woke the
NATS link's loop, a third. Handlers now run on the link's loop (`LoopActor`), and so
does this reader: a step's output wakes that one loop, is routed to its handlers and
published without another thread (and, since the output left ZMQ for a Unix socket, no
I/O thread of ZMQ's either: see `actors.engine_host.output_stream`). A node without a
NATS link (an engine tested alone) reads on a private loop thread.

Each wake-up reads what the socket holds into one buffer kept for it (up to `_READ_SIZE`
bytes; the loop calls again while more waits, after its other work) and routes the whole
frames in it together. Not `recv(n)`: that allocates n bytes per call, and a large n is a
fresh mapping each time (`recv(1 MiB)` cost 100 µs more per call than `recv(64 KiB)` here).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import Callable

import structlog

from actors.engine_host.output_stream import FrameReader
from messages.codec import DecodeError, decode_msgpack
from messages.engine import HostChunk, HostChunks, HostControlReply, HostOutput

__all__ = ["OutputReader"]

_READ_SIZE = 1 << 18  # bytes taken per turn of the loop


class OutputReader:
    """Reads the connected `sock` on `loop`: control replies go to `on_reply`, chunks (all
    of one turn together) to `on_chunks`. Both run on the loop (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_reply: Callable[[HostControlReply], None],
        on_chunks: Callable[[list[HostChunk]], None],
    ) -> None:
        sock.setblocking(False)
        self._socket = sock
        self._frames = FrameReader()
        self._buffer = bytearray(_READ_SIZE)
        self._view = memoryview(self._buffer)
        self._loop = loop
        self._on_reply = on_reply
        self._on_chunks = on_chunks
        self._reading = False
        self._fd = sock.fileno()
        self.log = structlog.get_logger().bind(path="engine-output")

    def start(self) -> None:
        """Begin reading (from any thread)."""
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._reading = True
        self._loop.add_reader(self._fd, self._readable)  # level-triggered: what waits too

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and wait until the loop has let go of the socket (so it can be
        closed); returns at once if the loop no longer runs."""
        if self._loop.is_closed() or not self._loop.is_running():
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def stop_here() -> None:
            if self._reading:
                self._reading = False
                self._loop.remove_reader(self._fd)
            done.set_result(None)

        try:
            self._loop.call_soon_threadsafe(stop_here)
            done.result(timeout)
        except (RuntimeError, TimeoutError):  # the loop closed or stopped meanwhile
            pass

    def _readable(self) -> None:
        if not self._reading:
            return
        try:
            size = self._socket.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # closed under us: the actor is stopping
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        if not size:
            self._lost("the engine host closed it")
            return
        try:
            frames = self._frames.feed(self._view[:size])
        except ValueError as exc:
            self.log.error("engine output stream broken", error=str(exc))
            self._lost(str(exc))
            return
        chunks: list[HostChunk] = []
        for frame in frames:
            try:
                output: HostOutput = decode_msgpack(frame, HostOutput)
            except DecodeError as exc:
                self.log.error("undecodable engine output", error=str(exc))
                continue
            if isinstance(output, HostControlReply):
                self._on_reply(output)
            elif isinstance(output, HostChunks):
                chunks.extend(output.chunks)
            else:
                chunks.append(output)
        if chunks:
            try:
                self._on_chunks(chunks)
            except Exception:  # a bug in routing: say it, keep reading the others' output
                self.log.exception("routing engine output failed", chunks=len(chunks))

    def _lost(self, why: str) -> None:
        """Stop reading: the host's end is gone (it died or stops; its supervisor restarts
        it with this actor, and the engine's health checks see a host that hangs)."""
        self._reading = False
        self._loop.remove_reader(self._fd)
        self.log.info("engine output stream ended", reason=why)
