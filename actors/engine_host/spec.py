"""What the node tells its engine host process at start (one JSON argument)."""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.config import SimSection

__all__ = ["HostSpec", "local_ranks"]


class HostSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the engine host needs; built by the node from its config."""

    backend: str  # sim | sglang
    command_endpoint: str  # ipc:// — the host binds PULL here
    output_socket: str  # a Unix socket path: the host listens here (output_stream.py)
    dp_size: int
    page_size: int
    kv_events_port: int
    kv_topic: str = "kv-events"
    replay_port: int | None = None
    metrics_endpoints: list[str]  # per DP rank; the node's MetricsActor binds PULL there
    model_path: str = ""
    served_model_name: str = ""
    model_cache_dir: str = ""
    prometheus_dir: str = ""
    sim: SimSection = msgspec.field(default_factory=SimSection)
    sglang: dict[str, Any] = msgspec.field(default_factory=dict)
    node_rank: int = 0
    nnodes: int = 1
    dist_init_addr: str = ""  # host:port of the leader's engine (nnodes > 1)
    instance_id: str = ""  # the engine's instance (the leader's), checked when nodes join
    join_timeout: float = 300.0
    mode: str = "aggregated"  # aggregated | prefill | decode | embedding
    transfer_seconds_per_token: float = 0.0  # sim, decode mode: the simulated KV transfer
    bootstrap_host: str = ""  # sim, prefill mode: where its bootstrap server listens
    bootstrap_port: int = 0


def local_ranks(dp_size: int, nnodes: int, node_rank: int) -> range:
    """The global DP ranks node `node_rank` of a `nnodes`-node engine runs (all of them
    on a single node)."""
    if dp_size < nnodes:  # one DP rank whose tensor-parallel ranks span the nodes
        return range(dp_size) if node_rank == 0 else range(0)
    per_node = dp_size // nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)
