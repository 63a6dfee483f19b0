"""The chaos runner: `python -m supervisor.chaos SCENARIO.toml`.

Starts a node (or attaches to one), drives it with concurrent streaming clients, injects
the scenario's faults through the admin subject, and prints a verdict: requests sent,
completed, ended with an error (by code), ended with the client's own `stream_lost` (no
node held the stream any more), refused before acceptance (no responders), and **lost**
(the stream never ended: no terminal chunk and no error); each failure is also counted on
the fault injected last before it ended (see `supervisor.chaos_verdict`). Then restarts
per child, the time from each fault until the tree is all running and the instance
registered again, and whether a KV-event subscriber's view equals the engine's at the end
(sim engine). Exit 1 if anything was lost, the tree did not recover, or the KV views
differ; 0 otherwise. Scenarios ship in `configs/chaos/`.

Scenario format::

    name = "engine-host-kill"
    duration = 20.0                  # seconds of load
    config = "configs/sim.toml"      # the node's config (ports, admin, chaos are set here)
    [load]
    clients = 8                      # concurrent streams
    max_tokens = 64
    deadline = 15.0                  # per-request timeout, seconds
    [[faults]]                       # as [[chaos.faults]] in a node config, `at` from load start
    at = 5.0
    fault = "kill_engine_host"

With `nodes = 2` (or more) the runner starts its own NATS server and that many nodes on it;
admin faults go to node 0, and `[[node_faults]]` hit a whole node (`at`, `node`,
`signal = "kill"` for kill -9 of its process group or `"term"` for a SIGTERM): recovery is
then discovery listing exactly the nodes left, all running. With `restart_after = S`, a
new node takes the place of the one hit S seconds after it left discovery. `[load]
lost_after` sets how long the client library waits without news of a stream before
continuing it elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import tomllib

from messages.chaos import AdminReply, AdminRequest, Fault
from messages.codec import DecodeError, decode_json, encode_json
from messages.kv import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from messages.request import GenerateRequest, StopConditions
from supervisor.chaos_nodes import NatsAccess, NatsServer, NodeUnderTest, free_ports, running_nodes
from supervisor.chaos_verdict import Verdict, end_state, print_verdict
from supervisor.client import NodeClient, NoRespondersError

__all__ = ["Scenario", "Verdict", "free_ports", "main", "run_scenario"]

# Faults after which the tree restarts something (recovery = back to all running + ready).
_RESTARTING_FAULTS = (
    "crash_actor",
    "kill_engine_host",
    "stop_engine_host",
    "kill_scheduler",
    "restart_nats",
    "fail_probes",
)


class Load(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The clients a scenario runs."""

    clients: int = 8
    max_tokens: int = 64
    deadline: float = 15.0
    prompt: str = "chaos says hello"
    # seconds without news of a stream before the client continues it elsewhere (0: the
    # deadline, so a one-node run's stream is not given up while its node is away)
    lost_after: float = 0.0
    # the clients take chunks straight from the nodes over TCP (direct streams, as the
    # frontend does) instead of through NATS
    direct_streams: bool = False


class NodeFault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A fault to a whole node, done by the runner: `kill` is kill -9 of the node's
    process group (a machine lost), `term` a SIGTERM (a stop, drained by the node's
    `shutdown.drain_timeout`, its streams handed over at the deadline)."""

    at: float
    node: int = 1
    signal: Literal["kill", "term"] = "kill"
    # seconds after it left discovery until a new node (a new instance id) takes its
    # place; none: it stays away until the end
    restart_after: float | None = None


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A chaos scenario (see the module docstring)."""

    name: str
    duration: float = 20.0
    config: str = "configs/sim.toml"
    load: Load = Load()
    faults: list[Fault] = []
    recovery_timeout: float = 120.0
    # several nodes share one NATS server the runner starts; admin faults go to node 0
    nodes: int = 1
    node_faults: list[NodeFault] = []

    def __post_init__(self) -> None:
        if self.nodes < 1:
            msg = f"nodes must be at least 1, got {self.nodes}"
            raise ValueError(msg)
        for fault in self.node_faults:
            if not 0 <= fault.node < self.nodes:
                msg = f"node_faults: node {fault.node} is not one of the {self.nodes} nodes"
                raise ValueError(msg)
            if fault.restart_after is not None and fault.restart_after < 0:
                msg = f"node_faults: restart_after must be >= 0, got {fault.restart_after}"
                raise ValueError(msg)
        if self.node_faults and self.nodes < 2:  # node 0 would take NATS down with it
            msg = "node_faults need nodes >= 2 (the runner's own NATS server outlives them)"
            raise ValueError(msg)


