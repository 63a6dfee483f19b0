"""Config -> plan: everything a node's tree needs, computed once, with no I/O.

`plan_node(config)` is a pure function: it derives the instance's identity, every address
(NATS subjects, ZMQ endpoints, ports, tree paths, files) and one typed settings struct per
actor. Each actor takes `(context, settings)`, so what an actor is told, and where that
comes from, is read here and nowhere else. `prepare(plan)` then does the plan's I/O once,
before the tree starts: the run directory, the embedded server's store and secrets file.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import msgspec

from actors.engine_host.spec import HostSpec, local_ranks
from messages.chaos import Fault
from messages.discovery import Subjects
from supervisor.config import (
    AdminSection,
    ConfigError,
    DisaggregationSection,
    DiscoverySection,
    HandlersSection,
    HealthSection,
    NatsAuthSection,
    NodeConfig,
    SupervisionSection,
    cache_dir,
    read_secret,
)

__all__ = [
    "AdminSettings",
    "ChaosSettings",
    "EngineSettings",
    "FabricSettings",
    "HandlerSettings",
    "MetricsSettings",
    "NodePlan",
    "Paths",
    "RegistrarSettings",
    "RelaySettings",
    "SystemSettings",
    "plan_node",
    "prepare",
]

ROOT_NAME = "node"


class _Settings(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Paths(_Settings, frozen=True):
    """Where each actor sits in the tree: actors find each other by these paths."""

    root: str = ROOT_NAME
    core: str = f"{ROOT_NAME}/core"
    engine: str = f"{ROOT_NAME}/core/engine"  # the engine subtree's supervisor
    engine_actor: str = f"{ROOT_NAME}/core/engine/engine_actor"
    fabric: str = f"{ROOT_NAME}/core/fabric"
    registrar: str = f"{ROOT_NAME}/core/registrar"
    chaos: str = ""  # empty: fault injection is off


class FabricSettings(_Settings, frozen=True):
    """FabricActor: the node's one NATS connection."""

    servers: list[str]
    client_name: str
    connect_timeout: float = 10.0
    pending_size: int = 8 * 1024 * 1024  # bytes held while disconnected
    auth: NatsAuthSection = msgspec.field(default_factory=NatsAuthSection)
    cut_proxy: bool = False  # through a proxy that fault injection can cut
    resume_delay: float = 1.0
    randomize: bool = True  # shuffle `servers` (NATS clients' default)
    # JetStream copies wanted, by config key (those above 1), checked against the cluster
    replicas: dict[str, int] = msgspec.field(default_factory=dict)


class EngineSettings(_Settings, frozen=True):
    """EngineActor: its channel to the engine host, health and admission."""

    command_endpoint: str
    output_socket: str
    fabric: str = ""  # whose NATS link's loop reads the host's output ("": a loop of its own)
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    max_inflight: int = 256
    max_streams_per_client: int = 0
    mode: str = "aggregated"
    warmup_timeout: float = 120.0


class MetricsSettings(_Settings, frozen=True):
    """MetricsActor: scheduler metrics to NATS and Prometheus."""

    fabric: str
    engine_actor: str
    instance_id: str
    subject: str
    interval: float = 1.0
    idle_interval: float = 5.0


class RelaySettings(_Settings, frozen=True):
    """KvRelayActor: one DP rank's KV events to NATS."""

    fabric: str
    engine_actor: str
    instance_id: str
    dp_rank: int
    subject: str
    durable_max_age: float | None = None  # seconds kept in JetStream; None: not durable
    durable_replicas: int = 1  # copies of that stream in a NATS cluster


class HandlerSettings(_Settings, frozen=True):
    """HandlerActor: the request plane."""

    fabric: str
    engine_actor: str
    subjects: Subjects
    limits: HandlersSection = msgspec.field(default_factory=HandlersSection)
    drain_timeout: float = 10.0
    mode: str = "aggregated"
    disaggregation: DisaggregationSection = msgspec.field(default_factory=DisaggregationSection)


