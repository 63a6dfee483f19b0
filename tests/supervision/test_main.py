"""`python -m supervisor`: config errors, --check, signals, escalation, no process left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.supervision.children import pid_alive, wait_until


def run_cli(repo: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[engine]\ndp_size = "two"', 'engine.dp_size: expected int, got str "two"'),
        ("[engine]\ncolour = 1", "engine.colour: unknown key"),
        ("[handlers]\ncount = 0", "handlers.count: expected int >= 1, got 0"),
        (
            '[node]\nmode = "turbo"',
            'node.mode: expected one of aggregated, prefill, decode, embedding, got "turbo"',
        ),
        ("[system]\nport = 4222", "system.port: port 4222 is also used by nats.port"),
        (  # a dp_size whose KV ports reach system.port: the dp_size is what changed
            "[engine]\ndp_size = 1263",
            "engine.dp_size: port 8081 of engine.kv_events_port (replay, rank 1261) is also "
            "used by system.port",
        ),
        ("[engine", "not valid TOML"),
    ],
)
def test_a_bad_config_exits_2_naming_the_key_and_starts_nothing(
    repo_root: Path, tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = run_cli(repo_root, str(config))
    assert result.returncode == 2
    assert message in result.stderr
    assert "process spawned" not in result.stderr


def test_a_missing_config_file_exits_2(repo_root: Path) -> None:
    result = run_cli(repo_root, "/nonexistent/cluster.toml")
    assert result.returncode == 2
    assert "cannot read /nonexistent/cluster.toml" in result.stderr


def test_check_prints_the_resolved_config_as_toml(repo_root: Path) -> None:
    result = run_cli(repo_root, "configs/demo.toml", "--check")
    assert result.returncode == 0, result.stderr
    resolved = tomllib.loads(result.stdout)
    assert resolved["node"]["tree"] == "demo"
    assert resolved["supervision"]["intensity"] == 3
    assert resolved["handlers"]["max_inflight"] == 256  # a default, filled in


def test_help_documents_the_options(repo_root: Path) -> None:
    result = run_cli(repo_root, "--help")
    assert result.returncode == 0
    for option in ("--check", "--log-level", "--log-format", "exit codes"):
        assert option in result.stdout


def _start_demo(repo: Path) -> tuple[subprocess.Popen[str], list[dict[str, object]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "configs/demo.toml", "--log-format", "json"],
        cwd=repo,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    records: list[dict[str, object]] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        records.append(json.loads(line))
        if records[-1]["event"] == "tree ready":
            break
    return proc, records


def test_sigterm_stops_the_demo_tree_in_order_exits_0_and_leaves_no_process(
    repo_root: Path,
) -> None:
    proc, records = _start_demo(repo_root)
    ticker = next(r for r in records if r["event"] == "process spawned")["pid"]
    # the ticker's output line is an event of its own, with the child's path and pid
    ready = next(r for r in records if "grandchild=" in str(r["event"]))
    assert ready["child"] == "demo/ticker"
    assert ready["pid"] == ticker
    grandchild = int(str(ready["event"]).split("=")[1])
    assert isinstance(ticker, int)
    assert pid_alive(ticker)
    assert pid_alive(grandchild)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    rest = [json.loads(line) for line in err.splitlines()]
    exits = [r["child"] for r in rest if r["event"] == "child exited" and r["path"] == "demo"]
    assert exits == ["heartbeat", "workers", "ticker"]
    assert rest[-1]["event"] == "stopped"
    assert wait_until(lambda: not pid_alive(ticker) and not pid_alive(grandchild), timeout=5)


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (/proc: SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("moment", ["first_handler", "first_log_line"])
def test_a_sigterm_during_start_up_is_an_ordered_stop_with_exit_0(
    repo_root: Path, moment: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "configs/demo.toml", "--log-format", "json"],
        cwd=repo_root,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    try:
        # the earliest moment the node catches it, or the tree being built (logging is
        # configured: its first line)
        assert wait_until(lambda: _catches_sigterm(proc.pid), timeout=10, interval=0.001)
        if moment == "first_handler":
            proc.send_signal(signal.SIGSTOP)  # frozen where the handler was first seen:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            # caught before the package's own imports (msgspec's extension is among them)
            assert "msgspec" not in maps
            proc.send_signal(signal.SIGTERM)  # pending until it runs again
            proc.send_signal(signal.SIGCONT)
        else:
            assert proc.stderr is not None
            proc.stderr.readline()
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(err.splitlines()[-1])
    assert last["event"] in ("stopped before starting", "stopped")


def test_other_modules_of_the_package_leave_sigterm_alone(repo_root: Path) -> None:
    probe = "import signal, supervisor; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert result.stdout.strip() == "True", result.stderr


SLOW_TREE = """
import sys, time
sys.path.insert(0, {repo!r})
from supervisor.core import ActorStart, ChildSpec, Root, SupervisedActor, SupervisorFlags
from supervisor.__main__ import serve
from supervisor.logs import configure_logging
from tests.supervision.children import process, SLEEPER

class SlowToStop(SupervisedActor):
    def on_shutdown(self, request):
        print("slow stop begins", file=sys.stderr, flush=True)
        time.sleep(60)

configure_logging("info", "json")
root = Root("slow", SupervisorFlags(), [process("p", SLEEPER), ChildSpec("a", ActorStart(SlowToStop), shutdown="infinity")])
assert root.wait_ready(10)
print(root.which_children()[0].pid, flush=True)
sys.exit(serve(root))
"""


def test_a_second_signal_while_stopping_stops_brutally_with_128_plus_signal(
    repo_root: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TREE.format(repo=str(repo_root))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    child = int(proc.stdout.readline())
    for line in proc.stderr:
        if "tree ready" in line:  # serve() has installed its signal handlers
            break
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:
        if "slow stop begins" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    assert proc.returncode == 128 + signal.SIGINT
    assert wait_until(lambda: not pid_alive(child), timeout=5)


ESCALATING_TREE = """
import sys
sys.path.insert(0, {repo!r})
from supervisor.core import ActorStart, Backoff, ChildSpec, Root, SupervisedActor, SupervisorFlags
from supervisor.__main__ import serve
from supervisor.logs import configure_logging

class CrashesAtOnce(SupervisedActor):
    def on_start_up(self):
        self.actor_ref.tell("boom")
    def handle(self, message):
        raise RuntimeError("engine on fire")

configure_logging("error", "json")
flags = SupervisorFlags(intensity=2, period=30, backoff=Backoff(initial=0.01, max=0.05))
sys.exit(serve(Root("node", flags, [ChildSpec("engine", ActorStart(CrashesAtOnce))])))
"""


def test_escalation_at_the_root_exits_1_with_a_one_line_summary(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", ESCALATING_TREE.format(repo=str(repo_root))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    summary = [line for line in result.stderr.splitlines() if line.startswith("sgl-node:")]
    assert summary == [
        "sgl-node: node stopped: restart_intensity_exceeded in node: child 'engine' needed 3 restarts "
        "within 30s; last: crash: RuntimeError: engine on fire"
    ]
