"""Process children: spawn in an own process group, watch, probe readiness, stop, kill.

Every process is started by one long-lived spawner thread with PR_SET_PDEATHSIG, so a
child dies with the node even if the node is killed with SIGKILL (the death signal is
tied to the thread that forked, hence one thread that lives as long as the process).
Stopping sends SIGTERM to the whole group, and SIGKILL to it after the shutdown
timeout; once the leader has exited, whatever is left of its group is SIGKILLed, so
nothing the node started outlives it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import structlog

from supervisor.core import _memory_watch
from supervisor.core._postmortem import (
    MemoryCgroup,
    explain_signal_death,
    memory_cgroup,
    oom_kill_count,
)
from supervisor.core._protocol import (
    ChildExited,
    ChildReady,
    Crash,
    ExitReason,
    Killed,
    Normal,
    Shutdown,
)
from supervisor.core._spec import (
    ProcessStart,
    ReadyImmediately,
    ReadyOnFile,
    ReadyOnLine,
    ReadyOnPort,
)

__all__ = [
    "OutputHandler",
    "ProcessChild",
    "kill_all_process_groups",
    "live_process_groups",
    "set_output_handler",
]

_PR_SET_PDEATHSIG = 1
_OUTPUT_TAIL = 30

_groups_lock = threading.Lock()
_live_groups: set[int] = set()


# (logger bound with the child's path, generation and pid; stream name; the line)
OutputHandler = Callable[[Any, str, str], None]


def _log_output(log: Any, stream: str, line: str) -> None:
    log.info("output", stream=stream, line=line)


_output_handler: OutputHandler = _log_output


def set_output_handler(handler: OutputHandler | None) -> None:
    """Give every line a process child prints to ``handler(log, stream, line)`` (called on
    that stream's reader thread) instead of logging it as an ``output`` event; None
    restores that default. An application uses it to log its children in its own format."""
    global _output_handler  # noqa: PLW0603 - one setting for the whole process
    _output_handler = handler or _log_output


def live_process_groups() -> set[int]:
    """Process groups started by this process and not yet cleaned up."""
    with _groups_lock:
        return set(_live_groups)


def kill_all_process_groups() -> None:
    """SIGKILL every process group still alive (brutal stop, last resort at exit).

    Takes no lock: it may run in a signal handler that interrupted a holder of one.
    """
    for _ in range(3):
        try:
            groups = tuple(_live_groups)
            break
        except RuntimeError:  # the set changed while being copied
            continue
    else:
        groups = ()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _set_death_signal() -> None:  # runs in the forked child, before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # noqa: BLE001
        pass


class _Spawner:
    """One thread that forks every child process (see the module docstring)."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[dict[str, Any], Future[subprocess.Popen[bytes]]]] = (
            queue.Queue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def spawn(self, **popen_args: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spawner", daemon=True)
                self._thread.start()
        future: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((popen_args, future))
        return future.result(timeout=30)

    def _run(self) -> None:
        while True:
            args, future = self._requests.get()
            try:
                preexec = _set_death_signal if sys.platform.startswith("linux") else None
                proc = subprocess.Popen(start_new_session=True, preexec_fn=preexec, **args)  # noqa: PLW1509
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
            else:
                future.set_result(proc)


_SPAWNER = _Spawner()


class ProcessChild:
    """One incarnation of a process child; reports `ChildReady` / `ChildExited` via `notify`."""

    def __init__(
        self,
        start: ProcessStart,
        child_id: str,
        generation: int,
        path: str,
        notify: Callable[[ChildReady | ChildExited], None],
    ) -> None:
        self.start_spec = start
        self.child_id = child_id
        self.generation = generation
        self.notify = notify
        self.log = structlog.get_logger().bind(path=path, generation=generation)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL)
        self._cgroup: MemoryCgroup | None = None  # the child's memory cgroup, read at spawn
        self._oom_at_spawn: int | None = None
        self._memory: _memory_watch.GroupMemory | None = None  # its last RSS sample
        self._stop_requested = False
        self._killed = False
        self._kill_detail = ""
        self._ready = threading.Event()
        self._reaped = threading.Event()  # the leader has exited and been reaped
        self._exited = threading.Event()  # ...and its output has been read to the end
        self._line_re = (
            re.compile(start.ready.pattern) if isinstance(start.ready, ReadyOnLine) else None
        )

    @property
    def pid(self) -> int | None:
        """The leader's pid, once spawned."""
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Spawn the process and the threads that watch it. Raises OSError if it cannot run."""
        spec = self.start_spec
        env = dict(os.environ) if spec.inherit_env else {}
        env.update(spec.env or {})
        self.proc = _SPAWNER.spawn(
            args=list(spec.command),
            env=env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        self._cgroup = memory_cgroup(self.proc.pid)
        self._oom_at_spawn = oom_kill_count(self._cgroup) if self._cgroup else None
        _memory_watch.watch(self.pgid)
        self.log = self.log.bind(pid=self.proc.pid)
        with _groups_lock:
            _live_groups.add(self.pgid)
        self.log.info("process spawned", pid=self.proc.pid, command=" ".join(spec.command))
        readers = [
            threading.Thread(
                target=self._read, args=(stream, name), name=f"{self.child_id}-{name}", daemon=True
            )
            for stream, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))
        ]
        for reader in readers:
            reader.start()
        threading.Thread(
            target=self._wait, args=(readers,), name=f"{self.child_id}-wait", daemon=True
        ).start()
        probe = spec.ready
        if isinstance(probe, ReadyImmediately):
            self._mark_ready()
        elif isinstance(probe, ReadyOnPort | ReadyOnFile):
            threading.Thread(
                target=self._poll_probe, name=f"{self.child_id}-probe", daemon=True
            ).start()

    def _mark_ready(self) -> None:
        if not self._ready.is_set() and not self._exited.is_set():
            self._ready.set()
            self.notify(ChildReady(self.child_id, self.generation))

    def _read(self, stream: Any, name: str) -> None:
        probe = self.start_spec.ready
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            _output_handler(self.log, name, line)
            if (
                self._line_re is not None
                and isinstance(probe, ReadyOnLine)
                and probe.stream in (name, "any")
                and self._line_re.search(line)
            ):
                self._mark_ready()
        stream.close()

    def _poll_probe(self) -> None:
        probe = self.start_spec.ready
        while not self._exited.is_set() and not self._ready.is_set():
            if isinstance(probe, ReadyOnFile) and os.path.exists(probe.path):
                self._mark_ready()
            elif isinstance(probe, ReadyOnPort):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((probe.host, probe.port), timeout=0.2),
                ):
                    self._mark_ready()
            time.sleep(0.05)

    def _wait(self, readers: list[threading.Thread]) -> None:
        assert self.proc is not None
        assert self.pgid is not None
        code = self.proc.wait()
        self._memory = _memory_watch.forget(self.pgid)
        self._reaped.set()
        # Whatever the leader left behind in its group goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=2.0)
        # Only now: a ready line printed just before the exit still counts as ready.
        self._exited.set()
        with _groups_lock:
            _live_groups.discard(self.pgid)
        reason = self._reason(code)
        if isinstance(reason, Killed) and not self._killed:
            self.log.warning(
                "process killed by a signal the supervisor did not send",
                pid=self.proc.pid,
                reason=reason.describe(),
                last_output=reason.output,
            )
        self.log.info("process exited", pid=self.proc.pid, code=code, reason=reason.describe())
        self.notify(ChildExited(self.child_id, self.generation, reason))

    def _reason(self, code: int) -> ExitReason:
        if self._killed:
            return Killed(signal=int(signal.SIGKILL), detail=self._kill_detail)
        if self._stop_requested:
            return Shutdown(detail=f"exit status {code}")
        if code == 0:
            return Normal()
        if code < 0:  # a signal the tree did not send: say what can be read of its sender
            assert self.proc is not None
            why = explain_signal_death(
                self.proc.pid, self._cgroup, self._oom_at_spawn, self._memory
            )
            name = signal.Signals(-code).name
            return Killed(
                signal=-code,
                detail=f"{name}, not sent by the supervisor; {why}" if why else name,
                output="\n".join(self._tail),
            )
        return Crash(
            error_type="ExitStatus",
            message=f"exited with status {code}",
            traceback="\n".join(self._tail),
        )

    def terminate(self) -> None:
        """Graceful stop: SIGTERM to the whole group, then SIGCONT so that a stopped
        (SIGSTOPped) process wakes up to handle it."""
        self._stop_requested = True
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)

    def kill(self, detail: str = "did not stop within its shutdown timeout") -> None:
        """SIGKILL the whole group (brutal stop, or the shutdown timeout ran out)."""
        if not self._reaped.is_set():
            self._killed = True
            self._kill_detail = detail
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.pgid is not None and not self._reaped.is_set():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)

    def wait_exited(self, timeout: float) -> bool:
        """Block until the leader has exited and been reaped (for tests and the root)."""
        return self._exited.wait(timeout)
