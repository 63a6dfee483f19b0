"""Direct streams: a request's chunks sent by the node straight to the frontend over TCP,
not through the NATS server (the request itself, cancels and resumes stay on NATS).

Why: through NATS, every streamed chunk costs the node's send to the server, the server's
read and its write to the frontend (two wake-ups of another process, 157 µs of its CPU
per token at one stream on a 2-core machine) and the frontend's read. Straight, it costs
the node's send and the frontend's read.

How: a frontend listens on a TCP port of its own and names it, with a token (a secret of
its run, which only those who may read its requests on NATS learn), in each request to a
node that says it can (`InstanceRecord.direct_streams`): `GenerateRequest.reply_direct`.
The node connects once per frontend, says `SGLDIRECT1 <token>` and a newline, and after
the frontend's `OK` and a newline sends frames: a 6-byte header (the data's length, u32,
and the reply subject's, u16, big-endian), the reply subject, the data: the bytes it would
have published to the subject. The frontend puts each in the subject's inbox, as NATS
would have.

Nothing is lost that NATS would not lose: a stream goes direct only if the connection was
up when its first chunk went out, else all of its chunks go through NATS as before
(connecting, refused, wrong token, not on the sender's loop). A connection that breaks
loses what it had in flight; the stream's later chunks go through NATS, and the frontend
asks the node for the missing ones as for any gap (resume).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

from messages.request import DirectReply

__all__ = ["DirectReceiver", "DirectSender"]

_HEAD = struct.Struct(">IH")
HELLO = b"SGLDIRECT1 "
OK = b"OK\n"
MAX_SUBJECT = 1024
MAX_DATA = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
RETRY_AFTER = 2.0  # seconds before connecting again to a frontend that broke or refused
RETRY_MAX = 60.0  # ... doubling while it keeps failing (unreachable: another machine)
# A frontend that does not read what it is sent: its connection is dropped, and its
# streams go on through NATS (whose server buffers and, past its limits, cuts the client).
MAX_BUFFERED = 8 * 1024 * 1024
MAX_ROUTES = 100_000  # reply subjects remembered (ended streams are forgotten at once)
# Frontends remembered for their retry pause: each run of a frontend is another (a new
# token); past this many, those whose pause is over are forgotten.
MAX_PAUSED = 64

_Key = tuple[str, int, str]
_UNSET: Any = object()


# --- the node's side ------------------------------------------------------------------------


class _Outgoing(asyncio.Protocol):
    """One connection to one frontend, on the sender's loop."""

    def __init__(self, sender: DirectSender, key: _Key) -> None:
        self.sender = sender
        self.key = key
        self.up = False
        self.was_up = False
        self.why = ""  # why it never came up, or was dropped here, once known
        self.closed = False
        self.aborted = False
        self.transport: asyncio.Transport | None = None
        self._answer = b""
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._lost: asyncio.Future[None] = sender.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.aborted:  # dropped (a cut) while it was connecting
            transport.abort()
            return
        # (TCP_NODELAY: asyncio sets it on the TCP sockets it makes, both sides)
        transport.write(HELLO + self.key[2].encode() + b"\n")
        self.sender.loop.call_later(HANDSHAKE_TIMEOUT, self._check_handshake)

    def data_received(self, data: bytes) -> None:
        if self.up:
            return  # the frontend says nothing after its OK
        self._answer += data
        if len(self._answer) < len(OK):
            return
        if self._answer[: len(OK)] != OK:
            self.why = "refused by what listens there (not that frontend, or another run)"
            self.abort()
            return
        self.up = self.was_up = True
        self.sender.connected(self.key)
        self.sender.log.info("direct streams to a frontend connected", frontend=self.frontend)

    @property
    def frontend(self) -> str:
        """`host:port` (for the logs)."""
        return f"{self.key[0]}:{self.key[1]}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.up = False
        self.closed = True
        self._pending.clear()
        if not self._lost.done():
            self._lost.set_result(None)
        self.sender.lost(self, exc)

    def _check_handshake(self) -> None:
        if not self.up and not self.closed:
            self.why = "no answer to the handshake"
            self.abort()

    def write(self, subject: bytes, data: bytes) -> None:
        """Queue one frame; the frames of one loop turn go out in one write."""
        self._pending += (_HEAD.pack(len(data), len(subject)), subject, data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.sender.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued (a frontend that does not read gets cut off)."""
        self._flush_scheduled = False
        transport = self.transport
        if not self._pending or transport is None or self.closed:
            self._pending.clear()
            return
        transport.write(b"".join(self._pending))
        self._pending.clear()
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            self.sender.log.warning(
                "a frontend does not read its direct streams; its streams go through NATS",
                frontend=self.frontend,
                buffered_bytes=transport.get_write_buffer_size(),
            )
            self.why = "the frontend did not read"
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (what it holds is lost: the frontend resumes it)."""
        self.up = False
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """Send what is queued, close, and wait (briefly) until it is gone."""
        self.flush()
        self.up = False
        if self.transport is not None:
            self.transport.close()
            await asyncio.wait({self._lost}, timeout=1.0)


class DirectSender:
    """The node's direct-stream connections to frontends, used from one event loop (the
    NATS link's, where the handlers run); see the module docstring.

    `send` writes one chunk straight to its frontend and returns True, or returns False:
    the caller publishes it through NATS instead.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_loop: Callable[[], bool], log: Any
    ) -> None:
        self.loop = loop
        self.on_loop = on_loop
        self.log = log
        self.sent = 0  # chunks sent direct
        self.streams = {"direct": 0, "nats": 0}  # streams that asked, by the way they went
        self._cut_until = 0.0
        self._conns: dict[_Key, _Outgoing] = {}
        self._retry_at: dict[_Key, float] = {}
        self._failures: dict[_Key, int] = {}  # attempts in a row that never came up
        self._routes: dict[str, _Outgoing | None] = {}  # reply subject → its way, once chosen

    def send(self, target: DirectReply, subject: str, data: bytes) -> bool:
        """Send `data` for `subject` straight to `target`, if this stream goes direct."""
        if not self.on_loop():
            return False  # e.g. a stop on another thread: the NATS link is thread-safe
        route = self._routes.get(subject, _UNSET)
        if route is _UNSET:
            route = self._route(target)
            self.streams["direct" if route is not None else "nats"] += 1
            if len(self._routes) >= MAX_ROUTES:
                self._routes.pop(next(iter(self._routes)))
            self._routes[subject] = route
        if route is None:
            return False
        if not route.up:  # the connection broke: the rest of the stream goes through NATS
            self._routes[subject] = None
            return False
        route.write(subject.encode(), data)
        self.sent += 1
        return True

    def forget(self, subject: str) -> None:
        """The stream sending to `subject` ended here."""
        self._routes.pop(subject, None)

    @property
    def connections(self) -> int:
        """Connections up."""
        return sum(1 for conn in self._conns.values() if conn.up)

    def cut(self, seconds: float) -> None:
        """Fault injection (with the node's NATS cut): drop every connection, losing what
        they hold, and open none for `seconds`."""
        self._cut_until = time.monotonic() + seconds
        for conn in list(self._conns.values()):
            conn.why = "cut (fault injection)"
            conn.abort()

    def _route(self, target: DirectReply) -> _Outgoing | None:
        key = (target.host, target.port, target.token)
        conn = self._conns.get(key)
        if conn is not None:
            return conn if conn.up else None
        now = time.monotonic()
        if now < self._retry_at.get(key, 0.0) or now < self._cut_until:
            return None
        conn = _Outgoing(self, key)
        self._conns[key] = conn
        self.loop.create_task(self._connect(conn))
        return None  # this stream goes through NATS; the next ones, direct

    async def _connect(self, conn: _Outgoing) -> None:
        host, port, _ = conn.key
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: conn, host, port), HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            conn.why = str(exc) or type(exc).__name__
            self.lost(conn, exc)

    def lost(self, conn: _Outgoing, exc: Exception | None) -> None:
        """A connection ended, or never came up: try again after `RETRY_AFTER`, doubling
        up to `RETRY_MAX` while attempts keep failing (said at the first and every tenth:
        a frontend on another machine with the default `direct_host` fails every time)."""
        key = conn.key
        if self._conns.get(key) is not conn:
            return
        del self._conns[key]
        if len(self._retry_at) >= MAX_PAUSED:
            self._forget_paused()
        if conn.was_up:  # (its failures were forgotten when it came up: `connected`)
            self._retry_at[key] = time.monotonic() + RETRY_AFTER
            self.log.warning(
                "direct streams to a frontend lost; its streams go through NATS",
                frontend=conn.frontend,
                error=str(exc) if exc is not None else conn.why or "closed by the frontend",
            )
            return
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(RETRY_AFTER * 2 ** (failures - 1), RETRY_MAX)
        self._retry_at[key] = time.monotonic() + delay
        if failures == 1 or failures % 10 == 0:
            self.log.warning(
                "cannot stream straight to a frontend; its streams go through NATS"
                " (set frontend.direct_host to an address the nodes can reach)",
                frontend=conn.frontend,
                why=conn.why or (str(exc) if exc is not None else "closed"),
                attempts=failures,
                retry_after=delay,
            )

    def _forget_paused(self) -> None:
        now = time.monotonic()
        for key in [k for k, at in self._retry_at.items() if at <= now]:
            del self._retry_at[key]
            self._failures.pop(key, None)

    def connected(self, key: _Key) -> None:
        """A connection came up: failures before it are forgotten."""
        self._failures.pop(key, None)

    async def close(self) -> None:
        """Send what is queued and close every connection (on the loop)."""
        conns = list(self._conns.values())
        self._conns.clear()
        self._routes.clear()
        if conns:
            await asyncio.gather(*(conn.close() for conn in conns))


# --- the frontend's side ----------------------------------------------------------------------


class _Incoming(asyncio.Protocol):
    """One node's connection: its handshake, then its frames."""

    def __init__(self, receiver: DirectReceiver) -> None:
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.receiver.transports.add(transport)
        asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._check_handshake)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.receiver.transports.discard(self.transport)

    def _check_handshake(self) -> None:
        if not self.ready and self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.ready and not self._handshake(buf):
            return
        deliver = self.receiver.deliver
        size, pos, head = len(buf), 0, _HEAD.size
        while size - pos >= head:
            length, subject_length = _HEAD.unpack_from(buf, pos)
            if length > MAX_DATA or subject_length > MAX_SUBJECT:
                self._refuse(f"a frame of {length} bytes, subject {subject_length}")
                return
            start = pos + head + subject_length
            end = start + length
            if end > size:
                break
            deliver(buf[pos + head : start].decode(), bytes(buf[start:end]))
            pos = end
        del buf[:pos]

    def _handshake(self, buf: bytearray) -> bool:
        newline = buf.find(b"\n")
        if newline < 0:
            if len(buf) > 256:
                self._refuse("no handshake")
            return False
        line = bytes(buf[:newline])
        del buf[: newline + 1]
        token = self.receiver.token.encode()
        if not line.startswith(HELLO) or not hmac.compare_digest(line[len(HELLO) :], token):
            self._refuse("a wrong handshake")
            return False
        self.ready = True
        assert self.transport is not None
        self.transport.write(OK)
        return True

    def _refuse(self, why: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.receiver.log.warning("direct stream connection refused", why=why, peer=str(peer))
        self._buf.clear()
        if self.transport is not None:
            self.transport.abort()


class DirectReceiver:
    """The frontend's direct-stream listener: frames go to `deliver(subject, data)` (the
    reply mux), on the frontend's loop; see the module docstring."""

    def __init__(self, deliver: Callable[[str, bytes], None], host: str, log: Any) -> None:
        self.deliver = deliver
        self.host = host
        self.log = log
        self.token = secrets.token_hex(16)
        self.transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> DirectReply:
        """Listen on a free port of `host`; where nodes are to send."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Incoming(self), self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.log.info("direct streams listening", host=self.host, port=port)
        return DirectReply(self.host, port, self.token)

    async def stop(self) -> None:
        """Stop listening and close the nodes' connections."""
        if self._server is not None:
            self._server.close()
        for transport in list(self.transports):
            transport.close()
        self.transports.clear()
