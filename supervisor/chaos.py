"""The chaos runner: `python -m supervisor.chaos SCENARIO.toml`.

Starts a node (or attaches to one), drives it with concurrent streaming clients, injects
the scenario's faults through the admin subject, and prints a verdict: requests sent,
completed, ended with an error (by code; `stream_lost` is the client's own verdict on a
request no node holds any more) and **lost** (the stream never ended: no terminal chunk
and no error), restarts per child, the time from each fault until the tree is all running and
the instance registered again, and whether a KV-event subscriber's view equals the
engine's at the end (sim engine). Exit 1 if anything was lost, the tree did not recover,
or the KV views differ; 0 otherwise. Scenarios ship in `configs/chaos/`.

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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import tomllib

from messages.chaos import AdminReply, AdminRequest, Fault
from messages.codec import decode_json, encode_json
from messages.kv import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from messages.request import GenerateRequest, StopConditions
from supervisor.client import NodeClient, NoRespondersError

__all__ = ["Scenario", "free_ports", "main", "run_scenario"]

ROOT = Path(__file__).resolve().parent.parent
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
    # silence (no node holding the stream) before the client continues it elsewhere;
    # 0: the deadline
    lost_after: float = 0.0


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A chaos scenario (see the module docstring)."""

    name: str
    duration: float = 20.0
    config: str = "configs/sim.toml"
    load: Load = Load()
    faults: list[Fault] = []
    recovery_timeout: float = 120.0


class Verdict(msgspec.Struct):
    """What a run measured."""

    scenario: str
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = {}
    lost: int = 0
    continued: int = 0  # streams that went through a seam (continued elsewhere) and ended
    lost_detail: list[dict[str, Any]] = []  # when each lost request started and how it ended
    faults: list[dict[str, Any]] = []
    restarts: dict[str, int] = {}
    kv_view_equal: bool | None = None
    kv_detail: str = ""
    recovered: bool = True

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.recovered and self.kv_view_equal is not False


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: 32768)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int = 1) -> int:
    """A port p such that p .. p+count-1 are all free now (a node's port ranges: the KV
    publishers and their replay sockets), chosen below the kernel's ephemeral range: a
    port from that range may be taken as the source port of any outgoing connection
    while the node is not bound to it, and an engine restarted then cannot bind it
    (SGLang's scheduler fails and kills its process tree: a SIGKILL from nowhere)."""
    low, high = 10000, _ephemeral_low() - count
    for _ in range(500):
        base = random.randint(low, high)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    msg = f"no free range of {count} ports in {low}..{high + count - 1}"
    raise RuntimeError(msg)


class NodeUnderTest:
    """A node started for the run, with chaos and admin on."""

    def __init__(self, scenario: Scenario, workdir: Path, token: str) -> None:
        base = tomllib.loads((ROOT / scenario.config).read_text()) if scenario.config else {}
        self.nats_port, self.system_port = free_ports(), free_ports()
        dp = base.get("engine", {}).get("dp_size", 1)
        # the publishers on kv_events_port + rank, their replay sockets on + dp_size + rank
        base.setdefault("engine", {})["kv_events_port"] = free_ports(2 * dp)
        base["nats"] = {
            **base.get("nats", {}),
            "embedded": True,
            "port": self.nats_port,
            "data_dir": str(workdir / "nats"),
        }
        base["system"] = {"port": self.system_port}
        base["admin"] = {"enabled": True, "token_env": "SGL_NODE_CHAOS_TOKEN"}
        base["chaos"] = {"enabled": True, "seed": 1}
        base.setdefault("node", {})["instance_id"] = f"chaos{secrets.token_hex(4)}"
        self.instance_id = base["node"]["instance_id"]
        config = workdir / "node.toml"
        config.write_text(_toml(base))
        self.log = (workdir / "node.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", str(config), "--log-format", "json"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env={**os.environ, "PYTHONPATH": str(ROOT), "SGL_NODE_CHAOS_TOKEN": token},
            start_new_session=True,
        )
        self.url = f"nats://127.0.0.1:{self.nats_port}"

    def http(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.system_port}{path}", timeout=3
            ) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except OSError:
            return 0, None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


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


