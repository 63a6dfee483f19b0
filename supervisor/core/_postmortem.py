"""Why a process child died of a signal nobody in the tree sent: what can be read of it.

A process killed by SIGKILL leaves no message of its own. The likely senders are the
kernel's OOM killer, the process itself (SGLang, for one, SIGKILLs its own tree when a
child fails at start), or someone else on the machine. This module gathers what tells
them apart, at the moment the death is seen: the OOM-kill counter of the memory cgroup
(read at spawn and again at exit), the kernel's own messages about the pid (when
`/dev/kmsg` is readable), and the memory available then. Every read is best effort: a
fact that cannot be read is left out, never guessed.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

__all__ = ["explain_signal_death", "oom_kill_count"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_KMSG_RECORDS = 2000  # kernel records read back at most


def _memory_cgroup_files() -> list[Path]:
    """The files holding this process's cgroup OOM-kill counter (v2, then v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2 (unified)
            for base in (_CGROUP_ROOT, _CGROUP_ROOT / "unified"):
                files.append(base / rel / "memory.events")
        elif "memory" in controllers.split(","):  # cgroup v1
            files.append(_CGROUP_ROOT / "memory" / rel / "memory.oom_control")
    return files


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory
    cgroup so far, or None when no counter can be read."""
    for path in _memory_cgroup_files():
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return None


def _kernel_lines_about(pid: int) -> list[str] | None:
    """The kernel's recent messages that name `pid` (None: unreadable)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found: list[str] = []
    pattern = re.compile(rf"(\bpid[ =]{pid}\b|\bprocess {pid}\b)")
    try:
        for _ in range(_KMSG_RECORDS):
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the ring overwrote what we were reading; go on
                continue
            message = record.split(";", 1)[-1].strip()
            if pattern.search(message):
                found.append(message)
    finally:
        os.close(fd)
    return found[-3:]


def _memory_available() -> str | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    return None


def explain_signal_death(pid: int, oom_before: int | None) -> str:
    """One line: what can be read of why `pid` died of a signal the tree did not send."""
    facts = []
    oom_after = oom_kill_count()
    if oom_before is not None and oom_after is not None:
        if oom_after > oom_before:
            facts.append(f"the OOM killer ran in this cgroup ({oom_before} -> {oom_after})")
        else:
            facts.append(f"not the cgroup's OOM killer (oom_kill count unchanged at {oom_after})")
    kernel = _kernel_lines_about(pid)
    if kernel:
        facts.append("kernel: " + " | ".join(kernel))
    elif kernel is not None:
        facts.append("the kernel logged nothing about it")
    available = _memory_available()
    if available is not None:
        facts.append(f"memory available now {available}")
    return "; ".join(facts)
