"""`FabricActor`: owns the node's NATS connection (one per node, shared by the actors).

It connects during start-up (ready = connected), hands the `NatsLink` to actors that
ask, and crashes if the connection is closed for good, so its dependants restart with
a fresh one (they come after it in a rest_for_one supervisor).
"""

from __future__ import annotations

from typing import Any

from actors.nats_link import NatsLink
from messages.control import ExitReason
from messages.node import GetLink, LinkChanged
from supervisor import ChildContext, SupervisedActor

__all__ = ["FabricActor"]


class FabricActor(SupervisedActor):
    """The NATS connection as a supervised child."""

    def __init__(
        self,
        context: ChildContext,
        servers: list[str],
        client_name: str,
        connect_timeout: float,
        pending_size: int,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context)
        self.link = NatsLink(servers, client_name, connect_timeout, pending_size, connect_options)

    def on_start_up(self) -> None:
        self.link.connect()
        self.link.add_listener(lambda event: self.actor_ref.tell(LinkChanged(event)))
        self.log.info("connected to nats", servers=self.link.servers)

    def handle(self, message: Any) -> Any:
        match message:
            case GetLink():
                return self.link
            case LinkChanged(event="closed"):
                msg = "the NATS connection was closed and will not reconnect"
                raise ConnectionError(msg)
            case LinkChanged():
                return None
        return super().handle(message)

    def on_exit(self, reason: ExitReason) -> None:
        self.link.close()
