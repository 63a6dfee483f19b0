"""JetStream replica counts against the NATS cluster the node is connected to.

A server tells its clients, in its INFO, the cluster it belongs to and the client URLs
of every server routed to it now (`connect_urls`). A count above the number of servers
cannot be placed: JetStream refuses the bucket or stream with "no suitable peers for
placement" (err_code 10005), or, on a server without a cluster, "replicas > 1 not
supported in non-clustered mode" (10074). These helpers turn both into errors that name
the configuration key.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLACEMENT_ERRORS", "ReplicasError", "check_replicas", "explain", "servers_reported"]

PLACEMENT_ERRORS = (10005, 10074)  # no suitable peers; replicas > 1 without a cluster


class ReplicasError(RuntimeError):
    """More JetStream copies are configured than the NATS servers can hold."""


def servers_reported(info: dict[str, Any]) -> int:
    """How many servers the server's INFO shows (1 when it is not clustered)."""
    if not info.get("cluster"):
        return 1
    return max(1, len(set(info.get("connect_urls") or ())))


def check_replicas(wanted: dict[str, int], info: dict[str, Any]) -> str:
    """'' when every count can be placed; raises ReplicasError when the server is not
    clustered and a count is above 1; otherwise (a cluster with fewer servers up now
    than a count: maybe one is restarting) a warning to log."""
    servers = servers_reported(info)
    name = info.get("server_name") or info.get("server_id") or "?"
    for key, count in sorted(wanted.items()):
        if count <= servers:
            continue
        if not info.get("cluster"):
            msg = (
                f"{key} = {count}, but the NATS server {name} is not part of a cluster: it "
                "holds 1 copy (set it to 1, or connect to a cluster of at least "
                f"{count} servers)"
            )
            raise ReplicasError(msg)
        return (
            f"{key} = {count}, but cluster {info['cluster']} reports {servers} server(s) "
            "now: the bucket or stream can only be made once enough are up"
        )
    return ""


def explain(exc: Exception, key: str, count: int) -> str:
    """A JetStream error, with the configuration key at fault when it is a placement one."""
    text = f"{type(exc).__name__}: {exc}"
    if getattr(exc, "err_code", None) in PLACEMENT_ERRORS:
        return f"{key} = {count} cannot be placed on the NATS servers reachable now ({text})"
    return text
