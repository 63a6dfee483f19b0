"""`FrontendActor`: the OpenAI-compatible HTTP frontend as a supervised child.

It owns a `FrontendServer` (HTTP on uvicorn, its own NATS connection, discovery watcher
and KV/load indexer, on a private thread and event loop). It is ready once the server
listens and watches discovery. On an ordered stop, streams in flight get
`shutdown.drain_timeout` seconds to finish; on any exit the server and its connection
are closed. If the server dies on its own, the actor crashes, so its supervisor restarts
it by policy.
"""

from __future__ import annotations

from typing import Any

from actors.frontend.parsers import check_parser_config
from actors.frontend.server import FrontendServer
from messages.node import FrontendFailed, GetFrontendPort
from supervisor.config import NodeConfig
from supervisor.core import ChildContext, ExitReason, StopRequest, SupervisedActor

__all__ = ["FrontendActor"]

_STOP_MARGIN = 3.0  # seconds past the drain for uvicorn and NATS to close


class FrontendActor(SupervisedActor):
    """Runs the frontend's server; see the module docstring."""

    def __init__(self, context: ChildContext, config: NodeConfig) -> None:
        super().__init__(context)
        self.config = config
        self.server: FrontendServer | None = None

    def on_start_up(self) -> None:
        ref = self.actor_ref

        def on_failure(detail: str) -> None:  # on the server's thread: only hand it on
            if ref.is_alive():
                ref.tell(FrontendFailed(detail))

        problems = check_parser_config(self.config.frontend)
        if problems:
            raise RuntimeError("; ".join(problems))
        self.server = FrontendServer(self.config, self.log, on_failure)
        self.server.start(timeout=self.config.nats.connect_timeout + 20.0)

    def handle(self, message: Any) -> Any:
        match message:
            case FrontendFailed(detail=detail):
                msg = f"the frontend's HTTP server failed: {detail}"
                raise RuntimeError(msg)
            case GetFrontendPort():
                return self.server.port if self.server is not None else None
            case _:
                return super().handle(message)

    def on_shutdown(self, request: StopRequest) -> None:
        if self.server is not None:
            self.log.info("frontend stopping", reason=request.reason)
            self.server.stop(self.config.shutdown.drain_timeout + _STOP_MARGIN)

    def on_exit(self, reason: ExitReason) -> None:
        if self.server is not None:
            self.server.stop(_STOP_MARGIN)
