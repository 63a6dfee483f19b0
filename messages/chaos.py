"""Fault injection and the admin subject: faults, admin requests and replies.

Faults are a product feature (off unless `[chaos] enabled = true`): each names what to
break and how, so a run can be scheduled in the config or triggered at run time.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from messages.engine import EngineOp

__all__ = [
    "FAULT_KINDS",
    "AdminReply",
    "AdminRequest",
    "ChaosCutNats",
    "ChaosFailProbes",
    "ChaosFailRequests",
    "ChaosZmq",
    "ClusterFault",
    "Fault",
    "InjectFault",
]

FaultKind = Literal[
    "crash_actor",  # an exception inside the actor at `target` (a tree path)
    "hang_actor",  # the actor at `target` stops answering for `duration` s
    "kill_engine_host",  # kill -9 of the engine host process
    "stop_engine_host",  # SIGSTOP of the engine host for `duration` s (a stuck engine)
    "kill_scheduler",  # kill -9 of SGLang's scheduler process(es) inside the host
    "drop_zmq",  # drop `fraction` of the ZMQ messages at `target` (kv_relay_<r> | metrics)
    "delay_zmq",  # delay `fraction` of them by `delay` s, for `duration` s
    "reset_sequence",  # restart DP rank `rank`'s KV event sequence (sim)
    "cut_nats",  # cut the node's NATS connection for `duration` s
    "restart_nats",  # kill the embedded NATS server (it restarts by policy)
    "fail_probes",  # the next `count` engine health canaries fail
    "fail_requests",  # the next `count` requests end with `engine_error` (never reach the engine)
    "slow_engine",  # multiply the engine's step times by `factor` for `duration` s (sim)
]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One fault to inject now (at run time) or on a schedule (`[[chaos.faults]]`)."""

    fault: FaultKind
    target: str = ""
    duration: float = 0.0
    fraction: float = 1.0
    delay: float = 0.0
    rank: int = 0
    count: int = 1
    factor: float = 1.0
    # scheduling (config only): first at `at` s after the node is ready, then every
    # `every` ± `jitter` s (0: once)
    at: float = 0.0
    every: float = 0.0
    jitter: float = 0.0


# --- what the chaos actor sends to the actor at fault -----------------------------------


class ChaosZmq(msgspec.Struct, frozen=True):
    """Drop `drop` and delay `delay_fraction` (by `delay` s) of incoming ZMQ messages until
    the monotonic time `until`."""

    drop: float
    delay_fraction: float
    delay: float
    until: float


class ChaosFailProbes(msgspec.Struct, frozen=True):
    """Fail the next `count` health canaries (and run one now)."""

    count: int


class ChaosFailRequests(msgspec.Struct, frozen=True):
    """End the next `count` generate or embed requests with `engine_error`, as an engine
    that fails them would (the canaries are not counted)."""

    count: int


# --- the admin subject ---------------------------------------------------------------------

AdminOp = Literal[EngineOp, "chaos", "tree"]


class AdminRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request on `{namespace}.{component}.admin.{instance_id}`; `token` is the admin
    credential (never logged)."""

    token: str
    op: AdminOp
    args: dict[str, Any] = {}


class AdminReply(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer to an AdminRequest."""

    ok: bool
    message: str = ""
    data: dict[str, Any] = {}
    error: str = ""  # unauthorized | disabled | invalid | failed


class ChaosCutNats(msgspec.Struct, frozen=True):
    """Cut the node's NATS connection for `seconds` (FabricActor, through its proxy)."""

    seconds: float


class InjectFault(msgspec.Struct, frozen=True):
    """Ask the ChaosActor to inject `fault` now; the answer is (ok, message)."""

    fault: Fault


ClusterFaultKind = Literal[
    "kill_server",  # kill -9 of cluster server `server`; started again `duration` s later
    "restart_server",  # SIGTERM of server `server`, started again at once
    "partition_server",  # every route of server `server` cut for `duration` s
    "rolling_restart",  # each server in turn: SIGTERM, start, wait until the cluster formed
]


class ClusterFault(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A fault on the NATS cluster under a fabric (the cluster chaos runner's scenarios)."""

    fault: ClusterFaultKind
    at: float = 0.0  # seconds after the load started
    server: int = 0  # index in the cluster (node k starts on server k)
    node: int = -1  # >= 0: instead of `server`, the one node `node` is connected to then
    duration: float = 0.0