class RegistrarSettings(_Settings, frozen=True):
    """RegistrarActor: the instance record and its lease."""

    fabric: str
    engine: str  # the engine subtree (its events withdraw and restore the record)
    engine_actor: str
    engine_last_child: str  # the engine subtree is up when this child is ready
    root: str
    instance_id: str
    namespace: str
    component: str
    endpoint: str
    subjects: Subjects
    mode: str = "aggregated"
    discovery: DiscoverySection = msgspec.field(default_factory=DiscoverySection)
    disaggregation: DisaggregationSection = msgspec.field(default_factory=DisaggregationSection)


class AdminSettings(_Settings, frozen=True):
    """AdminActor (the admin subject) and the system server's `/engine/` routes."""

    admin: AdminSection
    subject: str
    paths: Paths


class SystemSettings(_Settings, frozen=True):
    """SystemHttpActor: /health, /ready, /metrics, /tree (and the admin routes)."""

    host: str
    port: int
    paths: Paths
    leader: bool  # a follower's /ready means "engine healthy" (no registrar)
    sglang_metrics_dir: str = ""  # SGLang's multiprocess Prometheus directory
    admin: AdminSection = msgspec.field(default_factory=AdminSection)


class ChaosSettings(_Settings, frozen=True):
    """ChaosActor: the fault schedule."""

    root: str
    faults: list[Fault]
    seed: int = 0


class NodePlan(_Settings, frozen=True):
    """Identity, addresses and every actor's settings, derived from the config."""

    instance_id: str
    subjects: Subjects
    nats_servers: list[str]
    run_dir: str
    nats_data_dir: str
    nats_config_file: str  # the embedded server's config (max_payload, credentials)
    host_spec: HostSpec
    paths: Paths
    supervision: SupervisionSection
    leader: bool
    local_dp_ranks: list[int]
    fabric: FabricSettings
    engine: EngineSettings
    metrics: MetricsSettings
    relays: list[RelaySettings]
    handler: HandlerSettings
    registrar: RegistrarSettings
    system: SystemSettings
    admin: AdminSettings | None
    chaos: ChaosSettings | None


def subjects_for(config: NodeConfig, instance_id: str) -> Subjects:
    """The node's NATS subjects (prefill workers answer on their own component, as
    Dynamo's `prefill.generate`)."""
    node = config.node
    component = (
        "prefill" if node.mode == "prefill" and node.component == "backend" else node.component
    )
    base = f"{node.namespace}.{component}"
    return Subjects(
        generate=f"{base}.{node.endpoint}",
        instance=f"{base}.{node.endpoint}.{instance_id}",
        cancel=f"{base}.cancel",
        kv_events=f"{base}.kv_events",
        load_metrics=f"{base}.load_metrics",
        tree=f"{base}.tree.{instance_id}",
        admin=f"{base}.admin.{instance_id}" if config.admin.enabled else "",
        resume=f"{base}.resume",
    )


def default_run_dir(config: NodeConfig, instance_id: str) -> str:
    """A run directory of its own for this process (the nodes of one multi-node engine
    share the instance id, so the rank and pid keep theirs apart)."""
    base = os.environ.get("TMPDIR") or "/tmp"
    return f"{base}/sgl-node-{instance_id}-{config.node.node_rank}-{os.getpid()}"


_UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) on Linux, less the final NUL
_RUN_DIR_NAME = re.compile(r"sgl-node-[0-9a-f]+-\d+-(\d+)")


