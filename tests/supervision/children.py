"""Small scriptable children for the supervision tests (as OTP's supervisor_SUITE has).

`Script` is shared by a test and its actors: it says how each start behaves and records
what the actors did, so tests can assert order without sleeping.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from supervisor.core import (
    ActorStart,
    ChildContext,
    ChildSpec,
    ExitReason,
    Normal,
    ProcessStart,
    ReadyOnLine,
    Shutdown,
    StopRequest,
    SupervisedActor,
)


class Script:
    """Behaviour per (child id, generation) and a log of what happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.starts: dict[tuple[str, int], str] = {}  # (id, gen) -> ok|fail|hang|base|deferred
        self.default_start: dict[str, str] = {}
        self.stop_behaviour: dict[str, str] = {}  # id -> ignore|slow:<seconds>
        self.release = threading.Event()
        self.records: list[tuple[str, str, Any]] = []

    def start_of(self, child_id: str, generation: int) -> str:
        with self._lock:
            return self.starts.get((child_id, generation), self.default_start.get(child_id, "ok"))

    def record(self, what: str, child_id: str, detail: Any = None) -> None:
        with self._lock:
            self.records.append((what, child_id, detail))

    def seen(self, what: str) -> list[tuple[str, Any]]:
        with self._lock:
            return [(c, d) for w, c, d in self.records if w == what]


class Scripted(SupervisedActor):
    """An actor whose start, messages and stop follow its `Script`."""

    def __init__(self, context: ChildContext, script: Script) -> None:
        super().__init__(context)
        self.script = script
        self.deferred_ready = script.start_of(context.child_id, context.generation) == "deferred"

    def on_start_up(self) -> None:
        behaviour = self.script.start_of(self.context.child_id, self.context.generation)
        self.script.record("start", self.context.child_id, self.context.generation)
        if behaviour == "fail":
            msg = "refusing to start"
            raise RuntimeError(msg)
        if behaviour == "base":
            raise SystemExit(3)
        if behaviour == "hang":
            self.script.release.wait(60)

    def handle(self, message: Any) -> Any:
        match message:
            case "ping":
                return "pong"
            case "ready":
                self.report_ready()
                return None
            case "crash":
                msg = "asked to crash"
                raise ValueError(msg)
            case "base":
                raise KeyboardInterrupt
            case "exit_normal":
                self.exit(Normal())
                return None
            case "exit_shutdown":
                self.exit(Shutdown(detail="on its own"))
                return None
            case "hang":
                self.script.release.wait(60)
                return None
        return super().handle(message)

    def on_shutdown(self, request: StopRequest) -> None:
        self.script.record("stop_begin", self.context.child_id, request.reason)
        behaviour = self.script.stop_behaviour.get(self.context.child_id, "")
        if behaviour == "ignore":
            self.script.release.wait(60)
        elif behaviour.startswith("slow:"):
            time.sleep(float(behaviour.split(":")[1]))

    def on_exit(self, reason: ExitReason) -> None:
        self.script.record("cleanup_done", self.context.child_id, reason)

    def on_undelivered(self, message: Any) -> None:
        self.script.record("undelivered", self.context.child_id, message)


def actor(child_id: str, script: Script, **spec: Any) -> ChildSpec:
    """A `Scripted` child spec."""
    return ChildSpec(child_id, ActorStart(Scripted, (script,)), **spec)


SLEEPER = """
import signal, sys, time
print("ready", flush=True)
time.sleep(3600)
"""

# Ignores SIGTERM; so does the grandchild it starts (same process group).
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
print(f"ready grandchild={child.pid}", flush=True)
time.sleep(3600)
"""

EXIT_WITH = """
import sys
print("ready", flush=True)
print("about to fail", file=sys.stderr, flush=True)
sys.exit({code})
"""

TERM_NOISY = """
import signal, sys, time
def on_term(*_):
    print("got SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(3600)
"""


def process(child_id: str, code: str, ready: str = "ready", **spec: Any) -> ChildSpec:
    """A process child running `code` in a fresh Python, ready on a line matching `ready`."""
    return ChildSpec(
        child_id,
        ProcessStart([sys.executable, "-u", "-c", code], ready=ReadyOnLine(ready)),
        **spec,
    )


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout`; for OS state that has no event (pids)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