def _accepted(message: Any) -> bool:
    try:
        return decode_json(message.data, AdminReply).ok
    except DecodeError:
        return False


def _flatten(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, dict[str, Any]]:
    out = {}
    for row in rows:
        path = f"{prefix}{row['id']}"
        out[path] = row
        out.update(_flatten(row.get("children", []), path + "/"))
    return out


class Runner:
    """Drives one scenario against its nodes (admin faults go to the first)."""

    def __init__(
        self,
        scenario: Scenario,
        nodes: list[NodeUnderTest],
        token: str,
        start: Callable[[int], NodeUnderTest] | None = None,
    ) -> None:
        self.scenario = scenario
        self.nodes = nodes  # a restarted node replaces its predecessor in this list
        self.start = start
        self.node = nodes[0]
        self.down: set[int] = set()  # nodes a node fault took away
        self.token = token
        self.verdict = Verdict(scenario=scenario.name)
        self.started = time.monotonic()
        self.kv: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
        self.stop_load = asyncio.Event()

    def live(self) -> list[NodeUnderTest]:
        """The nodes no node fault has taken away."""
        return [node for i, node in enumerate(self.nodes) if i not in self.down]

    async def run(self) -> Verdict:
        async with NodeClient(
            self.node.url,
            connect_options={"max_reconnect_attempts": -1},
            direct_streams=self.scenario.load.direct_streams,
        ) as client:
            watcher = asyncio.create_task(self._watch_kv(client))
            clients = [
                asyncio.create_task(self._client(client)) for _ in range(self.scenario.load.clients)
            ]
            started = self.started = time.monotonic()
            faults: list[Fault | NodeFault] = [*self.scenario.faults, *self.scenario.node_faults]
            for fault in sorted(faults, key=lambda f: f.at):
                await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
                if isinstance(fault, NodeFault):
                    await self._hit_node(client, fault)
                else:
                    await self._inject(client, fault)
            await asyncio.sleep(max(0.0, started + self.scenario.duration - time.monotonic()))
            self.stop_load.set()
            await asyncio.gather(*clients)
            await self._wait_recovered(time.monotonic(), record=None)
            await asyncio.sleep(1.0)  # let the last KV events arrive
            await self._compare_kv(client)
            watcher.cancel()
        for i, node in enumerate(self.nodes):
            status, tree = node.http("/tree") if i not in self.down else (0, None)
            if status == 200 and tree is not None:
                prefix = f"node{i}:" if len(self.nodes) > 1 else ""
                for path, row in _flatten(tree["children"]).items():
                    if row["restarts"]:
                        self.verdict.restarts[prefix + path] = row["restarts"]
        return self.verdict

    async def _client(self, client: NodeClient) -> None:
        load = self.scenario.load
        while not self.stop_load.is_set():
            request = GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompt=f"{load.prompt} {uuid.uuid4().hex[:6]}",
                stop=StopConditions(max_tokens=load.max_tokens),
                timeout=load.deadline,
            )
            self.verdict.sent += 1
            last = None
            chunks = 0
            why = ""
            sent_at = time.monotonic() - self.started
            try:
                # A request lost on its way to the node (sent as NATS is cut) ends with the
                # client's own `stream_lost`, `lost_after` seconds after it last heard of it
                # (plus one resume round, ~3 s). The guard around it only catches a client
                # that never ends a stream; it must not race that verdict.
                async with asyncio.timeout(load.deadline + 15.0):
                    async for chunk in client.generate(
                        request,
                        idle_timeout=load.deadline + 5.0,
                        lost_after=load.lost_after or load.deadline,
                        retries=1000,  # a refused or unserved request waits for its deadline
                    ):
                        last = chunk
                        chunks += 1
            except NoRespondersError:
                # The node is away from NATS (cut, restart): the client is told at once.
                self._count("refused:no_responders")
                await asyncio.sleep(0.2)
                continue
            except (TimeoutError, Exception) as exc:  # noqa: BLE001 - anything but a terminal chunk
                last = None
                why = f"{type(exc).__name__}: {exc}"
            if last is None or last.finish_reason is None:
                self._count("lost")
                self.verdict.lost_detail.append(
                    {
                        "sent_at": round(sent_at, 3),
                        "gave_up_at": round(time.monotonic() - self.started, 3),
                        "chunks": chunks,
                        "why": why or "the stream ended without a finish reason",
                        "request_id": request.request_id,
                    }
                )
            elif last.finish_reason in ("stop", "length"):
                self._count("completed")
                self.verdict.migrated += last.migrations > 0
            else:
                code = last.error.code if last.error else last.finish_reason
                self._count(end_state(code, chunks))
                await asyncio.sleep(0.2)  # a failed node is not hammered while it restarts

    def _count(self, state: str) -> None:
        self.verdict.count(state, time.monotonic() - self.started)

    async def _inject(self, client: NodeClient, fault: Fault) -> None:
        assert client.nc is not None
        request = AdminRequest(token=self.token, op="chaos", args=msgspec.to_builtins(fault))
        restarts_before = self._restarts()
        at = time.monotonic()
        record: dict[str, Any] = {
            "fault": fault.fault,
            "target": fault.target,
            "injected_at": round(at - self.started, 3),
            "ends": {},
        }
        self.verdict.faults.append(record)  # ends from now on are counted on this fault
        subject = f"{client.base}.admin.{self.node.instance_id}"
        answer = asyncio.ensure_future(client.nc.request(subject, encode_json(request), timeout=15))
        # A fault that restarts something has taken effect once a restart count moved (its
        # reply may never come: a crash of the fabric takes the node's NATS link along);
        # for the others, recovery is measured from the end of the fault's duration.
        restarted = False
        if fault.fault in _RESTARTING_FAULTS:
            restarted = await self._wait_restart(at, restarts_before, answer)
        else:
            await asyncio.sleep(fault.duration)
        if restarted:
            await self._wait_recovered(at, record)
        try:
            reply = decode_json((await answer).data, AdminReply)
            record.update(ok=reply.ok, detail=reply.message)
        except Exception as exc:  # noqa: BLE001
            if restarted:
                why = f"no reply ({type(exc).__name__}), but the restart it causes is in the tree"
                record.update(ok=True, detail=why)
            else:
                record.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
        if not restarted:
            await self._wait_recovered(at, record)

    async def _hit_node(self, client: NodeClient, fault: NodeFault) -> None:
        """kill -9 or SIGTERM one node; then wait until discovery lists exactly the nodes
        left (a killed node's lease expires, a stopped one deregisters) and they run."""
        node = self.nodes[fault.node]
        at = time.monotonic()
        record: dict[str, Any] = {
            "fault": f"{fault.signal}_node",
            "target": f"node {fault.node}",
            "injected_at": round(at - self.started, 3),
            "ends": {},
        }
        self.verdict.faults.append(record)  # ends from now on are counted on this fault
        self.down.add(fault.node)
        if fault.signal == "kill":
            await asyncio.to_thread(node.kill)
            record.update(ok=True, detail="kill -9 of its process group")
        else:
            node.proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = await asyncio.to_thread(node.proc.wait, 120)
            except subprocess.TimeoutExpired:
                code = None
            took = round(time.monotonic() - at, 3)
            record.update(ok=code == 0, detail=f"exit code {code} after {took} s")
        await self._wait_discovery(client, at, record)
        await self._wait_recovered(at, record)
        if fault.restart_after is not None and self.start is not None:
            await asyncio.sleep(fault.restart_after)
            await self._restart_node(client, fault.node, record)

    async def _restart_node(self, client: NodeClient, i: int, record: dict[str, Any]) -> None:
        """A new node in slot `i` (a machine replaced): ready, then listed in discovery
        beside the others."""
        assert self.start is not None
        at = time.monotonic()
        node = await asyncio.to_thread(self.start, i)
        self.nodes[i] = node
        self.down.discard(i)
        try:
            await asyncio.to_thread(node.wait_ready, self.scenario.recovery_timeout)
        except RuntimeError as exc:
            record["restarted_after"] = None
            record["detail"] += f"; restart failed: {exc}"
            self.verdict.recovered = False
            return
        back: dict[str, Any] = {}
        await self._wait_discovery(client, at, back)
        record["restarted_after"] = back.get("discovery_exact_after")

    async def _wait_discovery(
        self, client: NodeClient, since: float, record: dict[str, Any]
    ) -> None:
        want = {node.instance_id for node in self.live()}
        deadline = since + self.scenario.recovery_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # a NATS hiccup: ask again
                if {r.instance_id for r in await client.instances()} == want:
                    record["discovery_exact_after"] = round(time.monotonic() - since, 3)
                    return
            await asyncio.sleep(0.2)
        self.verdict.recovered = False
        record["discovery_exact_after"] = None

    def _restarts(self) -> int:
        status, tree = self.node.http("/tree")
        return (
            sum(r["restarts"] for r in _flatten(tree["children"]).values()) if status == 200 else -1
        )

    async def _wait_restart(self, since: float, before: int, answer: asyncio.Future[Any]) -> bool:
        """Whether a restart count moved (before the recovery timeout, and unless the
        node answered that the fault was not injected)."""
        deadline = since + self.scenario.recovery_timeout
        while time.monotonic() < deadline:
            if self._restarts() > before:
                return True
            if answer.done() and (answer.exception() or not _accepted(answer.result())):
                return False
            await asyncio.sleep(0.05)
        return False

    async def _wait_recovered(self, since: float, record: dict[str, Any] | None) -> None:
        deadline = since + self.scenario.recovery_timeout
        while time.monotonic() < deadline:
            if all(_all_running(node) for node in self.live()):
                if record is not None:
                    record["recovered_after"] = round(time.monotonic() - since, 3)
                return
            await asyncio.sleep(0.1)
        self.verdict.recovered = False
        if record is not None:
            record["recovered_after"] = None

    async def _watch_kv(self, client: NodeClient) -> None:
        async for batch in client.watch("kv-events"):
            if not isinstance(batch, KvEventBatch):
                continue
            if batch.instance_id not in {node.instance_id for node in self.nodes}:
                continue  # another fabric's (a node that replaced one of ours is ours)
            view = self.kv[batch.instance_id, batch.dp_rank]
            for event in batch.events:
                if isinstance(event, AllBlocksCleared):
                    view.clear()
                elif isinstance(event, BlockStored):
                    view.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    view.difference_update(event.block_hashes)

    async def _compare_kv(self, client: NodeClient) -> None:
        """Each live node's engine cache against what its KV events told a subscriber."""
        assert client.nc is not None
        diffs, matched = [], 0
        for node in self.live():
            request = AdminRequest(token=self.token, op="kv_view")
            try:
                msg = await client.nc.request(
                    f"{client.base}.admin.{node.instance_id}", encode_json(request), timeout=15
                )
                reply = decode_json(msg.data, AdminReply)
            except Exception as exc:  # noqa: BLE001
                self.verdict.kv_detail = f"kv_view failed: {exc}"
                return
            if not reply.ok:
                self.verdict.kv_detail = f"not comparable: {reply.message}"
                return
            for rank, engine_ids in enumerate(reply.data["ranks"]):
                seen = self.kv.get((node.instance_id, rank), set())
                matched += len(seen)
                if set(engine_ids) != seen:
                    diffs.append(
                        f"{node.instance_id} rank {rank}: engine {len(engine_ids)} blocks, "
                        f"subscriber {len(seen)}"
                    )
        self.verdict.kv_view_equal = not diffs
        self.verdict.kv_detail = "; ".join(diffs) or f"{matched} blocks match"


