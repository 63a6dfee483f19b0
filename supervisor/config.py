"""The node's configuration: typed sections, every default, and validation.

`load(path)` reads TOML into `NodeConfig`. Unknown keys, wrong types and values out of
range are rejected before anything starts, with the key path at fault::

    engine.dp_size: expected int, got str "two"

Every default of the node lives in this module (the fields below), so one file answers
"what happens if I leave this out". `configs/cluster.toml` repeats them with comments.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from messages.chaos import Fault

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "NodeConfig", "cache_dir", "load", "loads", "read_secret"]

Pos = Annotated[int, msgspec.Meta(ge=1)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: pick a free port
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]+$")]
# JetStream replica counts: odd (a majority survives the loss of a minority), at most 5
Replicas = Annotated[int, msgspec.Meta(ge=1, le=5)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class NodeSection(_Section, frozen=True):
    """Who this node is in the fabric."""

    namespace: Name = "dynamo"
    component: Name = "backend"
    endpoint: Name = "generate"
    # Empty: a fresh random id per start (like a lease id).
    instance_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]*$")] = ""
    mode: Literal["aggregated", "prefill", "decode", "embedding"] = "aggregated"
    # "demo" runs a demonstration tree (supervision only, no engine, no NATS).
    tree: Literal["node", "demo", "frontend"] = "node"  # frontend: the OpenAI frontend alone
    # One engine over several nodes: rank 0 (the leader) serves, registers and reads the
    # scheduler metrics; the others (followers) run their DP ranks and relay their KV events.
    nnodes: Pos = 1
    node_rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    dist_init_addr: str = ""  # host:port where the leader's engine meets its followers
    join_timeout: Seconds = 300.0  # how long the leader waits for every follower at start


class SupervisionSection(_Section, frozen=True):
    """Restart policy of the node's supervisors (see the README's supervision table)."""

    intensity: Annotated[int, msgspec.Meta(ge=0)] = 5
    period: Seconds = 60.0
    backoff_initial: NonNeg = 0.5
    backoff_max: NonNeg = 10.0
    backoff_multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    backoff_jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    backoff_reset_after: NonNeg = 60.0
    # Model conversion (first run) plus SGLang's start-up fit in this.
    engine_start_timeout: Seconds = 900.0


class NatsAuthSection(_Section, frozen=True):
    """How the node authenticates to NATS. Secrets come from an environment variable
    (`*_env`) or a file (`*_file`), never from this file, and are never logged. The
    embedded server, when used, is configured with the same user/password or token."""

    user: str = ""
    password_env: str = ""
    password_file: str = ""
    token_env: str = ""
    token_file: str = ""
    nkey_seed_file: str = ""  # an NKEY seed (the server knows the public key)
    tls_ca: str = ""  # CA bundle to verify the server
    tls_cert: str = ""  # client certificate (mutual TLS)
    tls_key: str = ""


class NatsSection(_Section, frozen=True):
    """The fabric connection, and the embedded server when `embedded` is true."""

    embedded: bool = True
    # Several URLs: the servers of one cluster; the connection moves to another on a loss.
    url: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    # Shuffle `url` per connection (NATS clients' default), so that nodes, frontends and
    # clients spread over the servers; false: the first reachable in the order given.
    randomize: bool = True
    host: str = "127.0.0.1"  # embedded server: listen address
    port: Port = 4222  # embedded server: client port
    data_dir: str = ""  # embedded JetStream store; empty: under the cache dir
    # The embedded server's largest message (NATS's default is 1 MiB): above
    # handlers.max_request_bytes, so that an oversized request reaches the node and gets its
    # error instead of failing in the client's NATS library. 64 MiB is NATS's own ceiling.
    max_payload: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 8 * 1024 * 1024
    connect_timeout: Seconds = 10.0
    # Bytes buffered while disconnected before publishes are dropped (and counted).
    reconnect_buffer_bytes: Annotated[int, msgspec.Meta(ge=0)] = 8 * 1024 * 1024
    # After a reconnect, wait this long before sending what was held, so that clients who
    # lost the server too have re-subscribed to their inboxes.
    resume_delay: NonNeg = 1.0
    auth: NatsAuthSection = msgspec.field(default_factory=NatsAuthSection)


class SimSection(_Section, frozen=True):
    """The simulated engine (fault injection, scale, benchmarks)."""

    num_blocks: Pos = 1024
    max_batch_size: Pos = 64
    token_budget: Pos = 4096  # uncached prefill tokens one scheduler step may admit
    prefill_time_per_token: NonNeg = 0.0  # seconds
    decode_time_per_step: NonNeg = 0.0  # seconds
    vocab_size: Annotated[int, msgspec.Meta(ge=259)] = 32000  # the sim's tokenizer uses ids 3..258
    eos_token_id: Annotated[int, msgspec.Meta(ge=0)] = 2
    context_length: Pos = 8192


class HealthSection(_Section, frozen=True):
    """The engine canary and stuck-engine detection."""

    canary_after_idle: Seconds = 10.0  # send a 1-token canary when idle this long
    canary_timeout: Seconds = 30.0
    failures_before_unhealthy: Pos = 3
    stall_timeout: Seconds = 60.0  # in-flight requests without progress this long: stuck


class EngineSection(_Section, frozen=True):
    """The engine: which backend, which model, how many DP ranks, and its ZMQ ports."""

    backend: Literal["sim", "sglang"] = "sglang"
    model_path: str = "builtin:smollm2-135m-instruct"
    served_model_name: str = ""  # empty: derived from model_path
    model_cache_dir: str = ""  # built-in models; empty: under the cache dir
    dp_size: Pos = 1
    page_size: Pos = 16
    kv_events_port: Port = 5557  # DP rank r publishes on this port + r (as SGLang)
    # The publishers keep their last batches for replay on port kv_events_port + dp_size + r,
    # so a relay that sees a gap fills it instead of resyncing.
    kv_replay: bool = True
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    sim: SimSection = msgspec.field(default_factory=SimSection)
    # Passed through to SGLang's ServerArgs (validated against it when backend = sglang).
    sglang: dict[str, Any] = msgspec.field(default_factory=dict)


class DisaggregationSection(_Section, frozen=True):
    """Disaggregated prefill/decode (`node.mode = "prefill"` or `"decode"`)."""

    bootstrap_host: str = "127.0.0.1"  # where decode nodes reach this prefill node's KV
    bootstrap_port: Port = 8998  # SGLang's default bootstrap port
    warmup_timeout: Seconds = 120.0  # prefill: the warm-up request must finish within this
    # The sim's transfer model: a decode request waits prompt_tokens × bytes / bandwidth.
    sim_bytes_per_token: Pos = 65536
    sim_bandwidth: Annotated[float, msgspec.Meta(gt=0)] = 10e9  # bytes per second


class HandlersSection(_Section, frozen=True):
    """The request plane."""

    count: Pos = 2
    max_inflight: Pos = 256  # beyond this the node answers `overloaded` at once
    default_deadline: Seconds = 300.0  # seconds, when a request gives none
    max_request_bytes: Pos = 1024 * 1024
    max_prompt_tokens: Pos = 32768
    max_tokens_limit: Pos = 8192
    max_streams_per_client: Annotated[int, msgspec.Meta(ge=0)] = 0  # per client_id; 0: no limit
    # A stream's chunks stay available to `resume` requests while it runs and this long
    # after it ended, within `resume_buffer_bytes` per handler (oldest ended ones go first).
    resume_window: Seconds = 30.0
    resume_buffer_bytes: Pos = 16 * 1024 * 1024
    # Seams one stream may go through (its engine restarted, it moved to another node)
    # before a lost engine ends it with an error instead of continuing it.
    migration_limit: Annotated[int, msgspec.Meta(ge=0)] = 3
    # On a stop, streams still running at the drain timeout are handed over to another
    # instance (a continuation), when one takes them; else they end with `shutdown`.
    handover_on_drain: bool = True


class EventsSection(_Section, frozen=True):
    """The event plane."""

    durable: bool = False  # also store KV events in a JetStream stream for replay
    stream_max_age: Seconds = 3600.0
    replicas: Replicas = 1  # copies of that stream in a NATS cluster (1, 3 or 5)


class MetricsSection(_Section, frozen=True):
    """Load metrics publishing."""

    interval: Seconds = 1.0
    # A rank with nothing running or waiting whose figures have not changed is published
    # this often instead (an idle node's same numbers every second were most of the
    # fabric's idle traffic); any change goes out at the next interval.
    idle_interval: Seconds = 5.0


class DiscoverySection(_Section, frozen=True):
    """Registration in the instances bucket."""

    bucket: Name = "sgl_node_instances"
    lease_ttl: Seconds = 10.0  # the record expires this long after the last heartbeat
    heartbeat: Seconds = 2.0
    # Copies of the bucket in a NATS cluster (1, 3 or 5): 3 survives the loss of a server.
    replicas: Replicas = 1


class SystemSection(_Section, frozen=True):
    """The system HTTP server (/health, /ready, /metrics, /tree)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8081


