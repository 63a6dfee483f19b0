"""The sim's KV transfer between disaggregated nodes: a prefill node's bootstrap server and
a decode request's fetch.

In SGLang a prefill node runs a bootstrap server (`disaggregation.bootstrap_port`); a decode
request names it and a room, and the decode engine takes the prompt's KV cache from the
prefill engine that ran the request with the same room. The sim does the same in small, so
that a decode depends on its prefill as in SGLang, and a prefill node lost before the
transfer shows:

- a prefill node's engine host listens on its bootstrap port and marks a room ready when
  the prefill of a request with that room finishes;
- a decode request asks for its room, one line (`{room}\\n`), and is answered `ready\\n`
  once the prefill finished, or `pending\\n` after each second of waiting, on one
  connection; then the cache "arrives" after the prompt's tokens × the transfer time per
  token, and the request decodes;
- a bootstrap server that cannot be reached or goes away (the prefill node is gone), or a
  room not ready within `FETCH_TIMEOUT`, fails the decode request with
  `kv_transfer_failed` (retryable, field `bootstrap_info`): a router runs the pair again
  with another prefill instance.

Rooms are kept `ROOM_TTL` seconds (at most `MAX_ROOMS`): a decode that comes later finds
none and waits out its timeout, as with SGLang.
"""

from __future__ import annotations

import collections
import socket
import socketserver
import threading
import time
from collections.abc import Callable

__all__ = ["FETCH_TIMEOUT", "BootstrapServer", "TransferFailed", "fetch_room"]

FETCH_TIMEOUT = 60.0  # seconds a decode waits for its prefill to finish
ROOM_TTL = 300.0  # seconds a finished prefill's room stays fetchable
MAX_ROOMS = 65536
PENDING_EVERY = 1.0  # seconds between `pending` answers while a room is not ready
CONNECT_TIMEOUT = 5.0


class TransferFailed(Exception):
    """The KV cache of a decode request could not be fetched (the message says why)."""


class _Rooms:
    """Finished prefills' rooms, with a condition to wait on one."""

    def __init__(self) -> None:
        self._ready: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._cond = threading.Condition()
        self.closed = False

    def add(self, room: int) -> None:
        now = time.monotonic()
        with self._cond:
            self._ready[room] = now
            self._ready.move_to_end(room)
            while self._ready and (
                len(self._ready) > MAX_ROOMS or now - next(iter(self._ready.values())) > ROOM_TTL
            ):
                self._ready.popitem(last=False)
            self._cond.notify_all()

    def wait(self, room: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: room in self._ready or self.closed, timeout) and (
                room in self._ready
            )

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], rooms: _Rooms) -> None:
        self.rooms = rooms
        super().__init__(address, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        rooms = self.server.rooms
        while not rooms.closed:
            line = self.rfile.readline(64)
            if not line:
                return
            try:
                room = int(line)
            except ValueError:
                self.wfile.write(b"bad request\n")
                return
            answer = b"ready\n" if rooms.wait(room, PENDING_EVERY) else b"pending\n"
            self.wfile.write(answer)


class BootstrapServer:
    """A prefill node's bootstrap server (see the module docstring)."""

    def __init__(self, host: str, port: int) -> None:
        self.rooms = _Rooms()
        try:
            self._server = _Server((host, port), self.rooms)
        except OSError as exc:
            why = f"the sim's bootstrap server cannot listen on {host}:{port}: {exc.strerror}"
            raise OSError(exc.errno, f"{why} (set disaggregation.bootstrap_port)") from None
        self.address = self._server.server_address
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 3600.0},  # shutdown() wakes it
            name="sim-bootstrap",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def ready(self, room: int) -> None:
        """The prefill of `room` finished: decodes waiting on it go on."""
        self.rooms.add(room)

    def close(self) -> None:
        self.rooms.close()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def fetch_room(
    host: str, port: int, room: int, cancelled: Callable[[], bool], timeout: float
) -> bool:
    """Wait until `room` is ready on the bootstrap server at host:port. False if
    `cancelled()` became true meanwhile; raises `TransferFailed` if the server cannot be
    reached, goes away, or the room is not ready within `timeout` seconds."""
    where = f"the prefill node's bootstrap server {host}:{port} (room {room})"
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as sock:
            sock.settimeout(PENDING_EVERY + CONNECT_TIMEOUT)
            reader = sock.makefile("rb")
            while not cancelled():
                sock.sendall(b"%d\n" % room)
                answer = reader.readline(64)
                if answer == b"ready\n":
                    return True
                if answer != b"pending\n":
                    raise TransferFailed(f"{where} went away before the KV cache was ready")
                if time.monotonic() > deadline:
                    why = f"{where} did not have the KV cache ready within {timeout:.0f} s"
                    raise TransferFailed(why)
            return False
    except OSError as exc:
        raise TransferFailed(f"{where} cannot be reached: {exc}") from None
