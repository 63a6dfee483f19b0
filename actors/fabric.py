"""`FabricActor`: owns the node's NATS connection (one per node, shared by the actors).

It connects during start-up (ready = connected), hands the `NatsLink` to actors that
ask, and crashes if the connection is closed for good, so its dependants restart with
a fresh one (they come after it in a rest_for_one supervisor). Credentials come from
`[nats.auth]` and are read at each start. With fault injection on, the connection goes
through a proxy that `cut_nats` can sever.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from actors.nats.auth import connect_options
from actors.nats.link import NatsLink
from actors.nats.proxy import NatsCutProxy
from actors.nats.replicas import check_replicas
from actors.telemetry import node_metrics
from messages.chaos import ChaosCutNats
from messages.node import GetLink, LinkChanged
from supervisor.core import ChildContext, ExitReason, SupervisedActor
from supervisor.plan import FabricSettings

__all__ = ["FabricActor"]


class FabricActor(SupervisedActor):
    """The NATS connection as a supervised child."""

    def __init__(self, context: ChildContext, settings: FabricSettings) -> None:
        super().__init__(context)
        self.settings = settings
        self.resume_delay = settings.resume_delay
        self.servers = settings.servers
        self.client_name = settings.client_name
        self.connect_timeout = settings.connect_timeout
        self.pending_size = settings.pending_size
        self.auth = settings.auth
        self.proxy: NatsCutProxy | None = None
        if settings.cut_proxy:
            url = urlparse(self.servers[0])
            self.proxy = NatsCutProxy(url.hostname or "127.0.0.1", url.port or 4222)
        self.link: NatsLink | None = None

    def on_start_up(self) -> None:
        servers = self.servers
        if self.proxy is not None:
            servers = [f"nats://127.0.0.1:{self.proxy.start()}"]
        self.link = NatsLink(
            servers,
            self.client_name,
            self.connect_timeout,
            self.pending_size,
            {**connect_options(self.auth), "dont_randomize": not self.settings.randomize},
            self.resume_delay,
        )
        self.link.connect()
        link = self.link
        assert link.nc is not None
        # A node whose JetStream copies cannot be placed fails to start (a clear error);
        # a cluster with a server down just now only gets a warning.
        warning = check_replicas(self.settings.replicas, link.nc._server_info)
        if warning:
            self.log.warning("jetstream replicas above the servers up", detail=warning)
        self.link.add_listener(lambda event: self.actor_ref.tell(LinkChanged(event)))
        node_metrics.NATS_LINK.link = link
        self.log.info(
            "connected to nats",
            servers=self.servers,
            via_chaos_proxy=self.proxy is not None,
            max_payload=link.nc.max_payload if link.nc is not None else None,
        )

    def handle(self, message: Any) -> Any:
        match message:
            case GetLink():
                return self.link
            case ChaosCutNats(seconds=seconds):
                if self.proxy is None:
                    return False, "cut_nats needs [chaos] enabled (then NATS goes through a proxy)"
                self.proxy.cut(seconds)
                if self.link is not None:  # the direct streams to frontends go with it
                    self.link.loop.call_soon_threadsafe(self.link.direct.cut, seconds)
                return True, f"NATS connection cut for {seconds:g}s"
            case LinkChanged(event="closed"):
                msg = "the NATS connection was closed and will not reconnect"
                raise ConnectionError(msg)
            case LinkChanged():
                return None
        return super().handle(message)

    def on_exit(self, reason: ExitReason) -> None:
        if self.link is not None:
            node_metrics.NATS_LINK.link = None  # reads as disconnected until the next one
            self.link.close()
        if self.proxy is not None:
            self.proxy.close()