class ShutdownSection(_Section, frozen=True):
    """Ordered stop."""

    drain_timeout: NonNeg = 10.0  # in-flight requests may finish within this


class AdminSection(_Section, frozen=True):
    """The admin subject `{namespace}.{component}.admin.{instance_id}` (off by default).
    Every request must carry the admin token, read from `token_env` or `token_file`."""

    enabled: bool = False
    token_env: str = "SGL_NODE_ADMIN_TOKEN"
    token_file: str = ""


class ChaosSection(_Section, frozen=True):
    """Fault injection (off by default). Faults run from `faults` (a schedule) and, with
    `[admin]` enabled, from the admin subject."""

    enabled: bool = False
    seed: int = 0  # the schedule's jitter is drawn from this seed: a run can be replayed
    faults: list[Fault] = msgspec.field(default_factory=list)


class FrontendSection(_Section, frozen=True):
    """The OpenAI-compatible HTTP frontend with KV-aware routing (`enabled` adds it to a
    node's tree; `node.tree = "frontend"` runs it alone)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8000
    routing: Literal["kv", "round_robin", "random"] = "kv"
    kv_block_weight: NonNeg = 1.0  # cost of one KV block that must be prefilled
    load_weight: NonNeg = 1.0  # cost of one request already active or waiting on a rank
    request_timeout: Seconds = 300.0
    # Seams one stream may go through (its instance lost or stopping after the first
    # chunk: the stream continues on another) before it ends with the error instead.
    migration_limit: Annotated[int, msgspec.Meta(ge=0)] = 3
    # SGLang's parser names, for every model (a string) or per model name (a table); empty:
    # the model card's (what the node set or detected), and for tool calls Hermes when the
    # model's chat template renders no tools (see actors/frontend/parsers.py)
    tool_call_parser: str | dict[str, str] = ""
    reasoning_parser: str | dict[str, str] = ""  # "none": no reasoning_content, ever
    # /v1/responses: responses kept for previous_response_id (the oldest go first), and
    # for how long after they were made
    responses_store_size: Annotated[int, msgspec.Meta(ge=0)] = 1000
    responses_ttl: Seconds = 3600.0
    # Nodes send a request's chunks straight to the frontend over TCP, not through the
    # NATS server (see actors/streams/direct.py), to a port picked at start on
    # `direct_host`: an address the nodes can reach (set it when they run on other
    # machines; a node that cannot connect sends through NATS).
    direct_streams: bool = True
    direct_host: str = "127.0.0.1"


class LoggingSection(_Section, frozen=True):
    """Structured logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


