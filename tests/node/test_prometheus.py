"""configs/prometheus/ with the real Prometheus (Debian's package; .ci/run installs it).

`promtool` checks the shipped config and rules and runs their unit tests. Then a real
Prometheus, started here with the shipped rules and the shipped scrape config pointed at
a sim node and a frontend (1 s intervals, so it takes seconds), scrapes them while
requests go through the frontend; its HTTP API must show recorded series with sensible
values, every query of the Grafana dashboard must return data, and an engine host killed
by fault injection must fire `SglNodeEngineRestarting`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.chaos import free_ports
from tests.frontend.harness import Frontend, start_frontend
from tests.node.harness import NodeProcess, start_node

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs" / "prometheus"
DASHBOARD = ROOT / "configs" / "grafana" / "sgl-node.json"
TOKEN = "prometheus-test-token"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: .ci/run installs it (apt-get install prometheus)"
    return path


def test_promtool_checks_the_shipped_config_and_rules() -> None:
    for args in (
        ["check", "config", str(CONFIGS / "prometheus.yml")],
        ["check", "rules", *map(str, sorted(CONFIGS.glob("*.rules.yml")))],
        ["test", "rules", str(CONFIGS / "tests" / "rules_test.yml")],
    ):
        result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """A real Prometheus on a free port with the shipped rules, and its HTTP API."""

    def __init__(self, tmp: Path, node_port: int, frontend_port: int) -> None:
        config = (CONFIGS / "prometheus.yml").read_text()
        for old, new in (
            ("127.0.0.1:8081", f"127.0.0.1:{node_port}"),
            ("127.0.0.1:8000", f"127.0.0.1:{frontend_port}"),
            ("scrape_interval: 5s", "scrape_interval: 1s"),
            ("evaluation_interval: 5s", "evaluation_interval: 1s"),
        ):
            assert old in config, f"the shipped prometheus.yml no longer has {old!r}"
            config = config.replace(old, new)
        for rules in CONFIGS.glob("*.rules.yml"):
            shutil.copy(rules, tmp / rules.name)  # rule_files are relative to the config
        (tmp / "prometheus.yml").write_text(config)
        self.port = free_ports()
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait(lambda: self._get("/-/ready") is not None, 30, "Prometheus ready")

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body = r.read()
        except OSError:
            return None
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now."""
        reply = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert reply is not None
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single sample's value, or None while there is none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        reply = self._get("/api/v1/alerts")
        assert reply is not None
        alerts = reply["data"]["alerts"]
        return [
            a for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"
        ]

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"prometheus exited with {self.proc.returncode}; see {self.log.name}"
                raise AssertionError(msg)
            if check():
                return
            time.sleep(0.2)
        msg = f"not within {timeout}s: {what}"
        raise AssertionError(msg)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sim node (admin and chaos on), a frontend on its NATS, and Prometheus on both."""
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "token").write_text(TOKEN)
    node = start_node(
        tmp,
        admin={"enabled": True, "token_file": str(tmp / "token")},
        chaos={"enabled": True},
    )
    started: list[Any] = [node]
    try:
        node.wait_ready(60)
        frontend = start_frontend(tmp, node.url)
        started.append(frontend)
        frontend.wait_instances(1)
        prometheus = Prometheus(tmp, node.system_port, frontend.port)
        started.append(prometheus)
        yield {"node": node, "frontend": frontend, "prometheus": prometheus}
    finally:
        for part in reversed(started):
            if isinstance(part, Prometheus):
                part.stop()
            else:
                part.kill()


def ask(frontend: Frontend, n: int) -> None:
    client = frontend.client()
    system = "\n".join(f"rule {i}: answer briefly and kindly." for i in range(12))
    for i in range(n):
        client.chat.completions.create(
            model="sim",
            messages=[
                {"role": "system", "content": system},  # shared: prefix cache hits
                {"role": "user", "content": f"question {i}"},
            ],
            max_tokens=16,
        )


def test_prometheus_scrapes_a_node_and_a_frontend_and_records_sensible_series(
    watched: dict[str, Any],
) -> None:
    prometheus: Prometheus = watched["prometheus"]
    prometheus.wait(
        lambda: len(prometheus.query('up{job=~"sgl-node|sgl-frontend"} == 1')) == 2,
        30,
        "both targets up",
    )
    ask(watched["frontend"], 8)

    def recorded(name: str) -> float:
        value = prometheus.value(name)
        return float("nan") if value is None else value

    prometheus.wait(
        lambda: (
            recorded("instance:sgl_node_completion_tokens:rate1m") > 0
            and recorded("instance:sgl_node_prefix_cache_hit:ratio_5m") > 0
            and recorded("instance:sgl_frontend_time_to_first_token_seconds:p50_1m") > 0
        ),
        30,
        "the requests in the recorded series",
    )
    tokens_per_s = recorded("instance:sgl_node_completion_tokens:rate1m")
    assert 0 < tokens_per_s <= 8 * 16  # at most every token of the 8 requests within 1 s
    assert recorded("instance:sgl_frontend_completion_tokens:rate1m") > 0
    p50 = recorded("instance:sgl_node_time_to_first_token_seconds:p50_1m")
    p99 = recorded("instance:sgl_node_time_to_first_token_seconds:p99_1m")
    assert 0 < p50 <= p99 < 5
    front_p50 = recorded("instance:sgl_frontend_time_to_first_token_seconds:p50_1m")
    front_p99 = recorded("instance:sgl_frontend_time_to_first_token_seconds:p99_1m")
    assert 0 < front_p50 <= front_p99 < 5
    assert 0 < recorded("instance:sgl_node_prefix_cache_hit:ratio_5m") <= 1
    assert 0 < recorded("instance:sgl_frontend_prefix_cache_hit:ratio_5m") <= 1
    assert 0 <= recorded("instance:sgl_node_kv_cache_usage:ratio") <= 1
    assert prometheus.value('sgl_frontend_model_instances{model="sim"}') == 1
    assert prometheus.value("sgl_node_nats_connected") == 1
    assert prometheus.value("sgl_node_restart_intensity") == 5
    assert prometheus.firing("SglNodeEngineRestarting") == []


def test_an_injected_engine_kill_fires_the_engine_restarting_alert(
    watched: dict[str, Any],
) -> None:
    prometheus: Prometheus = watched["prometheus"]
    node: NodeProcess = watched["node"]
    restarts = 'sgl_node_child_restarts_total{child="engine_host"}'
    # the counter exists at 0 before the first restart, so the first one counts
    prometheus.wait(lambda: prometheus.value(restarts) == 0, 30, "the restart counter at 0")
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.system_port}/engine/chaos",
        data=json.dumps({"fault": "kill_engine_host"}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert json.loads(reply.read())["ok"]
    prometheus.wait(lambda: bool(prometheus.firing("SglNodeEngineRestarting")), 30, "the alert")
    [alert] = prometheus.firing("SglNodeEngineRestarting")
    assert alert["labels"]["job"] == "sgl-node"
    assert alert["labels"]["instance"] == f"127.0.0.1:{node.system_port}"
    per_hour = 'instance:sgl_node_child_restarts:increase1h{child="engine_host"}'
    prometheus.wait(lambda: (prometheus.value(per_hour) or 0) >= 1, 30, "restarts per hour")
    # one kill, one restart: not a crash loop
    assert prometheus.firing("SglNodeRestartIntensityNearLimit") == []
    assert prometheus.firing("SglNodeDown") == []


def test_every_query_of_the_grafana_dashboard_returns_data(watched: dict[str, Any]) -> None:
    prometheus: Prometheus = watched["prometheus"]
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(queries) >= 8
    watched["frontend"].wait_instances(1)  # registered again after the kill test's restart
    ask(watched["frontend"], 2)  # fresh traffic in every rate window
    empty: list[tuple[str, str]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        empty = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
        if not empty:
            break
        time.sleep(0.5)
    assert empty == [], "dashboard queries without data"
