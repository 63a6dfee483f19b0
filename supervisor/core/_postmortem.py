"""Why a process child died of a signal nobody in the tree sent: what can be read of it.

A process killed by SIGKILL leaves no message of its own. The likely senders are the
kernel's OOM killer, the process itself (SGLang, for one, SIGKILLs its own tree when a
child fails at start), or someone else on the machine. This module gathers what tells
them apart, at the moment the death is seen: the OOM-kill counter of the child's memory
cgroup (found in /proc/PID/cgroup at spawn, read then and again at exit), the kernel's
own messages about the pid (when `/dev/kmsg` is readable; in a container it often is
not), the memory available then, the cgroup's usage against its limit, and the child's
last sampled resident memory. Every read is best effort: a fact that cannot be read is
left out, or said to be unreadable, never guessed.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.core._memory_watch import GroupMemory

__all__ = [
    "MemoryCgroup",
    "explain_signal_death",
    "memory_cgroup",
    "oom_kill_count",
    "parse_oom_kill",
]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_KMSG_RECORDS = 2000  # kernel records read back at most
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup's directory, and the names of its files for its version."""

    path: Path
    events: str  # v2 memory.events, v1 memory.oom_control: both hold "oom_kill N"
    usage: str
    limit: str


def memory_cgroup(pid: int | str = "self", root: Path = _CGROUP_ROOT) -> MemoryCgroup | None:
    """The memory cgroup of `pid` (v2 first, then v1) whose files can be read, or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2 (unified)
            v2 = ("memory.events", "memory.current", "memory.max")
            found += [MemoryCgroup(base / rel, *v2) for base in (root, root / "unified")]
        elif "memory" in controllers.split(","):  # cgroup v1
            v1 = ("memory.oom_control", "memory.usage_in_bytes", "memory.limit_in_bytes")
            found.append(MemoryCgroup(root / "memory" / rel, *v1))
    return next((c for c in found if (c.path / c.events).is_file()), None)


def parse_oom_kill(text: str) -> int | None:
    """The `oom_kill` counter in the text of a memory.events (v2) or memory.oom_control
    (v1) file: processes the OOM killer killed in that cgroup. None if absent."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def oom_kill_count(cgroup: MemoryCgroup | None = None) -> int | None:
    """How many processes the OOM killer has killed in `cgroup` (this process's memory
    cgroup by default) so far, or None when no counter can be read."""
    cgroup = cgroup or memory_cgroup()
    if cgroup is None:
        return None
    try:
        return parse_oom_kill((cgroup.path / cgroup.events).read_text())
    except OSError:
        return None


def _cgroup_usage(cgroup: MemoryCgroup) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        used = int((cgroup.path / cgroup.usage).read_text())
        limit_text = (cgroup.path / cgroup.limit).read_text().strip()
        limit = _NO_LIMIT if limit_text == "max" else int(limit_text)
        of = f" of its {_gib(limit)} limit" if limit < _NO_LIMIT else " (no limit)"
        return f"the cgroup uses {_gib(used)}{of}"
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


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _memory_available() -> str | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return _gib(int(line.split()[1]) * 1024)
    return None


def _oom_fact(cgroup: MemoryCgroup | None, before: int | None) -> str | None:
    after = oom_kill_count(cgroup) if cgroup is not None else None
    if before is None or after is None:
        return "the cgroup's OOM-kill counter is unreadable"
    if after > before:
        return f"the OOM killer ran in its cgroup (oom_kill {before} -> {after})"
    return f"not its cgroup's OOM killer (oom_kill unchanged at {after})"


def explain_signal_death(
    pid: int,
    cgroup: MemoryCgroup | None,
    oom_before: int | None,
    memory: GroupMemory | None = None,
) -> str:
    """One line: what can be read of why `pid` died of a signal the tree did not send.
    `cgroup` and `oom_before` were read at spawn; `memory` is its last sampled RSS."""
    facts = [_oom_fact(cgroup, oom_before)]
    kernel = _kernel_lines_about(pid)
    if kernel:
        facts.append("kernel: " + " | ".join(kernel))
    else:
        facts.append(
            "the kernel logged nothing about it"
            if kernel is not None
            else "the kernel log is unreadable"
        )
    available = _memory_available()
    facts.append(f"memory available now {available}" if available else None)
    facts.append(_cgroup_usage(cgroup) if cgroup is not None else None)
    facts.append(memory.describe() if memory is not None else None)
    return "; ".join(f for f in facts if f)
