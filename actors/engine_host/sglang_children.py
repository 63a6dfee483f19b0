"""Where SGLang's child processes start inside the engine host, and how each is prepared.

SGLang starts its scheduler(s), detokenizer and, for `dp_size > 1`, a data-parallel
controller with multiprocessing's *spawn*. A spawned child does not re-run the host's
main module when that module is a package's `__main__` (`python -m actors.engine_host`):
multiprocessing deliberately skips `*.__main__` (`spawn._fixup_main_from_name`). What a
child does import first is the module of its target function, when it unpickles the
process object. So the host starts every SGLang child with a target defined here, and
importing this module is what prepares a child:

- `SGLNODE_SGLANG_CPU=1` (set by the node for backend = sglang on the CPU, and by the
  backend itself when the device is the CPU): SGLang's CPU path
  (`SGLANG_USE_CPU_ENGINE=1`) and the `sgl_kernel` stand-in, before SGLang is imported.
- `SGLNODE_SCHEDULER_METRICS` (a JSON list, one endpoint per DP rank): the scheduler of
  rank r pushes its load metrics (`KvMetrics`) to entry r, where the node's MetricsActor
  binds its PULL socket, instead of the private temporary path SGLang generates (per rank
  for `dp_size > 1`, and never exposed).

Not covered: the DP-attention launch path (`enable_dp_attention`) and multi-detokenizer
routers start SGLang's own targets, so on the CPU those children fail to import SGLang.
"""

from __future__ import annotations

import json
import os
from typing import Any

from actors.engine_host import sgl_kernel_cpu

__all__ = [
    "CPU_ENV",
    "METRICS_ENV",
    "metrics_endpoint",
    "prepare_cpu_process",
    "route_children",
    "run_data_parallel_controller_process",
    "run_detokenizer_process",
    "run_scheduler_process",
]

# Not SGL_NODE_*: SGLang rewrites every SGL_* variable to SGLANG_* at import, with a
# deprecation warning in the log of each of its processes.
CPU_ENV = "SGLNODE_SGLANG_CPU"
METRICS_ENV = "SGLNODE_SCHEDULER_METRICS"


def prepare_cpu_process() -> bool:
    """When `SGLNODE_SGLANG_CPU=1`: select SGLang's CPU path and install the sgl_kernel
    stand-in (only if the real one cannot be imported). Idempotent; call it before
    anything imports SGLang. Returns whether the stand-in is in place."""
    if os.environ.get(CPU_ENV) != "1":
        return False
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    return sgl_kernel_cpu.install("cpu")


# At import: a spawned child imports this module (its target's) before SGLang.
prepare_cpu_process()


def metrics_endpoint(dp_rank: int | None) -> str | None:
    """The node's metrics endpoint for `dp_rank` (from `SGLNODE_SCHEDULER_METRICS`)."""
    raw = os.environ.get(METRICS_ENV)
    if not raw:
        return None
    endpoints = json.loads(raw)
    if dp_rank is None:  # as SGLang's resolve_spawn_dp_rank
        dp_rank = int(os.environ.get("SGLANG_DP_RANK", "0"))
    if not isinstance(endpoints, list) or not 0 <= dp_rank < len(endpoints):
        msg = f"{METRICS_ENV} has no endpoint for DP rank {dp_rank}: {raw}"
        raise ValueError(msg)
    return str(endpoints[dp_rank])


def run_scheduler_process(
    server_args: Any,
    port_args: Any,
    gpu_id: int,
    tp_rank: int,
    pp_rank: int,
    dp_rank: int | None,
    *rest: Any,
) -> None:
    """SGLang's scheduler, pushing its load metrics to the node's endpoint for its rank."""
    endpoint = metrics_endpoint(dp_rank)
    if endpoint is not None:
        port_args.metrics_ipc_name = endpoint  # the child's own copy of PortArgs
    from sglang.srt.managers.scheduler import run_scheduler_process as run

    run(server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, *rest)


def run_detokenizer_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's detokenizer."""
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process as run

    run(*args, **kwargs)


def run_data_parallel_controller_process(*args: Any, **kwargs: Any) -> None:
    """SGLang's data-parallel controller (it starts the DP ranks' schedulers with the
    `run_scheduler_process_func` it is given: `run_scheduler_process` above)."""
    from sglang.srt.managers.data_parallel_controller import (
        run_data_parallel_controller_process as run,
    )

    run(*args, **kwargs)


def route_children(engine_module: Any) -> type[Any]:
    """An `sgl.Engine` subclass whose children start here (in this process).

    The scheduler and detokenizer targets are Engine class attributes (SGLang's override
    points). The DP controller's target is a module global of `sglang.srt.entrypoints.engine`
    that `_launch_scheduler_processes` reads at call time: it is replaced in this process.
    """
    engine_module.run_data_parallel_controller_process = run_data_parallel_controller_process
    return type(
        "SglNodeEngine",
        (engine_module.Engine,),
        {
            "run_scheduler_process_func": staticmethod(run_scheduler_process),
            "run_detokenizer_process_func": staticmethod(run_detokenizer_process),
        },
    )
