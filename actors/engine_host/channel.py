"""The host's end of the engine host channel (see messages/engine.py)."""

from __future__ import annotations

import threading

import zmq

from actors.wake import WakeablePoller
from messages.codec import DecodeError, decode_msgpack, encode_msgpack
from messages.engine import HostChunk, HostChunks, HostCommand, HostOutput

__all__ = ["HostChannel"]


class HostChannel:
    """PULL for commands, PUSH for outputs; `send` is safe from any thread."""

    def __init__(self, command_endpoint: str, output_endpoint: str) -> None:
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PULL)
        self._commands.bind(command_endpoint)
        self._outputs = self._context.socket(zmq.PUSH)
        self._outputs.setsockopt(zmq.SNDHWM, 0)  # never drop an output
        self._outputs.setsockopt(zmq.LINGER, 1000)
        self._outputs.bind(output_endpoint)
        self._poller = WakeablePoller(self._commands)
        self._send_lock = threading.Lock()
        self.undecodable = 0
        self.unsent = 0

    def send(self, output: HostOutput | list[HostChunk]) -> None:
        """Send one output (thread-safe). Never blocks: with no EngineActor connected (it
        stopped before the host, as it does in an ordered stop) the output is dropped and
        counted, instead of blocking the engine's threads forever."""
        if isinstance(output, list):
            if not output:
                return
            output = output[0] if len(output) == 1 else HostChunks(chunks=output)
        data = encode_msgpack(output)
        with self._send_lock:
            try:
                self._outputs.send(data, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.unsent += 1

    def recv(self, timeout: float | None = None) -> HostCommand | None:
        """The next command, or None after `timeout` seconds (None: no limit), after a
        `wake()`, or for undecodable bytes."""
        if not self._poller.poll(timeout):
            return None
        data = self._commands.recv()
        try:
            return decode_msgpack(data, HostCommand)  # type: ignore[no-any-return]
        except DecodeError:
            self.undecodable += 1
            return None

    def wake(self) -> None:
        """Make a `recv()` waiting now (or the next one) return None (from any thread)."""
        self._poller.wake()

    def close(self) -> None:
        """Close both sockets."""
        self._poller.close()
        self._commands.close(linger=0)
        self._outputs.close(linger=1000)
        self._context.term()
