"""The engine host's output stream: length-prefixed frames over a Unix stream socket.

The host's output (a decode step's chunks, control replies) is the one message of the
channel sent per token, so its cost is paid per token twice (host and node). It went over
ZMQ PUSH/PULL until measured: a ZMQ message wakes the sender's I/O thread, then the
receiver's, which wakes the reading thread; a Unix socket wakes only the reader. Per
message, one every 6 ms (a decode step at concurrency 1), the receiving process's CPU
(an asyncio loop reading the descriptor, as the node does) was 242–286 µs with ZMQ and
133–143 µs with this stream; the sender's 194–229 and 133–146 µs (three pairs, AMD EPYC,
2 cores). The commands (one per request, not per token) stay on ZMQ.

The host listens; the node's `EngineActor` connects when it starts (and again after a
restart: the newest connection is the one written to, an older one is closed). What
`OutputStream.send` does, like the PUSH socket it replaces: it never blocks the engine's
threads: a frame the kernel does not take at once waits in memory, written by the
stream's thread as the reader drains; with no reader connected it is dropped and counted
(the node stopped before the host, as in an ordered stop, or has not connected yet: its
handshake asks again). A reader that connects gets whole frames only.

Frame: a 4-byte little-endian length, then that many bytes (msgpack, messages/engine.py).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import time

__all__ = ["MAX_FRAME", "FrameReader", "OutputStream", "connect"]

_HEADER = struct.Struct("<I")
MAX_FRAME = 256 * 1024 * 1024  # a sanity bound: a longer length is a broken stream
_FLUSH_AT_CLOSE = 1.0  # seconds `close` keeps writing what waits (ZMQ's linger was 1 s)


class FrameReader:
    """Cuts a byte stream into frames (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """The frames `data` completes, in order (copies: `data` may be reused after);
        raises ValueError on a broken stream."""
        buffer = self._buffer
        if not buffer:  # the usual case: whole frames, nothing carried over
            frames, used = _cut(data)
            if used < len(data):
                buffer += data[used:]
            return frames
        buffer += data
        frames, used = _cut(buffer)
        del buffer[:used]
        return frames


def _cut(data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
    frames: list[bytes] = []
    at, end, header = 0, len(data), _HEADER.size
    while end - at >= header:
        (length,) = _HEADER.unpack_from(data, at)
        if length > MAX_FRAME:
            msg = f"a frame of {length} bytes (more than {MAX_FRAME}): the stream is broken"
            raise ValueError(msg)
        if end - at - header < length:
            break
        frames.append(bytes(data[at + header : at + header + length]))
        at += header + length
    return frames, at


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A blocking connection to the host's stream at `path`, retried while the host has
    not begun listening yet (up to `timeout` seconds); raises ConnectionError naming it."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                msg = (
                    f"the engine host's output socket {path} took no connection within "
                    f"{timeout:g}s ({exc.strerror}): is the engine host running?"
                )
                raise ConnectionError(msg) from exc
            time.sleep(0.02)
            continue
        return sock


def _closed_by_peer(conn: socket.socket) -> bool:
    """A reader's connection turned readable: the reader never writes, so it closed (or
    the wake-up was spurious)."""
    try:
        return not conn.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True


class OutputStream:
    """The host's end: listens at `path`, sends frames to the connected reader."""

    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket file left by a host that was killed
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.setblocking(False)
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None  # the reader written to
        self._backlog = bytearray()  # bytes of whole frames the kernel has not taken yet
        self._gone: list[socket.socket] = []  # connections to close (on the stream's thread)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self.unsent = 0  # frames dropped: no reader connected, or it went away
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, name="engine-out", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        """Send one frame (thread-safe, never blocks; see the module docstring)."""
        frame = _HEADER.pack(len(data)) + data
        with self._lock:
            if self._closing:
                self.unsent += 1
                return
            for _ in range(2):  # the reader went away: once more to one that came since
                # a reader connected a moment ago is taken here, not left to the thread
                conn = self._conn or self._accept_locked()
                if conn is None:
                    break
                if self._backlog:  # keep the order: behind what waits
                    self._backlog += frame
                    return
                try:
                    sent = conn.send(frame, socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop(conn)
                    continue
                if sent < len(frame):
                    self._backlog += frame[sent:]
                    self._wake()
                return
            self.unsent += 1

    def close(self) -> None:
        """Write what waits (up to a second), then close everything."""
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(_FLUSH_AT_CLOSE + 1.0)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # --- the stream's thread -----------------------------------------------------------------

    def _drop(self, conn: socket.socket) -> None:
        """Forget `conn` (under the lock); the stream's thread closes it."""
        if self._conn is conn:
            self._conn = None
            self._backlog.clear()
        self._gone.append(conn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        watched: dict[socket.socket, int] = {}
        try:
            while True:
                with self._lock:
                    closing = self._closing
                    gone, self._gone = self._gone, []
                    wanted = {}
                    if self._conn is not None:
                        writing = selectors.EVENT_WRITE if self._backlog else 0
                        wanted[self._conn] = selectors.EVENT_READ | writing
                for conn in gone:
                    if conn in watched:
                        selector.unregister(conn)
                        del watched[conn]
                    conn.close()
                if closing:
                    break
                for conn, events in wanted.items():
                    if conn not in watched:
                        selector.register(conn, events)
                    elif watched[conn] != events:
                        selector.modify(conn, events)
                    watched[conn] = events
                for key, events in selector.select():
                    if key.fileobj is self._listener:
                        with self._lock:
                            self._accept_locked()
                    elif key.fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self._service(key.fileobj, events)
            self._flush_at_close()
        finally:
            selector.close()
            with self._lock:
                conns = [c for c in (self._conn, *self._gone) if c is not None]
                self._conn = None
            for conn in {*conns, *watched}:
                conn.close()
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _accept_locked(self) -> socket.socket | None:
        """Take the readers waiting to be accepted (under the lock): the newest becomes
        the one written to; returns it (or the current one, or None)."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return self._conn
            conn.setblocking(False)
            if self._conn is not None:
                self._gone.append(self._conn)
            self._conn = conn
            self._backlog.clear()  # a partial frame never reaches a new reader
            self.connections += 1
            self._wake()  # the thread watches it from now on

    def _service(self, conn: socket.socket, events: int) -> None:
        if events & selectors.EVENT_READ and _closed_by_peer(conn):
            with self._lock:
                self._drop(conn)
            return
        if events & selectors.EVENT_WRITE:
            with self._lock:
                if self._conn is not conn or not self._backlog:
                    return
                try:
                    sent = conn.send(self._backlog, socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    return
                except OSError:
                    self._drop(conn)
                    return
                del self._backlog[:sent]

    def _flush_at_close(self) -> None:
        with self._lock:
            conn, backlog = self._conn, bytes(self._backlog)
            self._backlog.clear()
        if conn is None or not backlog:
            return
        conn.setblocking(True)
        conn.settimeout(_FLUSH_AT_CLOSE)
        with contextlib.suppress(OSError):
            conn.sendall(backlog)
