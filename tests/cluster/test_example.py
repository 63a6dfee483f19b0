"""The three-node, three-server example (`configs/cluster-3servers/`) starts as the README
shows, serves, and stops leaving nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.supervision.children import pid_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "cluster-3servers"
URLS = "nats://127.0.0.1:4301,nats://127.0.0.1:4302,nats://127.0.0.1:4303"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _python(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        start_new_session=True,
        **kwargs,
    )


def test_the_three_server_example_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    cluster = _python(
        "-m",
        "supervisor.nats_cluster",
        *("--ports", "4301,4302,4303", "--dir", str(tmp_path / "fabric")),
        stdout=subprocess.PIPE,
    )
    nodes: list[subprocess.Popen[str]] = []
    try:
        assert cluster.stdout is not None
        assert cluster.stdout.readline().startswith("NATS cluster formed: nats://127.0.0.1:4301")
        for name in "abc":
            log = (tmp_path / f"node-{name}.log").open("w")
            nodes.append(
                _python("-m", "supervisor", str(EXAMPLE / f"node-{name}.toml"), stderr=log)
            )
        ports = (8181, 8182, 8183)
        assert wait_until(lambda: all(_ready(p) for p in ports), timeout=120), [
            (p, _ready(p)) for p in ports
        ]
        listed = subprocess.run(
            [sys.executable, "-m", "supervisor.client", "--nats", URLS, "instances"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == [
            "node-a",
            "node-b",
            "node-c",
        ]
        answer = subprocess.run(
            [sys.executable, "-m", "supervisor.client", "--nats", URLS, "generate", "hello"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert answer.returncode == 0, answer.stderr
        assert "[length;" in answer.stderr or "[stop;" in answer.stderr
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        assert [node.wait(60) for node in nodes] == [0, 0, 0]
        server_pids = _server_pids(tmp_path / "fabric")
        assert len(server_pids) == 3
        cluster.send_signal(signal.SIGTERM)
        assert cluster.wait(30) == 0
        assert wait_until(lambda: not any(pid_alive(p) for p in server_pids), timeout=10)
    finally:
        for proc in [*nodes, cluster]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _server_pids(workdir: Path) -> list[int]:
    """The nats-servers running with a config file from `workdir`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                if "nats-server" in cmdline and str(workdir) in cmdline:
                    pids.append(int(entry.name))
    return pids
