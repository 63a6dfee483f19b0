"""Shared helpers for the benchmarks: machine facts, statistics, RESULTS.md sections."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[2]


def machine() -> str:
    """One line describing the machine and software the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_spread(
    numerators: Sequence[float], denominators: Sequence[float], target: float
) -> tuple[float, float, float, str]:
    """Per-run ratios of two contenders measured in the same runs (run i of each, taken
    back to back): their median, lowest and highest, and a verdict against `target` that
    says when the runs' spread cannot tell: 'met' (every run at or above the target),
    'missed' (every run below it), otherwise 'within noise'."""
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True) if d]
    if not ratios:
        return float("nan"), float("nan"), float("nan"), "no runs"
    low, high = min(ratios), max(ratios)
    verdict = "met" if low >= target else "missed" if high < target else "within noise"
    return median(ratios), low, high, verdict


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or add) the section `name` of RESULTS.md and print it."""
    command = "python3 supervisor/bootstrap.py exec python -m tests.benchmarks." + name
    section = f"<!-- bench:{name} -->\n## {title}\n\n`{command}`\n\nMachine: {machine()}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is rewritten by its benchmark; see tests/benchmarks/README.md.\n"
    )
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    RESULTS.write_text(text)
    print(section)


def python(*args: str, **popen: object) -> subprocess.Popen[bytes]:
    """Start `python ARGS` from the repository with the project on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, **popen)  # type: ignore[call-overload,no-any-return]
