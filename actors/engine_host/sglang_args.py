"""SGLang's ServerArgs for the engine host: our defaults, the user's `engine.sglang` table
over them, and the keys the node owns.

All defaults are in the tables below. `validate_sglang_args` checks the user's table up
front (field names only; no engine, no model), so the node's config check can report
every problem at once; `engine_kwargs` builds the arguments of `sgl.Engine`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors.engine_host import sglang_compat
from actors.engine_host.spec import HostSpec

__all__ = [
    "CPU_DEFAULTS",
    "DEFAULTS",
    "NODE_OWNED",
    "SglangArgsError",
    "cpu_threads_bind",
    "engine_kwargs",
    "is_cpu",
    "local_engine_ranks",
    "validate_sglang_args",
]

# For every device. The user's `engine.sglang` table overrides any of these.
DEFAULTS: dict[str, Any] = {
    "skip_server_warmup": True,  # the Engine API has no HTTP warm-up to skip; harmless
    "enable_metrics": True,  # Prometheus files + the scheduler's KvMetrics for the node
    "log_level": "warning",
    sglang_compat.STREAMING_FIELD: True,  # deltas, not cumulative items
}
# On the CPU (the default device): the arguments measured to work on these machines
# (notes/sglang-on-cpu.md). A GPU config sets `device` and gets SGLang's own defaults.
CPU_DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "disable_cuda_graph": True,
    "dtype": "bfloat16",
    "mem_fraction_static": 0.3,
    "max_total_tokens": 8192,
    # SGLang's scheduler polls its sockets in a busy loop; on the CPU that burns a whole
    # core while idle, starving the node's own actors (and any other engine on the host).
    # This makes it block on the sockets instead; a request still wakes it at once.
    "sleep_on_idle": True,
}
# Set by the node from its own config (other actors depend on the same values), so they
# may not be set in `engine.sglang`: ServerArgs field -> where to set it instead.
NODE_OWNED: dict[str, str] = {
    "model_path": "engine.model_path",
    "served_model_name": "engine.served_model_name",
    "page_size": "engine.page_size",
    "dp_size": "engine.dp_size",
    "kv_events_config": "engine.kv_events_port",
}


class SglangArgsError(ValueError):
    """The `engine.sglang` table (or the spec) cannot make SGLang ServerArgs."""


def validate_sglang_args(args: Mapping[str, Any]) -> list[str]:
    """Problems with the user's `engine.sglang` table, each naming `engine.sglang.<key>`.

    Checks names only (SGLang checks values when the engine starts): every key must be a
    field of SGLang's ServerArgs and not one the node sets itself. Imports SGLang's
    `server_args` module (~5 s), starts nothing.
    """
    fields = sglang_compat.server_args_fields()
    problems = []
    for key in args:
        if key in NODE_OWNED:
            problems.append(f"engine.sglang.{key}: set by the node; use {NODE_OWNED[key]} instead")
        elif key not in fields:
            hint = sglang_compat.closest_field(key)
            problems.append(
                f"engine.sglang.{key}: not a field of SGLang's ServerArgs"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
    return problems


def is_cpu(spec: HostSpec) -> bool:
    """Whether the engine runs on the CPU (the default unless `engine.sglang.device` says)."""
    return str(spec.sglang.get("device", "cpu")) == "cpu"


def engine_kwargs(spec: HostSpec, model_dir: Path, model_name: str) -> dict[str, Any]:
    """The keyword arguments of `sgl.Engine`; raises `SglangArgsError`."""
    problems = validate_sglang_args(spec.sglang)
    if len(spec.metrics_endpoints) < spec.dp_size:
        problems.append(
            f"metrics_endpoints: {len(spec.metrics_endpoints)} given for dp_size {spec.dp_size}"
        )
    if problems:
        raise SglangArgsError("; ".join(problems))
    fields = sglang_compat.server_args_fields()
    kwargs = {k: v for k, v in DEFAULTS.items() if k in fields}
    if is_cpu(spec):
        kwargs.update(CPU_DEFAULTS)
    if spec.nnodes > 1:
        kwargs.update(
            nnodes=spec.nnodes, node_rank=spec.node_rank, dist_init_addr=spec.dist_init_addr
        )
    if spec.mode == "embedding":
        kwargs["is_embedding"] = True
    elif spec.mode in ("prefill", "decode"):  # needs a KV transfer backend (mooncake, nixl)
        kwargs["disaggregation_mode"] = spec.mode
    kwargs.update(spec.sglang)
    kwargs.update(
        model_path=str(model_dir),
        served_model_name=model_name,
        page_size=spec.page_size,
        dp_size=spec.dp_size,
        kv_events_config=sglang_compat.kv_events_config(
            spec.kv_events_port, spec.kv_topic, spec.replay_port
        ),
    )
    return kwargs


def local_engine_ranks(spec: HostSpec) -> int:
    """How many SGLang ranks (DP x TP x PP) this host runs: all of them on one node, its
    share on one node of a multi-node engine."""
    tp = int(spec.sglang.get("tp_size", 1) or 1)
    pp = int(spec.sglang.get("pp_size", 1) or 1)
    return max(1, spec.dp_size * tp * pp // spec.nnodes)


def cpu_threads_bind(ranks: int, always: bool = False) -> str | None:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` ranks: this process's cores split into
    contiguous groups, one per rank ("0|1" for two ranks on two cores). None for one rank
    (unless `always`: a multi-node engine counts every node's ranks against this
    machine's NUMA nodes without it) or when there are fewer cores than ranks (SGLang then
    says what it needs)."""
    cores = sorted(os.sched_getaffinity(0))
    if ranks < 1 or (ranks == 1 and not always) or len(cores) < ranks:
        return None
    share = len(cores) // ranks
    groups = [cores[r * share : (r + 1) * share] for r in range(ranks)]
    return "|".join(
        str(g[0])
        if len(g) == 1
        else f"{g[0]}-{g[-1]}"
        if g == list(range(g[0], g[-1] + 1))
        else ",".join(map(str, g))
        for g in groups
    )
