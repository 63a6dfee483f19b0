"""`OutputReader`: the engine host's output socket, read on an event loop.

The `EngineActor` used to read it on a thread of its own, which then told each handler
its chunks: two thread wake-ups per decode step before the handler's publish woke the
NATS link's loop, a third. Handlers now run on the link's loop (`LoopActor`), and so
does this reader: a step's output wakes that one loop (ZMQ's I/O thread signals the
socket's descriptor), is routed to its handlers and published without another thread.
A node without a NATS link (an engine tested alone) reads on a private loop thread.

ZMQ's descriptor is edge-triggered: it says "something changed", so each wake-up takes
everything waiting (up to `_DRAIN_MAX`, then the rest on the next turn of the loop, after
other work) and the reader looks at `EVENTS` before it sleeps again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from messages.codec import DecodeError, decode_msgpack
from messages.engine import HostChunk, HostChunks, HostControlReply, HostOutput

__all__ = ["OutputReader"]

_DRAIN_MAX = 256  # host messages taken per turn of the loop
# plain ints: pyzmq's flags are enums, whose `&` costs an enum construction per test
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


class OutputReader:
    """Reads `socket` on `loop`: control replies go to `on_reply`, chunks (all of one turn
    together) to `on_chunks`. Both run on the loop (see the module docstring)."""

    def __init__(
        self,
        socket: zmq.Socket[Any],
        loop: asyncio.AbstractEventLoop,
        on_reply: Callable[[HostControlReply], None],
        on_chunks: Callable[[list[HostChunk]], None],
    ) -> None:
        self._socket = socket
        self._loop = loop
        self._on_reply = on_reply
        self._on_chunks = on_chunks
        self._reading = False
        self._fd = socket.FD
        self.log = structlog.get_logger().bind(path="engine-output")

    def start(self) -> None:
        """Begin reading (from any thread)."""
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._reading = True
        self._loop.add_reader(self._fd, self._readable)
        self._readable()  # edge-triggered: take what came before the reader was added

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
        chunks: list[HostChunk] = []
        more = False
        for _ in range(_DRAIN_MAX):
            try:
                # EVENTS first: a recv that finds nothing raises, which costs more
                if not int(self._socket.getsockopt(_EVENTS)) & _POLLIN:
                    break
                data = self._socket.recv(_NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:  # closed under us: the actor is stopping
                self.log.debug("engine output socket gone", error=str(exc))
                self._reading = False
                return
            try:
                output: HostOutput = decode_msgpack(data, HostOutput)
            except DecodeError as exc:
                self.log.error("undecodable engine output", error=str(exc))
                continue
            if isinstance(output, HostControlReply):
                self._on_reply(output)
            elif isinstance(output, HostChunks):
                chunks.extend(output.chunks)
            else:
                chunks.append(output)
        else:
            more = True  # more may wait: taken after other work of the loop
        if chunks:
            try:
                self._on_chunks(chunks)
            except Exception:  # a bug in routing: say it, keep reading the others' output
                self.log.exception("routing engine output failed", chunks=len(chunks))
        if self._reading and more:
            self._loop.call_soon(self._readable)
