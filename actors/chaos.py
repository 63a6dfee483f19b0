"""`ChaosActor`: fault injection on purpose (only in the tree with `[chaos] enabled`).

It runs the configured schedule (each fault at `at` s after the node is ready, then every
`every` ± `jitter` s, the jitter drawn from `seed` so a run can be replayed) and injects
faults asked for at run time through the admin subject. Each fault goes to the part it
breaks: an actor by tree path, the engine host or SGLang's scheduler by pid, a relay's
or the metrics' ZMQ socket, the NATS connection or the embedded NATS server.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.telemetry import node_metrics
from messages.chaos import (
    ChaosCutNats,
    ChaosFailProbes,
    ChaosFailRequests,
    ChaosZmq,
    Fault,
    InjectFault,
)
from messages.engine import HostControlReply
from messages.node import EngineControl
from supervisor.core import (
    ChildContext,
    ChildInfo,
    SupervisedActor,
    WhichChildren,
    ask,
    crash,
    suspend,
)
from supervisor.plan import ChaosSettings

__all__ = ["ChaosActor", "scheduler_pids"]

_ASK = 10.0
_NETWORK_FAULT_DELAY = 0.2


def scheduler_pids(host_pid: int) -> list[int]:
    """SGLang's scheduler processes under the engine host (their title names them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if "scheduler" in cmdline.lower() and (ppid == host_pid or _descends(ppid, host_pid)):
            found.append(int(entry.name))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(8):
        if pid in (ancestor, 0, 1):
            return pid == ancestor
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


@dataclass(frozen=True)
class _Scheduled:
    """The configured fault `index` is due."""

    index: int


@dataclass(frozen=True)
class _Continue:
    """A stopped (SIGSTOP) process's time is up: SIGCONT it."""

    pid: int


@dataclass(frozen=True)
class _NetworkFault:
    """Cut the NATS connection or kill the server now (after the admin answer went out)."""

    kind: str  # cut_nats | restart_nats
    duration: float


@dataclass(frozen=True)
class _Unslow:
    """A slowed engine's time is up: back to its own speed."""


