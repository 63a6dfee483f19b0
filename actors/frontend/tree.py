"""Where the frontend sits in a supervision tree.

- `frontend_child(config)`: the `frontend` child, appended to a node's tree when
  `frontend.enabled` (after `core`: the node's own engine registers before the frontend
  serves, and the frontend stops first).
- `build_frontend_tree(config)`: a frontend-only node (`node.tree = "frontend"`):

      frontend                one_for_one
      ├── nats_server         process child, only when nats.embedded
      └── frontend            FrontendActor

  `one_for_one`, as in the node: the frontend reconnects to a restarted NATS server by
  itself, so a NATS restart does not restart it.
"""

from __future__ import annotations

from actors.frontend.actor import FrontendActor
from supervisor.config import NodeConfig
from supervisor.core import ActorStart, Backoff, ChildSpec, SupervisorFlags

__all__ = ["ROOT_NAME", "build_frontend_tree", "frontend_child"]

ROOT_NAME = "frontend"


def frontend_child(config: NodeConfig) -> ChildSpec:
    """The FrontendActor's child spec (stop: drain in-flight streams, then a margin)."""
    return ChildSpec(
        "frontend",
        ActorStart(FrontendActor, (config,)),
        shutdown=config.shutdown.drain_timeout + 10.0,
        start_timeout=config.nats.connect_timeout + 30.0,
    )


def build_frontend_tree(config: NodeConfig) -> tuple[SupervisorFlags, list[ChildSpec]]:
    """The flags and children of a frontend-only node (see the module docstring)."""
    sup = config.supervision
    backoff = Backoff(
        initial=sup.backoff_initial,
        max=sup.backoff_max,
        multiplier=sup.backoff_multiplier,
        jitter=sup.backoff_jitter,
        reset_after=sup.backoff_reset_after,
    )
    flags = SupervisorFlags(
        strategy="one_for_one", intensity=sup.intensity, period=sup.period, backoff=backoff
    )
    children = []
    if config.nats.embedded:
        # The node's own embedded-server spec (store, auth file), so both behave the same.
        from supervisor.node import nats_server_child, plan_node

        children.append(nats_server_child(config, plan_node(config)))
    children.append(frontend_child(config))
    return flags, children
