"""SGLang's children on the CPU come from a forkserver (`sglang_children`): each must see
the environment of the moment it was started, as a spawned child would, not the
forkserver's, and keep a settable process title (chaos and `ps` find SGLang's scheduler
by it). Real processes, no SGLang import (the forkserver preloads nothing here)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import time
from pathlib import Path

import pytest

from actors.engine_host.sglang_children import ForkedChild


def _report(path: str) -> None:
    import setproctitle

    setproctitle.setproctitle("sglang::scheduler_test")
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        title = f.read().split(b"\0")[0].decode()
    Path(path).write_text(
        "\n".join(
            [
                os.environ.get("SGLNODE_TEST_ADDED", "<absent>"),
                os.environ.get("SGLNODE_TEST_REMOVED", "<absent>"),
                title,
            ]
        )
    )


def _environ(pid: int) -> bytes:
    """A process's environment once its exec has set it up: read in the middle of the exec
    (the forkserver was just spawned), /proc/PID/environ is empty (a fresh-clone run failed
    so, on a loaded machine)."""
    deadline = time.monotonic() + 10
    while not (environ := Path(f"/proc/{pid}/environ").read_bytes()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return environ


def test_a_forked_child_sees_the_environment_of_its_start_and_can_set_its_title(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLNODE_TEST_REMOVED", "old")
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]  # a fresh one
    multiprocessing.forkserver.ensure_running()
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert b"SGLNODE_TEST_REMOVED=old" in _environ(server)
    # after the forkserver started: one variable added, one removed
    monkeypatch.setenv("SGLNODE_TEST_ADDED", "new")
    monkeypatch.delenv("SGLNODE_TEST_REMOVED")
    out = tmp_path / "report"
    child = ForkedChild(target=_report, args=(str(out),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    added, removed, title = out.read_text().split("\n")
    assert (added, removed) == ("new", "<absent>")
    assert title == "sglang::scheduler_test"
