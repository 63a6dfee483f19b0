"""Run real nodes (`python -m supervisor CONFIG`) as OS processes for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats

from messages.chaos import AdminReply, AdminRequest
from messages.codec import DecodeError, decode_json, encode_json
from messages.kv import KvEventBatch
from messages.metrics import LoadMetrics
from supervisor.chaos import free_ports  # the one way to pick ports (also for other test modules)
from supervisor.chaos_nodes import NatsServer as NatsServer  # noqa: PLC0414 - re-exported
from supervisor.client_replies import in_place

ROOT = Path(__file__).resolve().parent.parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config from {"section.sub": {key: value}}."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class NodeProcess:
    """One running node: its process, ports, and its JSON log lines."""

    def __init__(
        self,
        config: Path,
        nats_port: int,
        system_port: int,
        kv_port: int,
        log_path: Path,
        cpus: set[int] | None = None,
    ) -> None:
        self.config = config
        self.nats_port = nats_port
        self.system_port = system_port
        self.kv_port = kv_port
        self.log_path = log_path
        self.records: list[dict[str, Any]] = []
        self.ready_history: list[tuple[float, int]] = []  # (unix time, /ready status) polls
        self._cond = threading.Condition()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", str(config), "--log-format", "json"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        if cpus:  # the node, and the processes it starts later, on these cores only
            os.sched_setaffinity(self.proc.pid, cpus)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("w") as sink:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                sink.write(line)
                sink.flush()
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"event": "unparsed", "line": line.rstrip()}
                with self._cond:
                    self.records.append(record)
                    self._cond.notify_all()

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, count: int = 1
    ) -> list[dict[str, Any]]:
        """Wait until `count` log records satisfy `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self.records if predicate(r)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    msg = f"log condition not met in {timeout}s; see {self.log_path}"
                    raise TimeoutError(msg)
                self._cond.wait(min(remaining, 0.5))

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET a system HTTP route."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.system_port}{path}", timeout=timeout
            ) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for /ready to answer 200 (registered and the engine healthy)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"node exited with {self.proc.returncode} while starting; see {self.log_path}"
                raise RuntimeError(msg)
            with contextlib.suppress(OSError):
                status, _ = self.http("/ready", timeout=2)
                self.ready_history.append((time.time(), status))
                if status == 200:
                    return
            time.sleep(0.1)
        msg = f"node not ready in {timeout}s; see {self.log_path}"
        raise TimeoutError(msg)

    @property
    def instance_id(self) -> str:
        record = self.wait_log(lambda r: r.get("event") == "starting node", timeout=30)[0]
        return str(record["instance_id"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the node and wait for it to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        """Last resort at teardown: the node's whole session."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def start_node(
    tmp_path: Path,
    backend: str = "sim",
    embedded_nats: bool = True,
    nats_url: str = "",
    dp_size: int = 1,
    name: str = "node",
    extra_toml: str = "",
    cpus: set[int] | None = None,
    **sections: dict[str, Any],
) -> NodeProcess:
    """Start a node with free ports and a private NATS store; extra sections override."""
    nats_port = free_ports()
    system_port = free_ports()
    kv_port = free_ports(2 * dp_size)  # publishers and their replay sockets
    config: dict[str, dict[str, Any]] = {
        "engine": {"backend": backend, "dp_size": dp_size, "kv_events_port": kv_port},
        "nats": {
            "embedded": embedded_nats,
            "port": nats_port,
            "data_dir": str(tmp_path / f"{name}-nats"),
        },
        "system": {"port": system_port},
        "shutdown": {"drain_timeout": 10.0},
        "discovery": {"lease_ttl": 10.0, "heartbeat": 1.0},
    }
    if not embedded_nats:
        config["nats"] = {"embedded": False, "url": [nats_url]}
        nats_port = int(nats_url.rsplit(":", 1)[1])
    for section, values in sections.items():
        key = section.replace("__", ".")
        config.setdefault(key, {}).update(values)
    path = write_config(tmp_path / f"{name}.toml", config)
    if extra_toml:
        path.write_text(path.read_text() + "\n" + extra_toml)
    return NodeProcess(path, nats_port, system_port, kv_port, tmp_path / f"{name}.log", cpus)


def process_title(pid: int) -> str:
    """A process's title (its command line's first word, as SGLang's children set it);
    "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sim_node_on_own_nats(tmp_path: Path) -> tuple[NatsServer, NodeProcess]:
    """A nats-server of its own (for a test to stop, restart or outlive) and a sim node on
    it at 50 ms per decode step, so streams last long enough to cut into. Not yet ready."""
    server = NatsServer(tmp_path)
    try:
        node = start_node(
            tmp_path,
            embedded_nats=False,
            nats_url=server.url,
            engine__sim={"decode_time_per_step": 0.05},
        )
    except BaseException:
        server.stop()
        raise
    return server, node


async def admin_request(node: NodeProcess, token: str, op: str, **args: Any) -> AdminReply:
    """One admin op on a node's admin subject (admin must be enabled with `token`)."""
    nc = await nats.connect(node.url)
    try:
        msg = await nc.request(
            f"dynamo.backend.admin.{node.instance_id}",
            encode_json(AdminRequest(token=token, op=op, args=args)),  # type: ignore[arg-type]
            timeout=20,
        )
        return decode_json(msg.data, AdminReply)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def watching(url: str, what: str) -> AsyncIterator[list[Any]]:
    """Collect a node's KV event batches (`kv-events`) or load metrics (`metrics`) into a
    list, on a subscription the server has confirmed (flushed) before the body runs: what
    is published after entry is never missed, with no sleep to let it settle."""
    from supervisor.client import NodeClient

    base = NodeClient(url).base
    subject, kind = {
        "kv-events": (f"{base}.kv_events", KvEventBatch),
        "metrics": (f"{base}.load_metrics", LoadMetrics),
    }[what]
    items: list[Any] = []

    async def on(msg: Any) -> None:
        with contextlib.suppress(DecodeError):
            items.append(decode_json(msg.data, kind))

    nc = await nats.connect(url)
    try:
        await nc.subscribe(subject, cb=on)
        await in_place(nc)
        yield items
    finally:
        await nc.close()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` every 50 ms on the running loop; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            msg = f"not within {timeout} s: {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)
