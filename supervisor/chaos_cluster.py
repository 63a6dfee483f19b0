"""The cluster chaos runner: `python -m supervisor.chaos_cluster SCENARIO.toml`.

Starts a three-server NATS cluster (`supervisor.nats_cluster`, routes through proxies so
that a server can be partitioned), sim nodes on it (node k starts on server k, its
discovery bucket with 3 copies), and streaming clients of the client library on the last
server; injects the scenario's faults on the servers and prints a verdict: requests
sent, completed, ended with an error (by code) and **lost** (never ended), per fault the
time until the cluster formed again and until discovery was exact (every node listed, no
other), the time a killed node's lease took to expire at the end, and the runner's RSS
(the route proxies live in it). Exit 1 if anything was lost, the cluster did not come
back, or discovery did not come back exact. Scenarios ship as `configs/chaos/cluster-*.toml`::

    name = "cluster-kill-server"
    duration = 20.0
    [load]
    clients = 6
    [[faults]]
    at = 4.0
    fault = "kill_server"       # kill_server | restart_server | partition_server | rolling_restart
    server = 0                  # node 0's first server
    duration = 5.0              # down (kill) or cut off (partition) this long
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import tomllib

from messages.chaos import ClusterFault
from supervisor.chaos import Load, Runner, Scenario
from supervisor.chaos_nodes import NatsAccess, NodeUnderTest, rss_mb, running_nodes
from supervisor.chaos_verdict import Verdict, print_verdict
from supervisor.client import NodeClient
from supervisor.nats_cluster import NatsCluster

__all__ = ["ClusterScenario", "ClusterVerdict", "main", "run_cluster_scenario"]


class ClusterScenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A cluster chaos scenario (see the module docstring)."""

    name: str
    duration: float = 20.0
    config: str = "configs/chaos/sim-node.toml"  # the nodes' base config
    nodes: int = 2
    replicas: int = 3  # discovery.replicas of the nodes
    load: Load = Load(clients=6, deadline=30.0, lost_after=6.0)
    faults: list[ClusterFault] = []
    recovery_timeout: float = 60.0


class ClusterVerdict(Verdict):
    """What a cluster run measured (a chaos Verdict, plus discovery and the runner's RSS)."""

    discovery_exact: bool = True
    lease_expired_after: float | None = None  # a SIGKILLed node's record, gone after
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.recovered
            and self.discovery_exact
            and self.lease_expired_after is not None
        )


def _fault_action(
    cluster: NatsCluster, fault: ClusterFault, nodes: list[NodeUnderTest], timeout: float
) -> str:
    """Carry out `fault` on the cluster (blocking), wait until it has formed again, and
    say what the fault did (the evidence that it took effect)."""
    i = fault.server
    if fault.node >= 0:  # the server that node is on now (it moves when its server goes)
        found = cluster.server_of(f"sgl-node-{nodes[fault.node].instance_id}")
        if found is None:
            msg = f"node {fault.node} is connected to no server of the cluster"
            raise RuntimeError(msg)
        i = found
    server = cluster.servers[i]
    if fault.fault == "kill_server":
        cluster.kill(i)
        assert server.proc is not None
        detail = f"{server.name} exited {server.proc.returncode}, down {fault.duration:g} s"
        time.sleep(fault.duration)
        cluster.start_server(i)
    elif fault.fault == "restart_server":
        cluster.stop_server(i)
        assert server.proc is not None
        detail = f"{server.name} exited {server.proc.returncode} and started again"
        cluster.start_server(i)
    elif fault.fault == "partition_server":
        cluster.partition(i)
        time.sleep(fault.duration)
        routes = len((server.monitor("/routez") or {}).get("routes") or [])
        detail = f"{server.name} had {routes} routes at the end of the {fault.duration:g} s cut"
        cluster.heal(i)
    else:  # rolling_restart
        for each in cluster.servers:
            cluster.stop_server(each.index)
            cluster.start_server(each.index)
            cluster.wait_formed(timeout)
        detail = "restarted " + ", ".join(s.name for s in cluster.servers)
    cluster.wait_formed(timeout)
    return detail


async def _connection_error(exc: Exception) -> None:
    """The load's connection errors (its server restarting) are expected: not printed."""