def sweep_stale_run_dirs(base: str) -> list[str]:
    """Remove the run directories in `base` of node processes that no longer exist: a node
    removes its own when it exits, but not after kill -9 or a power loss, and months of
    restarts must not fill the temporary directory. A directory is stale when it is this
    user's and the pid in its name is not a live process. Returns the directories removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _RUN_DIR_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _host_spec(config: NodeConfig, instance_id: str, run_dir: str) -> HostSpec:
    engine = config.engine
    return HostSpec(
        backend=engine.backend,
        command_endpoint=f"ipc://{run_dir}/engine-cmd",
        output_socket=f"{run_dir}/engine-out",
        dp_size=engine.dp_size,
        page_size=engine.page_size,
        kv_events_port=engine.kv_events_port,
        replay_port=engine.kv_events_port + engine.dp_size if engine.kv_replay else None,
        metrics_endpoints=[f"ipc://{run_dir}/metrics-{rank}" for rank in range(engine.dp_size)],
        model_path=engine.model_path,
        served_model_name=engine.served_model_name,
        model_cache_dir=engine.model_cache_dir,
        prometheus_dir=f"{run_dir}/prometheus",
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
        bootstrap_host=config.disaggregation.bootstrap_host,
        bootstrap_port=config.disaggregation.bootstrap_port,
    )


def _embedded_auth(config: NodeConfig) -> bool:
    """Whether the embedded server is configured with credentials (user or token)."""
    auth = config.nats.auth
    has_password = bool(auth.password_env or auth.password_file)
    has_token = bool(auth.token_env or auth.token_file)
    return config.nats.embedded and ((bool(auth.user) and has_password) or has_token)


def plan_node(
    config: NodeConfig, *, instance_id: str | None = None, run_dir: str | None = None
) -> NodePlan:
    """The node's plan (see the module docstring). `instance_id` defaults to the config's,
    or a fresh random one; `run_dir` to `default_run_dir`."""
    instance_id = instance_id or config.node.instance_id or secrets.token_hex(8)
    run_dir = run_dir or default_run_dir(config, instance_id)
    nats, node = config.nats, config.node
    paths = Paths(chaos=f"{ROOT_NAME}/chaos" if config.chaos.enabled else "")
    subjects = subjects_for(config, instance_id)
    host_spec = _host_spec(config, instance_id, run_dir)
    ranks = list(local_ranks(config.engine.dp_size, node.nnodes, node.node_rank))
    servers = [f"nats://{nats.host}:{nats.port}"] if nats.embedded else list(nats.url)
    leader = node.node_rank == 0
    return NodePlan(
        instance_id=instance_id,
        subjects=subjects,
        nats_servers=servers,
        run_dir=run_dir,
        nats_data_dir=nats.data_dir or str(cache_dir() / "nats" / str(nats.port)),
        nats_config_file=f"{run_dir}/nats-server.conf",
        host_spec=host_spec,
        paths=paths,
        supervision=config.supervision,
        leader=leader,
        local_dp_ranks=ranks,
        fabric=_fabric(config, servers, instance_id),
        engine=_engine_settings(config, host_spec, paths.fabric),
        metrics=MetricsSettings(
            fabric=paths.fabric,
            engine_actor=paths.engine_actor,
            instance_id=instance_id,
            subject=subjects.load_metrics,
            interval=config.metrics.interval,
            idle_interval=config.metrics.idle_interval,
        ),
        relays=_relays(config, paths, instance_id, subjects, ranks),
        handler=HandlerSettings(
            fabric=paths.fabric,
            engine_actor=paths.engine_actor,
            subjects=subjects,
            limits=config.handlers,
            drain_timeout=config.shutdown.drain_timeout,
            mode=node.mode,
            disaggregation=config.disaggregation,
        ),
        registrar=_registrar(config, paths, instance_id, subjects, ranks),
        system=_system(config, paths, host_spec, leader),
        admin=(
            AdminSettings(admin=config.admin, subject=subjects.admin, paths=paths)
            if config.admin.enabled
            else None
        ),
        chaos=(
            ChaosSettings(root=paths.root, faults=config.chaos.faults, seed=config.chaos.seed)
            if config.chaos.enabled
            else None
        ),
    )


def _fabric(config: NodeConfig, servers: list[str], instance_id: str) -> FabricSettings:
    nats = config.nats
    return FabricSettings(
        servers=servers,
        client_name=f"sgl-node-{instance_id}",
        connect_timeout=nats.connect_timeout,
        pending_size=nats.reconnect_buffer_bytes,
        auth=nats.auth,
        cut_proxy=config.chaos.enabled,
        resume_delay=nats.resume_delay,
        randomize=nats.randomize,
        replicas=_replicas_wanted(config),
    )


def _replicas_wanted(config: NodeConfig) -> dict[str, int]:
    wanted = {"discovery.replicas": config.discovery.replicas}
    if config.events.durable:
        wanted["events.replicas"] = config.events.replicas
    return {key: count for key, count in wanted.items() if count > 1}


def _engine_settings(config: NodeConfig, host_spec: HostSpec, fabric: str) -> EngineSettings:
    return EngineSettings(
        command_endpoint=host_spec.command_endpoint,
        output_socket=host_spec.output_socket,
        fabric=fabric,
        health=config.engine.health,
        max_inflight=config.handlers.max_inflight,
        max_streams_per_client=config.handlers.max_streams_per_client,
        mode=config.node.mode,
        warmup_timeout=config.disaggregation.warmup_timeout,
    )


def _relays(
    config: NodeConfig, paths: Paths, instance_id: str, subjects: Subjects, ranks: list[int]
) -> list[RelaySettings]:
    durable = config.events.stream_max_age if config.events.durable else None
    return [
        RelaySettings(
            fabric=paths.fabric,
            engine_actor=paths.engine_actor,
            instance_id=instance_id,
            dp_rank=rank,
            subject=subjects.kv_events,
            durable_max_age=durable,
            durable_replicas=config.events.replicas,
        )
        for rank in ranks
    ]


def _registrar(
    config: NodeConfig, paths: Paths, instance_id: str, subjects: Subjects, ranks: list[int]
) -> RegistrarSettings:
    # The engine subtree is up again once its last child is ready (its relays come last).
    last = f"kv_relay_{ranks[-1]}" if ranks else "metrics"
    return RegistrarSettings(
        fabric=paths.fabric,
        engine=paths.engine,
        engine_actor=paths.engine_actor,
        engine_last_child=last,
        root=paths.root,
        instance_id=instance_id,
        namespace=config.node.namespace,
        component=subjects.generate.split(".")[1],
        endpoint=config.node.endpoint,
        subjects=subjects,
        mode=config.node.mode,
        discovery=config.discovery,
        disaggregation=config.disaggregation,
    )


def _system(config: NodeConfig, paths: Paths, host_spec: HostSpec, leader: bool) -> SystemSettings:
    sglang = config.engine.backend == "sglang"
    return SystemSettings(
        host=config.system.host,
        port=config.system.port,
        paths=paths,
        leader=leader,
        sglang_metrics_dir=host_spec.prometheus_dir if sglang else "",
        admin=config.admin,
    )


def prepare(config: NodeConfig, plan: NodePlan) -> list[str]:
    """The plan's I/O, once before the tree starts: the run directory (engine sockets,
    SGLang's metrics directory), the embedded server's store and its secrets file. The
    run directory is removed when the process exits; those of processes that did not get
    to (kill -9) are swept here; returns those."""
    longest = max(
        [
            plan.host_spec.command_endpoint.removeprefix("ipc://"),
            plan.host_spec.output_socket,
            *(e.removeprefix("ipc://") for e in plan.host_spec.metrics_endpoints),
        ],
        key=len,
    )
    if len(longest.encode()) > _UNIX_PATH_MAX:
        msg = (
            f"the engine's socket path {longest!r} is {len(longest.encode())} bytes, more than "
            f"a unix socket allows ({_UNIX_PATH_MAX}): set TMPDIR to a shorter directory"
        )
        raise ConfigError("", msg)
    swept = sweep_stale_run_dirs(str(Path(plan.run_dir).parent))
    Path(plan.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    Path(plan.host_spec.prometheus_dir).mkdir(exist_ok=True)
    if config.nats.embedded:
        Path(plan.nats_data_dir).mkdir(parents=True, exist_ok=True)
    if config.nats.embedded:
        _write_embedded_config(config, plan.nats_config_file)
    atexit.register(shutil.rmtree, plan.run_dir, ignore_errors=True)
    return swept


def _write_embedded_config(config: NodeConfig, path: str) -> None:
    """The embedded server's config file (0600): its max_payload (it has no flag), and the
    node's credentials if it has any (never on a command line)."""
    auth = config.nats.auth
    lines = [f"max_payload: {config.nats.max_payload}"]
    if _embedded_auth(config):
        password = read_secret(auth.password_env, auth.password_file, "nats.auth password")
        token = read_secret(auth.token_env, auth.token_file, "nats.auth token")
        if auth.user and password is not None:
            user, secret = json.dumps(auth.user), json.dumps(password.reveal())
            lines.append(f"authorization {{ user: {user}, password: {secret} }}")
        elif token is not None:
            lines.append(f"authorization {{ token: {json.dumps(token.reveal())} }}")
        else:  # never start the embedded server without the credentials it was given
            raise ConfigError("nats.auth", "the embedded server's credentials could not be read")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
