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

On the CPU the children start from a **forkserver** that imported SGLang once, in parallel
with the host's own import (`start_forkserver`, then `route_children` hands SGLang a
`Process` of that context): a start no longer pays SGLang's ~12 s import in the scheduler
and again in the detokenizer after the host's. Each child gets the environment the host had
when it started the child, as with spawn (SGLang passes settings to its children that way).
Elsewhere (GPUs, not tested here) SGLang's own spawn stays.

Not covered: the DP-attention launch path (`enable_dp_attention`) and multi-detokenizer
routers start SGLang's own targets, so on the CPU those children fail to import SGLang.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import signal
from typing import Any

from actors.engine_host import sgl_kernel_cpu

__all__ = [
    "CPU_ENV",
    "FORKSERVER_PRELOAD",
    "METRICS_ENV",
    "metrics_endpoint",
    "prepare_cpu_process",
    "route_children",
    "run_data_parallel_controller_process",
    "run_detokenizer_process",
    "run_scheduler_process",
    "start_forkserver",
]

# Not SGL_NODE_*: SGLang rewrites every SGL_* variable to SGLANG_* at import, with a
# deprecation warning in the log of each of its processes.
CPU_ENV = "SGLNODE_SGLANG_CPU"
METRICS_ENV = "SGLNODE_SCHEDULER_METRICS"
# What the forkserver imports before it forks anything (no "scheduler" in its name: the
# forkserver's command line carries it, and chaos finds SGLang's schedulers by theirs).
FORKSERVER_PRELOAD = "actors.engine_host.sglang_preload"
FORKSERVER_PARENT_ENV = "SGLNODE_FORKSERVER_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the forkserver: be SIGKILLed when the engine host dies, however it dies.

    SGLang's children die with their parent (they set PR_SET_PDEATHSIG), which is now the
    forkserver; and the forkserver would outlive the host, since those children hold the
    pipe whose end tells it the host is gone. A node killed with -9 takes its engine host
    along (the host's own death signal): this takes the rest."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(FORKSERVER_PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):  # the host died meanwhile
        os._exit(1)


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
    `run_scheduler_process_func` it is given: `run_scheduler_process` above). Started from
    the forkserver, it would fork them from itself, threads and all: it spawns them, as
    SGLang does. Its event loop waits in a poll instead of SGLang's spin (`_wait_in_poll`)."""
    multiprocessing.set_start_method("spawn", force=True)
    from sglang.srt.managers import data_parallel_controller as controller

    controller.DataParallelController.event_loop = _wait_in_poll
    controller.run_data_parallel_controller_process(*args, **kwargs)


def _wait_in_poll(self: Any) -> None:
    """SGLang's data-parallel controller loop, waiting in a poll while there is nothing to
    read. SGLang's own receives without blocking in a loop with no pause: an idle engine
    with `dp_size > 1` burnt one core in it (measured: 100 % of a core, its schedulers at
    1 %), and on this 2-core machine the node's decoding slowed to a crawl beside it. A
    request wakes the poll at once; the watchdog is fed at least every second."""
    import zmq
    from sglang.srt.managers import data_parallel_controller as controller

    socket = self.recv_from_tokenizer
    while True:
        socket.poll(1000)
        while True:
            self.soft_watchdog.feed()
            try:
                request = controller.sock_recv(socket, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            self._request_dispatcher(request)


def start_forkserver() -> None:
    """Start the forkserver SGLang's children will come from; it imports SGLang meanwhile
    (returns at once)."""
    os.environ[FORKSERVER_PARENT_ENV] = str(os.getpid())
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([FORKSERVER_PRELOAD])
    multiprocessing.forkserver.ensure_running()


class ForkedChild(multiprocessing.context.ForkServerProcess):
    """A child from the forkserver with the environment of its start, as spawn gives it:
    the forkserver's own is the host's of long before."""

    _environ: dict[str, str]

    def start(self) -> None:
        self._environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        # setproctitle finds the memory it writes titles into (argv's, and the environment
        # strings after it) on first use, and finds none once the environment has been
        # rebuilt: SGLang's children would keep the forkserver's command line as their title
        # (`ps`, and chaos finding the scheduler, read it). So it looks first.
        import setproctitle

        setproctitle.getproctitle()
        os.environ.clear()
        os.environ.update(self._environ)
        super().run()


class _Multiprocessing:
    """`multiprocessing` as SGLang's engine module sees it when its children come from the
    forkserver: the same, but `Process` is `ForkedChild`."""

    Process = ForkedChild

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def route_children(engine_module: Any, forkserver: bool = False) -> type[Any]:
    """An `sgl.Engine` subclass whose children start here (in this process), from the
    forkserver if `forkserver` (`start_forkserver` was called).

    The scheduler and detokenizer targets are Engine class attributes (SGLang's override
    points). The DP controller's target is a module global of `sglang.srt.entrypoints.engine`
    that `_launch_scheduler_processes` reads at call time: it is replaced in this process,
    as is the `mp` module its children are started with.
    """
    engine_module.run_data_parallel_controller_process = run_data_parallel_controller_process
    if forkserver:
        engine_module.mp = _Multiprocessing()
    return type(
        "SglNodeEngine",
        (engine_module.Engine,),
        {
            "run_scheduler_process_func": staticmethod(run_scheduler_process),
            "run_detokenizer_process_func": staticmethod(run_detokenizer_process),
        },
    )