def _flatten(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, dict[str, Any]]:
    out = {}
    for row in rows:
        path = f"{prefix}{row['id']}"
        out[path] = row
        out.update(_flatten(row.get("children", []), path + "/"))
    return out


class Runner:
    """Drives one scenario against one node."""

    def __init__(self, scenario: Scenario, node: NodeUnderTest, token: str) -> None:
        self.scenario = scenario
        self.node = node
        self.token = token
        self.verdict = Verdict(scenario=scenario.name, errors={}, lost_detail=[])
        self.started = time.monotonic()
        self.kv: dict[int, set[int]] = collections.defaultdict(set)
        self.stop_load = asyncio.Event()

    async def run(self) -> Verdict:
        async with NodeClient(
            self.node.url, connect_options={"max_reconnect_attempts": -1}
        ) as client:
            watcher = asyncio.create_task(self._watch_kv(client))
            clients = [
                asyncio.create_task(self._client(client)) for _ in range(self.scenario.load.clients)
            ]
            started = self.started = time.monotonic()
            for fault in sorted(self.scenario.faults, key=lambda f: f.at):
                await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
                await self._inject(client, fault)
            await asyncio.sleep(max(0.0, started + self.scenario.duration - time.monotonic()))
            self.stop_load.set()
            await asyncio.gather(*clients)
            await self._wait_recovered(time.monotonic(), record=None)
            await asyncio.sleep(1.0)  # let the last KV events arrive
            await self._compare_kv(client)
            watcher.cancel()
        status, tree = self.node.http("/tree")
        if status == 200:
            for path, row in _flatten(tree["children"]).items():
                if row["restarts"]:
                    self.verdict.restarts[path] = row["restarts"]
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
                    ):
                        last = chunk
                        chunks += 1
            except NoRespondersError:
                # The node is away from NATS (cut, restart): the client is told at once.
                self.verdict.errors["no_responders"] = (
                    self.verdict.errors.get("no_responders", 0) + 1
                )
                await asyncio.sleep(0.2)
                continue
            except (TimeoutError, Exception) as exc:  # noqa: BLE001 - anything but a terminal chunk
                last = None
                why = f"{type(exc).__name__}: {exc}"
            if last is None or last.finish_reason is None:
                self.verdict.lost += 1
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
                self.verdict.completed += 1
                self.verdict.continued += last.migrations > 0
            else:
                code = last.error.code if last.error else last.finish_reason
                self.verdict.errors[code] = self.verdict.errors.get(code, 0) + 1
                await asyncio.sleep(0.2)  # a failed node is not hammered while it restarts

    async def _inject(self, client: NodeClient, fault: Fault) -> None:
        assert client.nc is not None
        request = AdminRequest(token=self.token, op="chaos", args=msgspec.to_builtins(fault))
        restarts_before = self._restarts()
        at = time.monotonic()
        record: dict[str, Any] = {"fault": fault.fault, "target": fault.target}
        try:
            msg = await client.nc.request(
                f"{client.base}.admin.{self.node.instance_id}", encode_json(request), timeout=15
            )
            reply = decode_json(msg.data, AdminReply)
            record.update(ok=reply.ok, detail=reply.message)
        except Exception as exc:  # noqa: BLE001
            record.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
        self.verdict.faults.append(record)
        # A fault that restarts something has taken effect once a restart count moved; for
        # the others, recovery is measured from the end of the fault's duration.
        if fault.fault in _RESTARTING_FAULTS and record.get("ok"):
            await self._wait_restart(at, restarts_before)
        else:
            await asyncio.sleep(fault.duration)
        await self._wait_recovered(at, record)

    def _restarts(self) -> int:
        status, tree = self.node.http("/tree")
        return (
            sum(r["restarts"] for r in _flatten(tree["children"]).values()) if status == 200 else -1
        )

    async def _wait_restart(self, since: float, before: int) -> None:
        deadline = since + self.scenario.recovery_timeout
        while time.monotonic() < deadline:
            now = self._restarts()
            if now > before:
                return
            await asyncio.sleep(0.05)

    async def _wait_recovered(self, since: float, record: dict[str, Any] | None) -> None:
        deadline = since + self.scenario.recovery_timeout
        while time.monotonic() < deadline:
            status, tree = self.node.http("/tree")
            ready, _ = self.node.http("/ready")
            if status == 200 and ready == 200:
                rows = _flatten(tree["children"])
                if all(r["state"] == "running" for r in rows.values()):
                    if record is not None:
                        record["recovered_after"] = round(time.monotonic() - since, 3)
                    return
            await asyncio.sleep(0.1)
        self.verdict.recovered = False
        if record is not None:
            record["recovered_after"] = None

    async def _watch_kv(self, client: NodeClient) -> None:
        async for batch in client.watch("kv-events"):
            if not isinstance(batch, KvEventBatch) or batch.instance_id != self.node.instance_id:
                continue
            view = self.kv[batch.dp_rank]
            for event in batch.events:
                if isinstance(event, AllBlocksCleared):
                    view.clear()
                elif isinstance(event, BlockStored):
                    view.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    view.difference_update(event.block_hashes)

    async def _compare_kv(self, client: NodeClient) -> None:
        assert client.nc is not None
        request = AdminRequest(token=self.token, op="kv_view")
        try:
            msg = await client.nc.request(
                f"{client.base}.admin.{self.node.instance_id}", encode_json(request), timeout=15
            )
            reply = decode_json(msg.data, AdminReply)
        except Exception as exc:  # noqa: BLE001
            self.verdict.kv_detail = f"kv_view failed: {exc}"
            return
        if not reply.ok:
            self.verdict.kv_detail = f"not comparable: {reply.message}"
            return
        diffs = []
        for rank, engine_ids in enumerate(reply.data["ranks"]):
            seen = self.kv.get(rank, set())
            if set(engine_ids) != seen:
                diffs.append(
                    f"rank {rank}: engine {len(engine_ids)} blocks, subscriber {len(seen)}"
                )
        self.verdict.kv_view_equal = not diffs
        self.verdict.kv_detail = (
            "; ".join(diffs) or f"{sum(len(v) for v in self.kv.values())} blocks match"
        )


