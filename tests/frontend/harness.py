"""Run the frontend (`python -m supervisor` with `node.tree = "frontend"`) as an OS process
next to real sim nodes (`sim_fleet`: a server, nodes and frontends for a test module), and
read Prometheus figures from either."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from actors.engine_host.sim import SimTokenizer, expected_output
from tests.node.harness import NatsServer, NodeProcess, free_ports, start_node


def parse_metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def node_metric(node: NodeProcess, name: str, labels: dict[str, str] | None = None) -> float:
    """A figure from a node's system /metrics."""
    _, body = node.http("/metrics")
    return parse_metric(body.decode(), name, labels)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` every 20 ms; returns the seconds it took; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    msg = f"not within {timeout}s: {what}"
    raise AssertionError(msg)


def sim_chat_ids(messages: list[dict[str, str]]) -> list[int]:
    """The token ids the frontend sends for chat messages to a sim model."""
    from messages.request import ChatMessage

    turns = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]  # type: ignore[arg-type]
    return SimTokenizer.encode(SimTokenizer.apply_chat_template(turns))


def sim_answer(prompt_ids: list[int], n: int) -> str:
    """What the sim generates for a prompt: `n` tokens of its deterministic alphabet."""
    return SimTokenizer.decode(expected_output(prompt_ids, n))


class Frontend:
    """One frontend process and how to talk to it."""

    def __init__(self, proc: NodeProcess, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **options: Any) -> openai.OpenAI:
        """The official client, unmodified; no retries of its own (we test ours)."""
        settings: dict[str, Any] = {"max_retries": 0, "timeout": 60, **options}
        return openai.OpenAI(base_url=self.base_url, api_key="not-needed", **settings)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET a path; (status, parsed JSON or text)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        text = body.decode()
        with contextlib.suppress(ValueError):
            return status, json.loads(text)
        return status, text

    def health(self) -> dict[str, Any]:
        status, body = self.get("/health")
        return body if isinstance(body, dict) else {"status": status}

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        _, text = self.get("/metrics")
        return parse_metric(text, name, labels)

    def wait_instances(self, count: int, timeout: float = 30.0) -> float:
        """Wait until discovery shows `count` live instances; the seconds it took."""

        def seen() -> bool:
            try:
                return self.health().get("instances") == count
            except OSError:  # not listening yet: the node can be ready before its frontend
                return False

        return wait_until(
            seen,
            timeout,
            f"{count} live instances in the frontend ({self.proc.log_path})",
        )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until /health answers 200 (its process must not exit meanwhile)."""
        proc = self.proc

        def healthy() -> bool:
            if proc.proc.poll() is not None:
                msg = f"frontend exited with {proc.proc.returncode}; see {proc.log_path}"
                raise RuntimeError(msg)
            try:
                return self.get("/health", timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_until(healthy, timeout, f"frontend healthy ({proc.log_path})")

    def kill(self) -> None:
        self.proc.kill()


def start_frontend(
    tmp: Path, nats_url: str, name: str = "frontend", routing: str = "kv", **sections: Any
) -> Frontend:
    """Start a frontend-only node on `nats_url` and wait until it answers /health."""
    port = free_ports()
    frontend = {"enabled": True, "port": port, "routing": routing, **sections.pop("frontend", {})}
    proc = start_node(
        tmp,
        name=name,
        embedded_nats=False,
        nats_url=nats_url,
        node={"tree": "frontend"},
        frontend=frontend,
        system={"enabled": False},
        shutdown={"drain_timeout": 2.0},
        **sections,
    )
    running = Frontend(proc, port)
    running.wait_healthy()
    return running


class SimFleet:
    """A nats-server of its own, sim nodes on it and frontends, for a test module: what
    it started is killed by `close()` (frontends, then nodes, then the server)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = NatsServer(tmp)
        self.nodes: dict[str, NodeProcess] = {}
        self.frontends: dict[str, Frontend] = {}

    def node(self, name: str, **options: Any) -> NodeProcess:
        """Start node `name` on the fleet's server (`start_node` options); not yet ready."""
        self.nodes[name] = start_node(
            self.tmp, name=name, embedded_nats=False, nats_url=self.server.url, **options
        )
        return self.nodes[name]

    def chaos_node(self, name: str, admin_token: str, **options: Any) -> NodeProcess:
        """`node`, with fault injection on and its admin subject taking `admin_token`
        (for `admin_request(node, admin_token, "chaos", ...)`)."""
        token_file = self.tmp / f"{name}-admin-token"
        token_file.write_text(admin_token)
        admin = {"enabled": True, "token_file": str(token_file)}
        return self.node(name, admin=admin, chaos={"enabled": True}, **options)

    def frontend(self, name: str = "frontend", **options: Any) -> Frontend:
        """Start frontend `name` on the fleet's server (`start_frontend` options)."""
        self.frontends[name] = start_frontend(self.tmp, self.server.url, name=name, **options)
        return self.frontends[name]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every node started so far is ready."""
        for node in self.nodes.values():
            node.wait_ready(timeout)

    def close(self) -> None:
        """Kill every frontend and node, then stop the server."""
        for frontend in self.frontends.values():
            frontend.kill()
        for node in self.nodes.values():
            node.kill()
        self.server.stop()


@contextlib.contextmanager
def sim_fleet(tmp: Path) -> Iterator[SimFleet]:
    """A `SimFleet` closed when the block ends, however it ends."""
    fleet = SimFleet(tmp)
    try:
        yield fleet
    finally:
        fleet.close()