class NodeConfig(_Section, frozen=True):
    """The whole configuration of one node."""

    node: NodeSection = msgspec.field(default_factory=NodeSection)
    supervision: SupervisionSection = msgspec.field(default_factory=SupervisionSection)
    nats: NatsSection = msgspec.field(default_factory=NatsSection)
    engine: EngineSection = msgspec.field(default_factory=EngineSection)
    handlers: HandlersSection = msgspec.field(default_factory=HandlersSection)
    disaggregation: DisaggregationSection = msgspec.field(default_factory=DisaggregationSection)
    events: EventsSection = msgspec.field(default_factory=EventsSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    discovery: DiscoverySection = msgspec.field(default_factory=DiscoverySection)
    system: SystemSection = msgspec.field(default_factory=SystemSection)
    shutdown: ShutdownSection = msgspec.field(default_factory=ShutdownSection)
    admin: AdminSection = msgspec.field(default_factory=AdminSection)
    chaos: ChaosSection = msgspec.field(default_factory=ChaosSection)
    frontend: FrontendSection = msgspec.field(default_factory=FrontendSection)
    logging: LoggingSection = msgspec.field(default_factory=LoggingSection)


class ConfigError(ValueError):
    """The configuration is invalid; `key` is the dotted path at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_EXPECTED = re.compile(
    r"^Expected `(?P<want>[^`]+)`(?P<rest>.*?)(?:, got `(?P<got>[^`]+)`)?$", re.S
)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _dotted(path: str) -> str:
    # msgspec paths look like `.engine.dp_size` or `.nats.url[0]`
    return path.lstrip(".")


def _lookup(raw: Any, key: str) -> Any:
    value = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            value = value[int(part[1:-1])]
        else:
            value = value[part]
    return value


def _describe(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


def _translate(exc: msgspec.ValidationError, raw: dict[str, Any]) -> ConfigError:
    match = _AT.match(str(exc))
    assert match is not None
    message, path = match["msg"], _dotted(match["path"] or "")
    unknown = _UNKNOWN.match(message)
    if unknown:
        key = f"{path}.{unknown['field']}" if path else unknown["field"]
        return ConfigError(key, "unknown key")
    expected = _EXPECTED.match(message)
    if expected:
        want = expected["want"].replace("object", "table").replace("array", "list")
        rest = expected["rest"]
        try:
            value = _lookup(raw, path)
        except (KeyError, IndexError, TypeError):
            return ConfigError(path, message)
        got = type(value).__name__
        if isinstance(value, dict):
            got = "table"
        if rest.strip():
            return ConfigError(path, f"expected {want}{rest}, got {_describe(value)}")
        return ConfigError(path, f"expected {want}, got {got} {_describe(value)}")
    if message.startswith("Invalid enum value"):
        choices = _literal_choices(path)
        if choices:
            value = _lookup(raw, path)
            return ConfigError(
                path, f"expected one of {', '.join(choices)}, got {_describe(value)}"
            )
    return ConfigError(path, message[0].lower() + message[1:])


def _literal_choices(path: str) -> list[str]:
    """The allowed values of the Literal field at `path` (dotted), if it is one."""
    owner: Any = NodeConfig
    annotation: Any = None
    for part in path.split("."):
        name = part.split("[", 1)[0]
        if not (isinstance(owner, type) and issubclass(owner, msgspec.Struct)):
            return []
        fields = {f.name: f for f in msgspec.structs.fields(owner)}
        if name not in fields:
            return []
        annotation = fields[name].type
        if "[" in part and get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        owner = annotation
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return []


def _check(config: NodeConfig) -> None:
    """Rules that span fields or need more than a type."""
    if not config.nats.embedded and not config.nats.url:
        raise ConfigError("nats.url", "needs at least one server when nats.embedded is false")
    for i, url in enumerate(config.nats.url):
        if not re.match(r"^(nats|tls|ws|wss)://[^\s]+$", url):
            raise ConfigError(f"nats.url[{i}]", f'expected a nats:// URL, got "{url}"')
    limit, payload = config.handlers.max_request_bytes, config.nats.max_payload
    if config.nats.embedded and limit >= payload:
        # name the one of the two that was changed from its default
        if limit == HandlersSection().max_request_bytes:
            raise ConfigError(
                "nats.max_payload", f"must be above handlers.max_request_bytes ({limit})"
            )
        raise ConfigError(
            "handlers.max_request_bytes",
            f"must be below nats.max_payload ({payload}): a larger request would fail in the "
            "client's NATS library and never reach the node's own error",
        )
    sup = config.supervision
    if sup.backoff_max < sup.backoff_initial:
        raise ConfigError(
            "supervision.backoff_max",
            f"must be >= supervision.backoff_initial ({sup.backoff_initial})",
        )
    if config.metrics.idle_interval < config.metrics.interval:
        raise ConfigError(
            "metrics.idle_interval",
            f"must be >= metrics.interval ({config.metrics.interval})",
        )
    if config.discovery.heartbeat >= config.discovery.lease_ttl:
        raise ConfigError(
            "discovery.heartbeat",
            f"must be shorter than discovery.lease_ttl ({config.discovery.lease_ttl})",
        )
    engine = config.engine
    if (
        engine.backend == "sglang"
        and config.node.mode in ("prefill", "decode")
        and "disaggregation_transfer_backend" not in engine.sglang
    ):
        raise ConfigError(
            "engine.sglang.disaggregation_transfer_backend",
            f"node.mode {config.node.mode} with the real engine needs a KV transfer backend "
            '(e.g. "mooncake" or "nixl", installed separately; SGLang\'s "fake" one only '
            "pretends); the sim backend runs the disaggregated flow without one",
        )
    _check_multinode(config)
    _check_replicas(config)
    model = config.engine.model_path
    if config.engine.backend == "sglang" and not model:
        raise ConfigError("engine.model_path", "required when engine.backend is sglang")
    _check_ports(config)
    if config.engine.kv_events_port + 2 * config.engine.dp_size - 1 > 65535:
        raise ConfigError("engine.kv_events_port", "port + dp_size - 1 exceeds 65535")


def _check_ports(config: NodeConfig) -> None:
    """No two of the node's listening ports the same. A clash is blamed on the setting the
    configuration changed from its default (of the two involved), so the error names what
    the operator wrote: a `dp_size` that stretches the KV ports onto `system.port` names
    `engine.dp_size`, a `system.port` moved onto them names `system.port`."""
    defaults = NodeConfig()
    engine, base = config.engine, defaults.engine
    kv_key = "engine.kv_events_port" if engine.kv_events_port != base.kv_events_port else ""
    kv_key = kv_key or ("engine.dp_size" if engine.dp_size != base.dp_size else "")
    # (what the port is, the setting to blame if it was changed, whether it was)
    ports: list[tuple[int, str, str, bool]] = []
    if config.nats.embedded:
        changed = config.nats.port != defaults.nats.port
        ports.append((config.nats.port, "nats.port", "nats.port", changed))
    dp = engine.dp_size
    for rank in range(dp):
        what = f"engine.kv_events_port (rank {rank})"
        ports.append((engine.kv_events_port + rank, what, kv_key, bool(kv_key)))
        if engine.kv_replay:
            what = f"engine.kv_events_port (replay, rank {rank})"
            ports.append((engine.kv_events_port + dp + rank, what, kv_key, bool(kv_key)))
    if config.system.enabled:
        changed = config.system.port != defaults.system.port
        ports.append((config.system.port, "system.port", "system.port", changed))
    seen: dict[int, tuple[str, str, bool]] = {}
    for port, what, key, changed in ports:
        if port in seen:
            other, other_key, other_changed = seen[port]
            mine, blamed, clash = what, key, other
            if other_changed and not changed:  # the earlier one is what was changed
                mine, blamed, clash = other, other_key, what
            blamed = blamed or mine.split(" ")[0]
            where = "" if mine == blamed else f" of {mine}"
            raise ConfigError(blamed, f"port {port}{where} is also used by {clash}")
        seen[port] = (what, key, changed)


def _check_replicas(config: NodeConfig) -> None:
    """Odd counts only, and the embedded server is one server: one copy. (Against a
    cluster, the node checks the count at start with the size the server reports.)"""
    for key, count in (
        ("discovery.replicas", config.discovery.replicas),
        ("events.replicas", config.events.replicas),
    ):
        if count % 2 == 0:
            raise ConfigError(
                key,
                f"must be odd (1, 3 or 5), got {count}: an even count survives no more "
                "server losses than the odd count below it",
            )
        if count > 1 and config.nats.embedded:
            raise ConfigError(
                key,
                f"{count} copies need a NATS cluster (nats.embedded = false and its servers "
                "in nats.url); the embedded server holds 1",
            )


def _check_multinode(config: NodeConfig) -> None:
    node, dp = config.node, config.engine.dp_size
    if node.node_rank >= node.nnodes:
        raise ConfigError("node.node_rank", f"must be below node.nnodes ({node.nnodes})")
    if node.nnodes == 1:
        return
    if not re.match(r"^\[?[A-Za-z0-9.:\-]+\]?:\d{1,5}$", node.dist_init_addr):
        raise ConfigError(
            "node.dist_init_addr",
            f'with node.nnodes = {node.nnodes}, give the leader\'s "host:port" '
            f'(got "{node.dist_init_addr}")',
        )
    if dp % node.nnodes and dp != 1:
        raise ConfigError(
            "engine.dp_size",
            f"must be 1 or a multiple of node.nnodes ({node.nnodes}): each node runs "
            "dp_size / nnodes DP ranks, or the leader runs the one DP rank whose "
            "tensor-parallel ranks span the nodes",
        )
    if not node.instance_id:
        raise ConfigError(
            "node.instance_id",
            "required when node.nnodes > 1: every node of the engine uses the leader's, so "
            "followers stamp their KV events with the instance the leader registers",
        )
    if node.mode != "aggregated":
        raise ConfigError("node.mode", "multi-node engines run in aggregated mode here")


def _check_auth(config: NodeConfig) -> None:
    auth = config.nats.auth
    for name in ("password", "token"):
        env, file = getattr(auth, f"{name}_env"), getattr(auth, f"{name}_file")
        if env and file:
            raise ConfigError(f"nats.auth.{name}_env", f"give {name}_env or {name}_file, not both")
    if auth.user and not (auth.password_env or auth.password_file):
        raise ConfigError("nats.auth.user", "needs password_env or password_file")
    if (auth.tls_cert or auth.tls_key) and not (auth.tls_cert and auth.tls_key):
        raise ConfigError("nats.auth.tls_cert", "tls_cert and tls_key go together")
    for key in ("password_file", "token_file", "nkey_seed_file", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(auth, key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"nats.auth.{key}", f'no such file: "{path}"')
    admin = config.admin
    if admin.token_file and not Path(admin.token_file).expanduser().is_file():
        raise ConfigError("admin.token_file", f'no such file: "{admin.token_file}"')
    if admin.enabled and not admin.token_file and not os.environ.get(admin.token_env):
        raise ConfigError(
            "admin.token_env",
            f"admin.enabled needs the admin token: set {admin.token_env} or admin.token_file",
        )
    for i, fault in enumerate(config.chaos.faults):
        where = f"chaos.faults[{i}]"
        for key in ("duration", "delay", "at", "every", "jitter"):
            if getattr(fault, key) < 0:
                raise ConfigError(f"{where}.{key}", "must be >= 0")
        if not 0 <= fault.fraction <= 1:
            raise ConfigError(f"{where}.fraction", "must be within 0..1")
        if fault.count < 1:
            raise ConfigError(f"{where}.count", "must be >= 1")
    if config.nats.embedded and (auth.nkey_seed_file or auth.tls_ca or auth.tls_cert):
        raise ConfigError(
            "nats.auth",
            "NKEY and TLS need an external server (nats.embedded = false); the embedded one "
            "takes user/password or a token",
        )
    if config.chaos.faults and not config.chaos.enabled:
        raise ConfigError("chaos.faults", "chaos.enabled is false: set it to inject faults")


def loads(text: str) -> NodeConfig:
    """Parse and validate TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, NodeConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise _translate(exc, raw) from None
    _check(config)
    _check_auth(config)
    return config


def load(path: str | Path) -> NodeConfig:
    """Read, parse and validate the TOML file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return loads(text)


def cache_dir() -> Path:
    """Where the node keeps what it builds (models, the embedded NATS store)."""
    explicit = os.environ.get("SGL_NODE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sgl-node"


class Secret:
    """A secret value that never shows in a repr, a log line or an exception message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself (pass it on; never log it)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def read_secret(env: str, file: str, what: str) -> Secret | None:
    """Read a secret from the environment variable `env` or the file `file` (first line)."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError("", f"{what}: environment variable {env} is not set")
        return Secret(value)
    if file:
        text = Path(file).expanduser().read_text(encoding="utf-8").strip()
        return Secret(text.splitlines()[0] if text else "")
    return None
