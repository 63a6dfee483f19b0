"""The host's end of the engine host channel (see messages/engine.py): commands over ZMQ,
outputs over a Unix stream socket (see `actors.engine_host.output_stream`)."""

from __future__ import annotations

import zmq

from actors.engine_host.output_stream import OutputStream
from actors.wake import WakeablePoller
from messages.codec import DecodeError, decode_msgpack, encode_msgpack
from messages.engine import HostChunk, HostChunks, HostCommand, HostOutput

__all__ = ["HostChannel"]


class HostChannel:
    """PULL for commands, the output stream for outputs; `send` is safe from any thread."""

    def __init__(self, command_endpoint: str, output_socket: str) -> None:
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PULL)
        self._commands.bind(command_endpoint)
        self._outputs = OutputStream(output_socket)
        self._poller = WakeablePoller(self._commands)
        self.undecodable = 0

    @property
    def unsent(self) -> int:
        """Outputs dropped: no EngineActor connected."""
        return self._outputs.unsent

    def send(self, output: HostOutput | list[HostChunk]) -> None:
        """Send one output (thread-safe). Never blocks: with no EngineActor connected (it
        stopped before the host, as it does in an ordered stop) the output is dropped and
        counted, instead of blocking the engine's threads forever."""
        if isinstance(output, list):
            if not output:
                return
            output = output[0] if len(output) == 1 else HostChunks(chunks=output)
        self._outputs.send(encode_msgpack(output))

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
        self._outputs.close()  # writes what waits, up to a second
        self._context.term()
