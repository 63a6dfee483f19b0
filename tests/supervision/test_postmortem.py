"""What a process child's death by a signal nobody in the tree sent says about its sender:
the OOM-kill counter of its cgroup, the kernel's word, the memory then, its last RSS."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from supervisor.core import Backoff, ChildExitedEvent, Killed, SupervisorFlags, _memory_watch
from supervisor.core._postmortem import memory_cgroup, oom_kill_count, parse_oom_kill
from tests.supervision.children import process, wait_until
from tests.supervision.conftest import Tree

SLOW = SupervisorFlags(intensity=5, backoff=Backoff(initial=30, max=60))
MIB = 2**20

# Holds 64 MiB of touched memory, then says so.
HOLDER = """
import time
block = bytearray(64 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""

# A cgroup v2 memory.events as the kernel writes it (Documentation/admin-guide/cgroup-v2).
V2_EVENTS = "low 0\nhigh 12\nmax 40\noom 3\noom_kill 2\noom_group_kill 0\n"


def test_the_oom_kill_counter_is_parsed_from_a_v2_memory_events_file(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text(V2_EVENTS)
    assert parse_oom_kill(events.read_text()) == 2


def test_the_oom_kill_counter_is_parsed_from_this_machines_own_cgroup_file(
    tmp_path: Path,
) -> None:
    cgroup = memory_cgroup()
    if cgroup is None:  # no readable memory cgroup here: the v2 text above is the test
        assert oom_kill_count() is None
        return
    copy = tmp_path / cgroup.events
    shutil.copyfile(cgroup.path / cgroup.events, copy)
    text = copy.read_text()
    value = parse_oom_kill(text)
    assert value is not None, text
    assert f"oom_kill {value}" in text.splitlines()
    assert oom_kill_count(cgroup) >= value  # the counter only grows


def test_a_file_without_the_counter_gives_none() -> None:
    assert parse_oom_kill("low 0\nhigh 0\n") is None
    assert parse_oom_kill("oom_kill not-a-number\n") is None


def test_a_process_groups_resident_memory_is_summed_from_proc() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", HOLDER], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        rss, processes = _memory_watch.group_rss({proc.pid})[proc.pid]
        assert processes == 1
        assert rss >= 64 * MIB
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


SPAWNER = """
import subprocess, sys, time
time.sleep(1.5)  # after the group was first watched (and scanned)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print("spawned", flush=True)
time.sleep(3600)
"""


def test_a_process_the_group_starts_after_it_is_watched_is_sampled_within_seconds() -> None:
    """A child starts its own processes while it starts (SGLang: its scheduler and
    detokenizer); the sampler looks for them again soon after a group is first watched,
    not only at its slow steady pace."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", SPAWNER], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        _memory_watch.watch(proc.pid)
        first = _memory_watch.last_sample(proc.pid)
        assert first is not None
        assert first.processes == 1
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"spawned"

        def both_sampled() -> bool:
            last = _memory_watch.last_sample(proc.pid)
            return last is not None and last.processes == 2

        assert wait_until(both_sampled, timeout=4)  # full scans ~2 and ~4 s after the watch
    finally:
        _memory_watch.forget(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_sigkill_from_outside_says_the_signal_and_the_memory_then(
    make_tree: Callable[..., Tree],
) -> None:
    tree = make_tree([process("p", HOLDER)], SLOW)
    pid = tree.children()["p"].pid

    def sampled_holding() -> bool:  # the sampler has seen the 64 MiB
        last = _memory_watch.last_sample(pid)
        return last is not None and last.rss >= 64 * MIB

    assert wait_until(sampled_holding, timeout=15)
    os.kill(pid, signal.SIGKILL)
    reason = tree.wait(ChildExitedEvent, "p")[0].reason
    assert isinstance(reason, Killed)
    assert reason.signal == signal.SIGKILL
    described = reason.describe()
    print(described)  # what an operator reads
    assert described.startswith("killed by signal 9 (SIGKILL, not sent by the supervisor; ")
    assert re.search(r"memory available now \d+\.\d GiB", described), described
    peak = re.search(r"its process group's RSS \d+ MiB \(1 process, peak (\d+) MiB\)", described)
    assert peak is not None, described
    assert int(peak.group(1)) >= 64
    if oom_kill_count() is not None:
        assert "not its cgroup's OOM killer (oom_kill unchanged at" in described
        assert "the cgroup uses" in described
    else:
        assert "the cgroup's OOM-kill counter is unreadable" in described
    kernel_said = "the kernel logged nothing about it" in described or "kernel: " in described
    assert kernel_said or "the kernel log is unreadable" in described
