"""`FrontendServer`: the frontend's HTTP server and NATS client, on their own thread and
asyncio loop (the actor's thread only starts and stops them).

`start` returns once the socket is bound, NATS is connected, discovery is being watched
and uvicorn is serving; it raises (and leaves nothing running) otherwise. `stop` asks
uvicorn to finish: it stops accepting, lets streams in flight finish for `drain` seconds,
then cancels the rest (their requests are cancelled on the nodes), and closes NATS. If
the server ends on its own, `on_failure` is called (the actor then crashes, and its
supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import nats
import uvicorn

from actors.frontend.routes import create_app
from actors.frontend.state import FrontendState
from actors.nats.auth import connect_options
from supervisor.config import NodeConfig

__all__ = ["FrontendServer", "nats_servers"]


def nats_servers(config: NodeConfig) -> list[str]:
    """The NATS servers the frontend connects to (the embedded one, or `nats.url`)."""
    nats_section = config.nats
    if nats_section.embedded:
        return [f"nats://{nats_section.host}:{nats_section.port}"]
    return list(nats_section.url)


class FrontendServer:
    """HTTP + NATS on a private loop thread; see the module docstring."""

    def __init__(self, config: NodeConfig, log: Any, on_failure: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.on_failure = on_failure
        self.port = config.frontend.port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="frontend-http", daemon=True)
        self._ready = threading.Event()
        self._error: str | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False

    # --- the actor's side -------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Start and wait until serving; raises `RuntimeError` with the reason otherwise."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop(5.0)
            msg = f"the frontend did not start within {timeout:g}s"
            raise RuntimeError(msg)
        if self._error is not None:
            self._thread.join(5.0)
            raise RuntimeError(self._error)

    def stop(self, timeout: float) -> None:
        """Stop serving (gracefully within the drain time) and wait up to `timeout`."""
        self._stopping = True
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.log.warning("frontend thread did not stop in time", timeout=timeout)

    # --- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported, never raised into the void
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    def _fail(self, why: str) -> None:
        if not self._ready.is_set():
            self._error = why
            self._ready.set()
        elif not self._stopping:
            self.log.error("frontend server failed", error=why)
            self.on_failure(why)

    def _bind(self) -> socket.socket:
        frontend = self.config.frontend
        family = socket.AF_INET6 if ":" in frontend.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and accepted sockets inherit it. Without it, a streamed chunk after the
        # headers waited for the client's delayed ACK (~40 ms on every keep-alive request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((frontend.host, frontend.port))
        except OSError as exc:
            sock.close()
            msg = f"cannot listen on {frontend.host}:{frontend.port}: {exc.strerror or exc}"
            raise RuntimeError(msg) from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        sock = self._bind()
        nats_section = self.config.nats
        servers = nats_servers(self.config)
        try:
            connecting = nats.connect(
                servers=servers,
                name="sgl-node-frontend",
                connect_timeout=nats_section.connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                dont_randomize=not nats_section.randomize,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                error_cb=self._on_error,
                **connect_options(nats_section.auth),
            )
            # nats-py may retry a first connection forever: bound it
            nc = await asyncio.wait_for(connecting, nats_section.connect_timeout + 5.0)
        except Exception as exc:  # noqa: BLE001 - any failure to connect fails the start
            sock.close()
            msg = f"cannot connect to NATS at {servers}: {type(exc).__name__}: {exc}"
            raise RuntimeError(msg) from None
        state = FrontendState(nc, self.config, self.log)
        try:
            await state.start()
            await self._serve(state, sock)
        finally:
            await state.close()
            with contextlib.suppress(Exception):
                await nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5.0)

    async def _serve(self, state: FrontendState, sock: socket.socket) -> None:
        assert self._stop is not None
        drain = self.config.shutdown.drain_timeout
        # uvicorn's own start/stop lines repeat ours; its warnings and errors still show
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server = _Server(
            uvicorn.Config(
                create_app(state),
                log_config=None,
                access_log=False,
                lifespan="off",
                # C parser and direct chunk writes: h11's pure-Python framing cost ~20 % of
                # the frontend's CPU per streamed token (tests/benchmarks/peer.py)
                http="httptools",
                timeout_graceful_shutdown=max(1, round(drain)),
                timeout_keep_alive=5,
            )
        )
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                serving.result()
                msg = "the HTTP server stopped while starting"
                raise RuntimeError(msg)
            await asyncio.sleep(0.01)
        frontend = self.config.frontend
        self.log.info(
            "frontend listening",
            url=f"http://{frontend.host}:{self.port}/v1",
            routing=frontend.routing,
            nats=nats_servers(self.config),
        )
        self._ready.set()
        if self._stopping:  # stop() came while starting
            self._stop.set()
        stopping = asyncio.get_running_loop().create_task(self._stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and not self._stop.is_set():
            stopping.cancel()
            serving.result()  # its exception, if it had one
            msg = "the HTTP server stopped on its own"
            raise RuntimeError(msg)
        server.exit()
        await serving
        self.log.info("frontend stopped serving")

    async def _on_disconnected(self) -> None:
        self.log.warning("frontend disconnected from NATS")

    async def _on_reconnected(self) -> None:
        self.log.info("frontend reconnected to NATS")

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning("frontend NATS error", error=f"{type(exc).__name__}: {exc}")


class _Server(uvicorn.Server):
    """uvicorn's server ticking once a second instead of ten times: its tick refreshes
    the Date header (once a second anyway) and looks for `should_exit`, and an idle
    frontend's loop woke for it ten times a second. `exit()` ends it at once."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit = asyncio.Event()

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # tick 0: the Date header is refreshed each time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    def exit(self) -> None:
        """Stop serving (on the server's event loop): shutdown starts without a wait."""
        self.should_exit = True
        self._exit.set()
