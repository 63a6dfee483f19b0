"""The resident memory of each live process child's group, sampled once a second.

When a child dies of a signal nobody in the tree sent, the memory it held just before is
evidence: a group that grew to the machine's size points at the OOM killer, one that
stayed small points elsewhere. One thread samples every watched process group (a child
and everything it started, e.g. SGLang's scheduler and detokenizer) by reading
`/proc/PID/stat`; the last sample and the peak are kept until the group is forgotten.

Finding a group's processes takes a read of every process's stat file on the machine, so
that is done when a group is first watched, 1, 2, 4 … 32 samples later (while a child
starts the processes it runs, as SGLang does its scheduler and detokenizer), then every
`_FULL_EVERY` samples; the samples between read only the processes found then. (An idle
node's sampler cost ~40 % of its CPU when every sample read all of /proc, and still 0.09 %
of a core, a fifth of an idle node's CPU, with a full scan every 5 s.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GroupMemory", "forget", "group_rss", "last_sample", "watch"]

_INTERVAL = 1.0  # seconds between samples
# look for processes a group started since: this many samples after the last group was
# first watched, and every _FULL_EVERY samples
_FULL_AFTER_WATCH = frozenset({1, 2, 4, 8, 16, 32})
_FULL_EVERY = 60
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class GroupMemory:
    """The last sample of one process group's resident memory, and its peak."""

    rss: int  # bytes, summed over the group's processes
    processes: int
    peak: int  # the largest `rss` sampled
    at: float  # time.monotonic() of the last sample

    def describe(self, now: float | None = None) -> str:
        """E.g. 'its process group's RSS 1.2 GiB (3 processes, peak 1.4 GiB) 0.6 s before'."""
        age = (time.monotonic() if now is None else now) - self.at
        return (
            f"its process group's RSS {_size(self.rss)} ({self.processes} "
            f"process{'es' if self.processes != 1 else ''}, peak "
            f"{_size(self.peak)}) sampled {age:.1f} s before"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def group_rss(pgids: set[int], proc: Path = Path("/proc")) -> dict[int, tuple[int, int]]:
    """For each of `pgids` with a live process: (resident bytes, processes), read from
    `proc`/PID/stat (field 3 is the state, 5 the process group, 24 the resident pages)."""
    return {pgid: (rss, len(members)) for pgid, (rss, members) in _scan(pgids, proc).items()}


def _scan(
    pgids: set[int], proc: Path, entries: list[str] | None = None
) -> dict[int, tuple[int, list[str]]]:
    """(resident bytes, member PIDs) per group of `pgids`, from the processes `entries`
    (PIDs as strings; None: every process)."""
    out: dict[int, tuple[int, list[str]]] = {}
    if entries is None:
        try:
            entries = os.listdir(proc)
        except OSError:
            return out
    for entry in entries:
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = _read(f"{proc}/{entry}/stat")
            fields = text[text.rindex(b")") + 2 :].split()  # the name may hold spaces
            pgrp, pages = int(fields[2]), int(fields[21])
            if pgrp in pgids and fields[0] != b"Z":  # a zombie holds no memory: not a sample
                rss, members = out.get(pgrp, (0, []))
                members.append(entry)
                out[pgrp] = (rss + pages * _PAGE, members)
    return out


def _read(path: str) -> bytes:
    """A small /proc file's bytes (a third of `Path.read_text`'s cost: no decoding, no
    buffered file object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


class _Sampler:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[int, GroupMemory | None] = {}
        self._members: dict[int, list[str]] = {}  # each group's processes at the last scan
        self._thread: threading.Thread | None = None
        self._since_watch = 0  # samples since a group was last first watched

    def watch(self, pgid: int) -> None:
        with self._lock:
            self._groups[pgid] = None
            self._since_watch = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
                self._thread.start()
        self._sample(
            {pgid}, full=True
        )  # a first figure at once, even for a child that dies quickly

    def forget(self, pgid: int) -> GroupMemory | None:
        with self._lock:
            self._members.pop(pgid, None)
            return self._groups.pop(pgid, None)

    def last(self, pgid: int) -> GroupMemory | None:
        with self._lock:
            return self._groups.get(pgid)

    def _run(self) -> None:
        for n in itertools.count(1):
            time.sleep(_INTERVAL)
            with self._lock:
                pgids = set(self._groups)
                self._since_watch += 1
                full = self._since_watch in _FULL_AFTER_WATCH or n % _FULL_EVERY == 0
            if pgids:
                self._sample(pgids, full=full)

    def _sample(self, pgids: set[int], full: bool) -> None:
        with self._lock:
            known = None if full else [p for g in pgids for p in self._members.get(g, [])]
        found = _scan(pgids, Path("/proc"), known)
        now = time.monotonic()
        with self._lock:
            for pgid, (rss, members) in found.items():
                if pgid in self._groups:  # not forgotten meanwhile
                    last = self._groups[pgid]
                    peak = max(rss, last.peak if last else 0)
                    self._groups[pgid] = GroupMemory(rss, len(members), peak, now)
                    self._members[pgid] = members


_SAMPLER = _Sampler()


def watch(pgid: int) -> None:
    """Sample process group `pgid`'s resident memory from now on."""
    _SAMPLER.watch(pgid)


def last_sample(pgid: int) -> GroupMemory | None:
    """The last sample of a watched group, if one was taken yet."""
    return _SAMPLER.last(pgid)


def forget(pgid: int) -> GroupMemory | None:
    """Stop sampling `pgid`; its last sample, if one was taken."""
    return _SAMPLER.forget(pgid)
