"""Process children: exit mapping, output in the log, probes, group kill, no orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import structlog

from supervisor.core import (
    Backoff,
    ChildExitedEvent,
    ChildReadyEvent,
    ChildSpec,
    Crash,
    Killed,
    Normal,
    ProcessStart,
    ReadyOnFile,
    ReadyOnPort,
    Shutdown,
    SupervisorFlags,
)
from supervisor.core._postmortem import oom_kill_count
from tests.supervision.children import (
    EXIT_WITH,
    SLEEPER,
    STUBBORN,
    TERM_NOISY,
    pid_alive,
    process,
    wait_until,
)
from tests.supervision.conftest import Tree

SLOW = SupervisorFlags(intensity=5, backoff=Backoff(initial=30, max=60))


def test_exit_status_zero_is_normal_and_a_transient_child_stays_down(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree(
        [process("p", EXIT_WITH.format(code=0), restart="transient")], SLOW, wait_ready=False
    )
    assert isinstance(tree.wait(ChildExitedEvent, "p")[0].reason, Normal)
    assert tree.children()["p"].state == "stopped"


def test_a_non_zero_exit_is_a_crash_naming_the_status(make_tree: Callable[..., Tree]) -> None:
    tree = make_tree([process("p", EXIT_WITH.format(code=7))], SLOW, wait_ready=False)
    reason = tree.wait(ChildExitedEvent, "p")[0].reason
    assert isinstance(reason, Crash)
    assert (reason.error_type, reason.message) == ("ExitStatus", "exited with status 7")


def test_death_by_a_signal_is_killed_with_the_signal_and_what_can_be_read_of_its_sender(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree([process("p", SLEEPER)], SLOW)
    pid = tree.children()["p"].pid
    os.kill(pid, signal.SIGKILL)
    reason = tree.wait(ChildExitedEvent, "p")[0].reason
    assert isinstance(reason, Killed)
    assert reason.signal == signal.SIGKILL
    # Nobody in the tree sent it: the reason says so, with the evidence that can be read
    # here (the memory cgroup's OOM-kill counter, the memory left) and the last output.
    assert reason.detail.startswith("SIGKILL, not sent by the supervisor")
    if oom_kill_count() is not None:
        assert "not its cgroup's OOM killer" in reason.detail
    assert "memory available now" in reason.detail
    assert "ready" in reason.output


def test_output_lines_go_to_the_structured_log_with_the_child_path(
    make_tree: Callable[..., Tree],
) -> None:
    with structlog.testing.capture_logs() as logs:
        tree = make_tree(
            [process("p", EXIT_WITH.format(code=0), restart="temporary")], wait_ready=False
        )
        tree.wait(ChildExitedEvent, "p")
    lines = {
        (e.get("path"), e.get("stream"), e.get("line")) for e in logs if e["event"] == "output"
    }
    assert ("root/p", "stdout", "ready") in lines
    assert ("root/p", "stderr", "about to fail") in lines


def test_ready_when_a_port_accepts(make_tree: Callable[..., Tree]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import socket, time; s = socket.socket(); time.sleep(0.3); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
    tree = make_tree(
        [ChildSpec("p", ProcessStart([sys.executable, "-c", code], ready=ReadyOnPort(port)))]
    )
    assert tree.children()["p"].state == "running"


def test_ready_when_a_file_appears(make_tree: Callable[..., Tree], tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    code = f"import pathlib, time; time.sleep(0.2); pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"
    tree = make_tree(
        [ChildSpec("p", ProcessStart([sys.executable, "-c", code], ready=ReadyOnFile(str(flag))))]
    )
    assert tree.of(ChildReadyEvent, "p")


def test_a_process_ignoring_sigterm_is_killed_with_its_whole_group(
    make_tree: Callable[..., Tree],
) -> None:
    with structlog.testing.capture_logs() as logs:
        tree = make_tree([process("p", STUBBORN, shutdown=0.5)])
    line = next(
        e["line"] for e in logs if e["event"] == "output" and "grandchild=" in e.get("line", "")
    )
    grandchild = int(line.split("grandchild=")[1])
    child = tree.children()["p"].pid
    assert pid_alive(grandchild)
    tree.root.stop("operator")
    assert isinstance(tree.root.wait_exit(10), Shutdown)
    reason = tree.of(ChildExitedEvent, "p")[0].reason
    assert isinstance(reason, Killed)
    assert reason.signal == signal.SIGKILL
    assert wait_until(lambda: not pid_alive(grandchild) and not pid_alive(child), timeout=5)


def test_brutal_shutdown_sends_no_sigterm(make_tree: Callable[..., Tree]) -> None:
    with structlog.testing.capture_logs() as logs:
        tree = make_tree([process("p", TERM_NOISY, shutdown="brutal")])
        tree.root.stop("operator")
        tree.root.wait_exit(10)
    assert not [e for e in logs if e.get("line") == "got SIGTERM"]
    reason = tree.of(ChildExitedEvent, "p")[0].reason
    assert isinstance(reason, Killed)
    assert reason.detail == "brutal shutdown"


def test_a_graceful_stop_lets_the_process_handle_sigterm(make_tree: Callable[..., Tree]) -> None:
    with structlog.testing.capture_logs() as logs:
        tree = make_tree([process("p", TERM_NOISY, shutdown=5)])
        tree.root.stop("operator")
        tree.root.wait_exit(10)
    assert [e for e in logs if e.get("line") == "got SIGTERM"]
    assert isinstance(tree.of(ChildExitedEvent, "p")[0].reason, Shutdown)


def test_children_die_with_the_node_even_when_it_is_killed_with_sigkill(
    tmp_path: Path, repo_root: Path
) -> None:
    # A node process starts a process child, then is SIGKILLed: its child must not survive.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(repo_root)!r})
        from supervisor.core import Root, SupervisorFlags
        from supervisor.logs import configure_logging
        configure_logging("warning", "json")
        from tests.supervision.children import process, SLEEPER
        root = Root("orphan", SupervisorFlags(), [process("p", SLEEPER)])
        assert root.wait_ready(10)
        print(root.which_children()[0].pid, flush=True)
        import time; time.sleep(60)
        """
    )
    node = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        child = int(node.stdout.readline())
        assert pid_alive(child)
        node.kill()
        node.wait(10)
        assert wait_until(lambda: not pid_alive(child), timeout=5), (
            f"child {child} outlived its node"
        )
    finally:
        node.kill()