class ChaosActor(SupervisedActor):
    """Injects faults; see the module docstring."""

    def __init__(self, context: ChildContext, settings: ChaosSettings) -> None:
        super().__init__(context)
        self.root = settings.root
        self.engine = f"{settings.root}/core/engine"
        self.faults = settings.faults
        self.random = random.Random(settings.seed)

    def on_start_up(self) -> None:
        for index, fault in enumerate(self.faults):
            self._schedule(index, fault.at)
        if self.faults:
            self.log.warning("fault injection schedule armed", faults=len(self.faults))

    def _schedule(self, index: int, delay: float) -> None:
        self.send_after(delay, _Scheduled(index))

    def handle(self, message: Any) -> Any:
        match message:
            case InjectFault(fault=fault):
                return self.inject(fault)
            case _Scheduled(index=index):
                fault = self.faults[index]
                self.inject(fault)
                if fault.every > 0:
                    jitter = self.random.uniform(-fault.jitter, fault.jitter)
                    self._schedule(index, max(0.0, fault.every + jitter))
                return None
            case _Continue(pid=pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                return None
            case _NetworkFault(kind=kind, duration=duration):
                self._network_fault(kind, duration)
                return None
            case _Unslow():
                self._engine_control("slow", {"factor": 1.0})
                return None
        return super().handle(message)

    def inject(self, fault: Fault) -> tuple[bool, str]:
        """Inject one fault now; (ok, what happened)."""
        try:
            ok, what = self._inject(fault)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot be injected is reported
            ok, what = False, f"{type(exc).__name__}: {exc}"
        node_metrics.FAULTS.labels(fault.fault, "injected" if ok else "failed").inc()
        level = "warning" if ok else "error"
        getattr(self.log, level)(
            "fault injected" if ok else "fault not injected", fault=fault.fault, detail=what
        )
        return ok, what

    def _inject(self, fault: Fault) -> tuple[bool, str]:
        kind = fault.fault
        if kind in ("crash_actor", "hang_actor"):
            path = self._path(fault.target)
            done = (
                crash(path, f"injected crash of {path}")
                if kind == "crash_actor"
                else suspend(path, fault.duration)
            )
            if not done:
                return False, f"no actor is running at {path}"
            return True, f"{kind} {path}"
        if kind in ("kill_engine_host", "stop_engine_host", "kill_scheduler"):
            return self._signal_engine(fault)
        if kind in ("drop_zmq", "delay_zmq"):
            target = f"{self.engine}/{fault.target or 'kv_relay_0'}"
            drop, delayed = (fault.fraction, 0.0) if kind == "drop_zmq" else (0.0, fault.fraction)
            rule = ChaosZmq(drop, delayed, fault.delay, self.context.clock.now() + fault.duration)
            result: tuple[bool, str] = ask(target, rule, _ASK)
            return result
        if kind == "reset_sequence":
            return self._engine_control("reset_sequence", {"dp_rank": fault.rank})
        if kind in ("cut_nats", "restart_nats"):
            # After a moment, so the answer to the admin request still gets out.
            self.send_after(_NETWORK_FAULT_DELAY, _NetworkFault(kind, fault.duration))
            return True, f"{kind} in {_NETWORK_FAULT_DELAY:g}s"
        if kind in ("fail_probes", "fail_requests"):
            order = ChaosFailProbes if kind == "fail_probes" else ChaosFailRequests
            failing: tuple[bool, str] = ask(f"{self.engine}/engine_actor", order(fault.count), _ASK)
            return failing
        if kind == "slow_engine":
            ok, what = self._engine_control("slow", {"factor": fault.factor})
            if ok and fault.duration > 0:
                self.send_after(fault.duration, _Unslow())
            return ok, what
        return False, f"unknown fault {kind}"

    def _network_fault(self, what: str, duration: float) -> None:
        try:
            if what == "cut_nats":
                cut = ChaosCutNats(duration)
                ok, detail = ask(f"{self.root}/core/fabric", cut, _ASK)
            else:
                pid = self._pid(self.root, "nats_server")
                os.kill(pid, signal.SIGKILL)
                ok, detail = True, f"killed the embedded nats-server (pid {pid}); it restarts"
        except Exception as exc:  # noqa: BLE001 - reported, never fatal to the chaos actor
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        level = "warning" if ok else "error"
        getattr(self.log, level)("network fault", fault=what, detail=detail)

    def _signal_engine(self, fault: Fault) -> tuple[bool, str]:
        pid = self._pid(self.engine, "engine_host")
        if fault.fault == "kill_engine_host":
            os.kill(pid, signal.SIGKILL)
            return True, f"kill -9 of the engine host (pid {pid})"
        if fault.fault == "stop_engine_host":
            os.kill(pid, signal.SIGSTOP)
            self.send_after(fault.duration, _Continue(pid))
            return True, f"SIGSTOP of the engine host (pid {pid}) for {fault.duration:g}s"
        pids = scheduler_pids(pid)
        if not pids:
            return False, "no SGLang scheduler process under the engine host (is the backend sim?)"
        for scheduler in pids:
            os.kill(scheduler, signal.SIGKILL)
        return True, f"kill -9 of SGLang's scheduler process(es) {pids}"

    def _engine_control(self, op: str, args: dict[str, Any]) -> tuple[bool, str]:
        future = ask(f"{self.engine}/engine_actor", EngineControl(op, args), _ASK)
        reply: HostControlReply = future.result(timeout=_ASK)
        return reply.ok, reply.message or op

    def _pid(self, supervisor: str, child: str) -> int:
        rows: tuple[ChildInfo, ...] = ask(supervisor, WhichChildren(), _ASK)
        for row in rows:
            if row.id == child and row.pid is not None:
                return row.pid
        msg = f"{supervisor}/{child} is not running"
        raise LookupError(msg)

    def _path(self, target: str) -> str:
        return target if target.startswith(f"{self.root}/") else f"{self.root}/{target}"
