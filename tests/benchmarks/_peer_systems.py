"""The two systems of the peer benchmark, started side by side on this machine:

- sgl-node: one nats-server, two sim nodes, one frontend-only node (KV routing);
- Dynamo: `dynamo.frontend` (KV routing) + two `dynamo.mocker` workers, file discovery
  and the TCP request plane, on loopback only.

Each says which processes are its frontend, its framework and its engine emulation, so
that CPU is split between them (from /proc/PID/stat).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from actors.engine_host.builtin_model import resolve_model_path
from supervisor.config import DiscoverySection
from tests.benchmarks import peer_env
from tests.frontend.harness import Frontend, parse_metric, start_frontend
from tests.node.harness import NatsServer, NodeProcess, descendants, free_ports, start_node

DECODE_STEP = 0.0057  # the mocker's decode step here (engine type sglang, speedup 1)
PREFILL_PER_TOKEN = 0.0000152
TOKENIZER_MODEL = "builtin:smollm2-135m-instruct"  # the mocker's tokenizer and template


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class SglNode:
    """sgl-node: frontend + two sim nodes on one nats-server."""

    name = "sgl-node"
    model = "sim"

    def __init__(self, tmp: Path, zero_cost: bool) -> None:
        sim = {"num_blocks": 65536, "max_batch_size": 64}
        if not zero_cost:
            sim |= {
                "prefill_time_per_token": PREFILL_PER_TOKEN,
                "decode_time_per_step": DECODE_STEP,
            }
        self.tmp = tmp
        self.server = NatsServer(tmp)
        self.nodes: list[NodeProcess] = []
        quiet = {"level": "warning"}
        # the node's own discovery timing (the test harness heartbeats every second)
        defaults = DiscoverySection()
        discovery = {"lease_ttl": defaults.lease_ttl, "heartbeat": defaults.heartbeat}
        for i in range(2):
            self.nodes.append(
                start_node(
                    tmp, name=f"n{i}", embedded_nats=False, nats_url=self.server.url,
                    engine__sim=sim, logging=quiet, discovery=discovery,
                )
            )  # fmt: skip
        for node in self.nodes:
            node.wait_ready(120)
        self.frontend: Frontend = start_frontend(
            tmp, self.server.url, frontend={"migration_limit": 3}, logging=quiet
        )
        self.frontend.wait_instances(2)
        self.port = self.frontend.port

    def groups(self) -> dict[str, list[int]]:
        """PIDs by role: frontend, framework (nodes, nats-server), engine (sim hosts)."""
        node_pids = [n.proc.pid for n in self.nodes]
        fe = self.frontend.proc.proc.pid
        return {
            "frontend": [fe, *descendants(fe)],
            "framework": [*node_pids, self.server.proc.pid],
            "engine": [p for pid in node_pids for p in descendants(pid)],
        }

    def hit_counts(self) -> tuple[float, float] | None:
        """Router hit figures: None, the usage's cached tokens say it (the sim reports them)."""
        return None

    def kill_worker(self) -> None:
        """SIGKILL a node with its engine host (its whole process group)."""
        os.killpg(self.nodes[0].proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        self.frontend.kill()
        for node in self.nodes:
            node.kill()
        self.server.stop()


class Dynamo:
    """NVIDIA Dynamo: frontend + two mocker workers, in the peer environment."""

    name = "dynamo"
    model = "peer"

    def __init__(self, tmp: Path, zero_cost: bool) -> None:
        python = str(peer_env.ensure() / "bin" / "python")
        model_dir = str(resolve_model_path(TOKENIZER_MODEL))
        self.port = free_ports()
        self.env = {
            **os.environ,
            "DYN_FILE_KV": str(tmp / "dynamo-kv"),
            "HF_HUB_OFFLINE": "1",
            **{
                f"DYN_{k}_HOST": "127.0.0.1"
                for k in ("TCP_RPC", "TCP_RESPONSE_STREAM", "EVENT_PLANE", "SYSTEM")
            },
        }
        self.env.pop("PYTHONPATH", None)
        self.tmp = tmp
        common = ["--discovery-backend", "file", "--request-plane", "tcp"]
        speedup = "1000" if zero_cost else "1.0"
        mocker = [
            python, "-m", "dynamo.mocker", "--model-path", model_dir, "--model-name", self.model,
            *common, "--engine-type", "sglang", "--block-size", "16",
            "--num-gpu-blocks-override", "65536", "--max-num-seqs", "64",
            "--speedup-ratio", speedup,
        ]  # fmt: skip
        self.workers = [self._start(mocker, f"mocker{i}") for i in range(2)]
        self.frontend = self._start(
            [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
             "--http-port", str(self.port), *common, "--router-mode", "kv",
             "--migration-limit", "3"],
            "dynamo-frontend",
        )  # fmt: skip
        self._wait_model(120)

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("wb") as log:
            return subprocess.Popen(
                cmd, stdout=log, stderr=log, env=self.env, start_new_session=True
            )

    def _wait_model(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in (*self.workers, self.frontend):
                if proc.poll() is not None:
                    msg = f"a Dynamo process exited ({proc.args}); see {self.tmp}"
                    raise RuntimeError(msg)
            with contextlib.suppress(OSError):
                if f'"{self.model}"'.encode() in self._get("/v1/models"):
                    return
            time.sleep(0.2)
        msg = f"Dynamo did not list its model in {timeout}s; see {self.tmp}"
        raise TimeoutError(msg)

    def _get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return bytes(response.read())

    def groups(self) -> dict[str, list[int]]:
        """PIDs by role: frontend, framework (the workers: the mocker's runtime and its
        engine emulation share one process, so both count here), engine (none apart)."""
        fe = self.frontend.pid
        return {
            "frontend": [fe, *descendants(fe)],
            "framework": [p for w in self.workers for p in (w.pid, *descendants(w.pid))],
            "engine": [],
        }

    def hit_counts(self) -> tuple[float, float] | None:
        """(Σ predicted hit rate, routed requests) from the KV router's histogram."""
        text = self._get("/metrics").decode()
        return (
            parse_metric(text, "dynamo_component_router_kv_hit_rate_sum"),
            parse_metric(text, "dynamo_component_router_kv_hit_rate_count"),
        )

    def kill_worker(self) -> None:
        os.killpg(self.workers[0].pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in (self.frontend, *self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (self.frontend, *self.workers):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