def print_verdict(verdict: Verdict) -> None:
    """The verdict as a table."""
    rows = [
        ("scenario", verdict.scenario),
        ("requests sent", verdict.sent),
        ("completed", verdict.completed),
        (
            "ended with an error",
            ", ".join(f"{k}: {v}" for k, v in sorted(verdict.errors.items())) or "0",
        ),
        ("LOST", verdict.lost),
        ("continued across a seam", verdict.continued),
        *(
            (
                f"  lost {d['request_id'][:8]}",
                f"sent at {d['sent_at']} s, {d['chunks']} chunks, {d['why']}",
            )
            for d in verdict.lost_detail
        ),
        ("restarts", ", ".join(f"{k}: {v}" for k, v in sorted(verdict.restarts.items())) or "none"),
        ("KV view equal", f"{verdict.kv_view_equal} ({verdict.kv_detail})"),
    ]
    for fault in verdict.faults:
        state = "ok" if fault.get("ok") else "FAILED"
        recovered = fault.get("recovered_after")
        rows.append(
            (
                f"fault {fault['fault']}",
                f"{state}; recovered after {recovered} s; {fault.get('detail', '')}",
            )
        )
    rows.append(("verdict", "PASS" if verdict.passed else "FAIL"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def run_scenario(
    scenario: Scenario,
    workdir: Path | None = None,
    on_ready: Callable[[NodeUnderTest], None] | None = None,
) -> Verdict:
    """Start a node, run the scenario against it, stop the node; return the verdict.
    `on_ready` is called with the node once it is ready (e.g. to watch its resources)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="sgl-chaos-"))
    token = secrets.token_hex(16)
    node = NodeUnderTest(scenario, workdir, token)
    verdict = Verdict(scenario=scenario.name, errors={}, recovered=False)
    try:
        deadline = time.monotonic() + 600
        while node.http("/ready")[0] != 200:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                msg = f"the node did not start; see {workdir / 'node.log'}"
                raise RuntimeError(msg)
            time.sleep(0.2)
        if on_ready is not None:
            on_ready(node)
        verdict = asyncio.run(Runner(scenario, node, token).run())
    finally:
        code = node.stop()
    if code != 0:
        verdict.recovered = False
        verdict.kv_detail += f"; node exit code {code}"
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