def _all_running(node: NodeUnderTest) -> bool:
    """The node is ready and every child of its tree is running."""
    status, tree = node.http("/tree")
    ready, _ = node.http("/ready")
    if status != 200 or ready != 200:
        return False
    return all(r["state"] == "running" for r in _flatten(tree["children"]).values())


def run_scenario(
    scenario: Scenario,
    workdir: Path | None = None,
    on_ready: Callable[[NodeUnderTest], None] | None = None,
) -> Verdict:
    """Start the scenario's node(s), run it against them, stop them; return the verdict.
    `on_ready` is called with the first node once all are ready (e.g. to watch its
    resources)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sgl-chaos-"))
    token = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        # several nodes share a server of the runner's (a node's embedded one dies with it)
        nats = (
            stack.enter_context(NatsServer(workdir, store="nats")) if scenario.nodes > 1 else None
        )

        homes: collections.Counter[int] = collections.Counter()

        def start(i: int) -> NodeUnderTest:
            access = NatsAccess((nats.url,)) if nats else NatsAccess()
            homes[i] += 1  # a restarted node gets a directory (config, log) of its own
            home = workdir / f"node{i}" if homes[i] == 1 else workdir / f"node{i}-{homes[i]}"
            home = home if nats else workdir
            instance_id = f"chaos{secrets.token_hex(4)}"
            return NodeUnderTest(
                scenario.config, home, access, instance_id, name="node", admin_token=token
            )

        run = stack.enter_context(running_nodes(start, scenario.nodes, ready_timeout=600.0))
        if on_ready is not None:
            on_ready(run.nodes[0])
        runner = Runner(scenario, run.nodes, token, start)
        run.gone = runner.down  # a node a node fault took away is not stopped again
        verdict = asyncio.run(runner.run())
    for i, code in run.codes.items():
        if code != 0:
            verdict.recovered = False
            verdict.kv_detail += f"; node {i} exit code {code}"
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a scenario file, print the verdict, exit non-zero on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenario", help="a scenario TOML file (see configs/chaos/)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON too")
    args = parser.parse_args(argv)
    try:
        scenario = msgspec.convert(tomllib.loads(Path(args.scenario).read_text()), Scenario)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        print(f"chaos: bad scenario {args.scenario}: {exc}", file=sys.stderr)
        return 2
    verdict = run_scenario(scenario)
    print_verdict(verdict)
    if args.json:
        print(msgspec.json.encode(verdict).decode())
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
