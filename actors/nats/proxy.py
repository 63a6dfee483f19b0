"""A TCP proxy between the node and its NATS server that fault injection can cut.

Only used with `[chaos] enabled`: the node then connects to NATS through it, so
`cut_nats` can drop the connection and refuse new ones for a while — a real network
cut as the NATS client sees it, without touching the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import structlog

__all__ = ["NatsCutProxy"]


class NatsCutProxy:
    """Forwards 127.0.0.1:<port> to `upstream`; `cut(seconds)` severs it for that long."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.log = structlog.get_logger().bind(path="chaos:nats-proxy")
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut_until = 0.0
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="nats-cut-proxy", daemon=True)

    def start(self, port: int = 0) -> int:
        """Start listening on `port` (0: any free one); returns the local port."""
        self.port = port
        self._thread.start()
        if not self._ready.wait(10):
            msg = "the NATS cut proxy did not start"
            raise RuntimeError(msg)
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        # Stopped (close): the connections' tasks see their aborted transports and end.
        pending = asyncio.all_tasks(self._loop)
        if pending:
            self._loop.run_until_complete(asyncio.wait(pending, timeout=1.0))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._cut_until:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def cut(self, seconds: float) -> None:
        """Drop every connection now and refuse new ones for `seconds`."""

        def sever() -> None:
            self._cut_until = time.monotonic() + seconds
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            self._writers.clear()

        self.log.warning("cutting the NATS connection", seconds=seconds)
        self._loop.call_soon_threadsafe(sever)

    def heal(self) -> None:
        """End a cut now: new connections go through again."""

        def end() -> None:
            self._cut_until = 0.0

        self.log.info("NATS connection no longer cut")
        self._loop.call_soon_threadsafe(end)

    def close(self) -> None:
        """Stop the proxy."""

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            self._loop.stop()

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(timeout=5)
