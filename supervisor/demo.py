"""A demonstration tree: supervision alone, no engine, no NATS (`[node] tree = "demo"`).

    demo                rest_for_one
    ├── ticker          process child (with a grandchild), ready on its first line
    ├── workers         pool of `DemoWorker` actors
    └── heartbeat       actor logging the tree's uptime

It shows (and the end-to-end tests exercise) start order, readiness, signals and the
ordered stop of a real tree of actors and processes.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from supervisor.config import NodeConfig
from supervisor.core import (
    ActorStart,
    ChildContext,
    ChildSpec,
    ProcessStart,
    ReadyOnLine,
    StopRequest,
    SupervisedActor,
    Supervisor,
    SupervisorFlags,
)
from supervisor.flags import supervisor_flags

__all__ = ["DemoWorker", "Heartbeat", "build_demo_tree"]

# The ticker starts a grandchild in its own group, prints ticks, and stops on SIGTERM.
_TICKER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"ticker ready grandchild={child.pid}", flush=True)
n = 0
while True:
    time.sleep(5)
    n += 1
    print(f"tick {n}", flush=True)
"""


class DemoWorker(SupervisedActor):
    """A pool member that echoes what it is told."""

    def handle(self, message: Any) -> Any:
        return message


class Heartbeat(SupervisedActor):
    """Logs a line every `interval` seconds (from a timer thread, told to the actor)."""

    def __init__(self, context: ChildContext, interval: float = 10.0) -> None:
        super().__init__(context)
        self.interval = interval
        self.beats = 0
        self._stopped = threading.Event()

    def on_start_up(self) -> None:
        threading.Thread(target=self._tick, name="heartbeat", daemon=True).start()

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            self.actor_ref.tell("beat")

    def handle(self, message: Any) -> Any:
        if message == "beat":
            self.beats += 1
            self.log.info("heartbeat", beats=self.beats)
            return None
        return super().handle(message)

    def on_shutdown(self, request: StopRequest) -> None:
        self.log.info("heartbeat stopping", reason=request.reason)

    def on_exit(self, reason: Any) -> None:
        self._stopped.set()


def build_demo_tree(config: NodeConfig) -> tuple[SupervisorFlags, list[ChildSpec]]:
    """The demonstration tree's top flags and children."""
    flags = supervisor_flags(config.supervision, "rest_for_one")
    pool_flags = supervisor_flags(config.supervision, "pool")
    children = [
        ChildSpec(
            "ticker",
            ProcessStart([sys.executable, "-u", "-c", _TICKER], ready=ReadyOnLine("ticker ready")),
            shutdown=5.0,
        ),
        ChildSpec(
            "workers",
            ActorStart(
                Supervisor,
                (pool_flags, [ChildSpec("worker", ActorStart(DemoWorker))]),
                {"pool_size": 2},
            ),
        ),
        ChildSpec("heartbeat", ActorStart(Heartbeat, (5.0,))),
    ]
    return flags, children
