"""Sim nodes on a NATS cluster, for the cluster chaos runner and the cluster tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import tomllib

from supervisor.chaos import ROOT, _toml, free_ports

__all__ = ["FabricNode", "rss_mb"]


def rss_mb(pid: int | None = None) -> float:
    """The resident memory of `pid` (default: this process), in MB."""
    path = f"/proc/{pid or 'self'}/status"
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class FabricNode:
    """Node `k` of a run: its first server is the cluster's server k, then the others in
    order (`nats.randomize = false`), with `replicas` copies of the discovery bucket and
    of its durable KV-event stream."""

    def __init__(self, config: str, urls: list[str], k: int, replicas: int, workdir: Path) -> None:
        base: dict[str, Any] = tomllib.loads((ROOT / config).read_text()) if config else {}
        first = k % len(urls)
        self.instance_id = f"node{k}-{secrets.token_hex(3)}"
        self.system_port = free_ports()
        dp = base.get("engine", {}).get("dp_size", 1)
        base.setdefault("engine", {})["kv_events_port"] = free_ports(2 * dp)
        base["nats"] = {"embedded": False, "url": urls[first:] + urls[:first], "randomize": False}
        base.setdefault("discovery", {})["replicas"] = replicas
        base["events"] = {**base.get("events", {}), "durable": True, "replicas": replicas}
        base["system"] = {"port": self.system_port}
        base.setdefault("node", {})["instance_id"] = self.instance_id
        path = workdir / f"{self.instance_id}.toml"
        path.write_text(_toml(base))
        self.log_path = workdir / f"{self.instance_id}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", str(path), "--log-format", "json"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc.poll() is None

    def http(self, path: str) -> tuple[int, Any]:
        """GET `path` on its system port: (status, JSON body); 0 when it does not answer."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.system_port}{path}", timeout=3
            ) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def wait_ready(self, timeout: float) -> None:
        """Wait until it is ready (raises, naming its log, if it exits or takes too long)."""
        deadline = time.monotonic() + timeout
        while self.http("/ready")[0] != 200:
            if not self.alive or time.monotonic() > deadline:
                msg = f"node {self.instance_id} did not start; see {self.log_path}"
                raise RuntimeError(msg)
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL its whole session (a machine lost)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, wait for the ordered stop; its exit code (None if it was killed)."""
        if not self.alive:
            return None if self.proc.returncode == -signal.SIGKILL else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -signal.SIGKILL