class ClusterRunner(Runner):
    """Drives one cluster scenario: load from the client library, faults on the servers."""

    def __init__(
        self,
        scenario: ClusterScenario,
        cluster: NatsCluster,
        nodes: list[NodeUnderTest],
        ops: ThreadPoolExecutor,
    ) -> None:
        # the base runner's load loop (`_client`) needs only these
        self.scenario = Scenario(name=scenario.name, duration=scenario.duration, load=scenario.load)
        self.cluster_scenario = scenario
        self.cluster = cluster
        self.fabric_nodes = nodes
        self.verdict = ClusterVerdict(scenario=scenario.name, errors={}, lost_detail=[])
        self.started = time.monotonic()
        self.stop_load = asyncio.Event()
        # servers are started again from this one thread: they die with the thread that
        # started them (see nats_cluster), and it lives until the run is over
        self.ops = ops

    async def run(self) -> ClusterVerdict:
        urls = self.cluster.urls
        verdict = self.verdict
        assert isinstance(verdict, ClusterVerdict)
        verdict.rss_start_mb = verdict.rss_peak_mb = rss_mb()
        sampler = asyncio.create_task(self._sample_rss(verdict))
        async with NodeClient(
            urls[-1:] + urls[:-1],
            connect_options={"dont_randomize": True, "error_cb": _connection_error},
            direct_streams=self.scenario.load.direct_streams,
        ) as client:
            clients = [
                asyncio.create_task(self._client(client)) for _ in range(self.scenario.load.clients)
            ]
            started = self.started = time.monotonic()
            for fault in sorted(self.cluster_scenario.faults, key=lambda f: f.at):
                await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
                await self._inject(client, fault)
            await asyncio.sleep(max(0.0, started + self.scenario.duration - time.monotonic()))
            self.stop_load.set()
            await asyncio.gather(*clients)
            verdict.lease_expired_after = await self._lease_expiry(client)
        sampler.cancel()
        return verdict

    async def _inject(self, client: NodeClient, fault: ClusterFault) -> None:  # type: ignore[override]
        at = time.monotonic()
        record: dict[str, object] = {"fault": fault.fault, "server": fault.server}
        if fault.node >= 0:
            record = {"fault": fault.fault, "node": fault.node}
        record.update(injected_at=round(at - self.started, 3), ends={})
        self.verdict.faults.append(record)  # ends from now on are counted on this fault
        timeout = self.cluster_scenario.recovery_timeout
        loop = asyncio.get_running_loop()
        try:
            detail = await loop.run_in_executor(
                self.ops, _fault_action, self.cluster, fault, self.fabric_nodes, timeout
            )
            record.update(ok=True, detail=detail, formed_after=round(time.monotonic() - at, 3))
        except Exception as exc:  # noqa: BLE001 - the verdict says what failed
            record.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
            self.verdict.recovered = False
        exact = await self._discovery_exact(client, {n.instance_id for n in self.fabric_nodes}, at)
        record["discovery_exact_after"] = record["recovered_after"] = exact
        if exact is None:
            assert isinstance(self.verdict, ClusterVerdict)
            self.verdict.discovery_exact = False
            record["discovery_seen"] = sorted(await self._listed(client))

    async def _listed(self, client: NodeClient) -> set[str]:
        try:
            return {r.instance_id for r in await client.instances()}
        except Exception:  # noqa: BLE001 - JetStream electing a leader: not listed yet
            return set()

    async def _discovery_exact(
        self, client: NodeClient, expected: set[str], since: float
    ) -> float | None:
        """Seconds from `since` until discovery lists exactly `expected` and every node
        is ready; None if not within the recovery timeout."""
        deadline = since + self.cluster_scenario.recovery_timeout
        while time.monotonic() < deadline:
            ready = all(n.http("/ready")[0] == 200 for n in self.fabric_nodes if n.alive)
            if ready and await self._listed(client) == expected:
                return round(time.monotonic() - since, 3)
            await asyncio.sleep(0.2)
        return None

    async def _lease_expiry(self, client: NodeClient) -> float | None:
        """SIGKILL the last node: its record must leave discovery when its lease ends."""
        victim = self.fabric_nodes[-1]
        victim.kill()
        expected = {n.instance_id for n in self.fabric_nodes if n is not victim}
        return await self._discovery_exact(client, expected, time.monotonic())

    async def _sample_rss(self, verdict: ClusterVerdict) -> None:
        while True:
            verdict.rss_peak_mb = max(verdict.rss_peak_mb, rss_mb())
            await asyncio.sleep(0.5)


def run_cluster_scenario(scenario: ClusterScenario, workdir: Path | None = None) -> ClusterVerdict:
    """Start the cluster and the nodes, run the scenario, stop everything; the verdict."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sgl-chaos-cluster-"))

    def start(k: int) -> NodeUnderTest:
        access = NatsAccess.cluster(cluster.urls, k, scenario.replicas)
        return NodeUnderTest(scenario.config, workdir, access, f"node{k}-{secrets.token_hex(3)}")

    # the servers are started again from the ops thread and die with it (see nats_cluster):
    # it ends last, after the nodes and the cluster have stopped
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-ops") as ops,
        NatsCluster(workdir / "fabric", partitionable=True) as cluster,
        running_nodes(start, scenario.nodes, ready_timeout=120.0) as run,
    ):
        verdict = asyncio.run(ClusterRunner(scenario, cluster, run.nodes, ops).run())
    codes = [run.codes[i] for i in range(len(run.nodes))]
    if any(code not in (0, None) for code in codes[:-1]):  # the last one was SIGKILLed
        verdict.recovered = False
        verdict.kv_detail = f"node exit codes {codes}"
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a scenario file, print the verdict, exit non-zero on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.chaos_cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenario", help="a scenario TOML file (configs/chaos/cluster-*.toml)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON too")
    args = parser.parse_args(argv)
    try:
        raw = tomllib.loads(Path(args.scenario).read_text())
        scenario = msgspec.convert(raw, ClusterScenario)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        print(f"chaos_cluster: bad scenario {args.scenario}: {exc}", file=sys.stderr)
        return 2
    verdict = run_cluster_scenario(scenario)
    print_verdict(verdict)
    for fault in verdict.faults:
        print(
            f"{fault['fault']}: cluster formed again after {fault.get('formed_after')} s, "
            f"discovery exact after {fault.get('discovery_exact_after')} s"
        )
    print(
        f"a SIGKILLed node's lease expired after {verdict.lease_expired_after} s; "
        f"runner RSS {verdict.rss_start_mb} MB, peak {verdict.rss_peak_mb} MB"
    )
    if args.json:
        print(msgspec.json.encode(verdict).decode())
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
