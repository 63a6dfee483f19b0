"""The node's logs as an operator's pipeline reads them: JSON lines queried with `jq`.

A process child's own JSON records are merged as events of their own (the child's fields
plus `child`, `generation`, `pid`); other lines get a `level` and a message parsed from
their format; one line in, one event out. Checked on a scripted child (every format met,
and a count of lines in and out), on a real sim node (engine host and nats-server), and
on a terminal (console format: colour, one line per event).
"""

from __future__ import annotations

import json
import logging
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from supervisor.child_output import StreamState, parse_line
from tests.node.harness import start_node

JQ = shutil.which("jq")

# What the scripted child prints, in order: one line each (stdout unless marked).
CHILD_LINES = [
    json.dumps(
        {
            "path": "engine_host",
            "request_id": "r-1",
            "pid": 1,
            "event": "request done",
            "level": "warning",
            "timestamp": "2026-01-02T03:04:05.000000Z",
        }
    ),
    "[4242] 2026/12/05 15:08:33.123456 [INF] Server is ready",
    "[4242] 2026/12/05 15:08:34.000001 [WRN] Slow consumer detected",
    "[rank0]:W1205 15:09:00.671000 19865 torch/utils/cpp_extension.py:183] No CUDA runtime",
    "/x/sglang/srt/environ.py:2302: UserWarning: SGL_NODE_X is deprecated",
    "  warnings.warn(",
    "Traceback (most recent call last):",
    '  File "x.py", line 1, in <module>',
    "ValueError: bad value",
    "[2026-12-05 15:08:33 TP0] Load weight end.",
    "WARNING:sglang.srt.server:something odd",
    "Loading: 10%\rLoading: 50%\rLoading: 100%",
    "plain text, no level",
]

SCRIPTED_TREE = """
import sys, time
sys.path.insert(0, {repo!r})
from supervisor.core import ChildSpec, ProcessStart, Root, SupervisorFlags, set_output_handler
from supervisor.__main__ import serve
from supervisor.child_output import log_child_line
from supervisor.logs import configure_logging
from supervisor import stop_signals

# as `python -m supervisor` does on import: a SIGTERM from now on is recorded, not fatal
# (the test sends it once the child has printed, which may be before serve() starts)
stop_signals.catch()
configure_logging("info", {fmt!r})
set_output_handler(log_child_line)
printer = ChildSpec(
    "p",
    ProcessStart([sys.executable, "-c", {program!r}]),
    restart="temporary",
)
root = Root("t", SupervisorFlags(), [printer])
sys.exit(serve(root))
"""

PRINTER = """
import sys
lines = {lines!r}
for line in lines:
    print(line, file=sys.stderr if line.startswith("Traceback") or line.startswith("  File")
          or line.startswith("ValueError") else sys.stdout, flush=True)
print("printer" + " done", flush=True)  # (spelled so: the spawn record quotes this source)
import signal
signal.pause()  # until the tree stops it: a child gone before its start counts is a failed start
"""


def jq(query: str, path: Path, *flags: str) -> list[object]:
    """Run jq as an operator would; each output line parsed as JSON."""
    assert JQ is not None, "jq is missing: .ci/run installs it (apt-get install jq)"
    result = subprocess.run(
        [JQ, "-c", *flags, query, str(path)], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def run_scripted_tree(repo: Path, fmt: str, stderr: int | object) -> subprocess.Popen[bytes]:
    program = PRINTER.format(lines=CHILD_LINES)
    code = SCRIPTED_TREE.format(repo=str(repo), fmt=fmt, program=program)
    return subprocess.Popen([sys.executable, "-c", code], stderr=stderr)  # type: ignore[arg-type]


def wait_for_text(path: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    msg = f"{text!r} not in {path} within {timeout}s"
    raise AssertionError(msg)


@pytest.fixture(scope="module")
def scripted_log(tmp_path_factory: pytest.TempPathFactory, repo_root_path: Path) -> Path:
    log = tmp_path_factory.mktemp("json-logs") / "tree.log"
    with log.open("wb") as sink:
        proc = run_scripted_tree(repo_root_path, "json", sink)
        try:
            wait_for_text(log, '"printer done"')
        finally:
            # the tree stops the printer; its output is read to the end before the tree exits
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    assert '"process exited"' in log.read_text()
    return log


@pytest.fixture(scope="module")
def repo_root_path() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def test_every_line_of_the_log_is_a_json_object(scripted_log: Path) -> None:
    lines = scripted_log.read_text().splitlines()
    assert jq("type", scripted_log) == ["object"] * len(lines)


def test_one_event_per_child_line_nothing_lost_nothing_doubled(scripted_log: Path) -> None:
    events = jq('select(.child == "t/p") | .event', scripted_log)
    # stdout and stderr are read on threads of their own: compare as multisets
    assert Counter(map(str, events)) == Counter(
        [
            "request done",
            "Server is ready",
            "Slow consumer detected",
            "No CUDA runtime",
            "SGL_NODE_X is deprecated",
            "  warnings.warn(",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "ValueError: bad value",
            "Load weight end.",
            "something odd",
            "Loading: 100%",
            "plain text, no level",
            "printer done",
        ]
    )
    assert len(events) == len(CHILD_LINES) + 1
    # nothing is quoted inside another record any more
    assert jq('select(has("line"))', scripted_log) == []


def test_a_childs_json_record_is_merged_with_its_own_fields(scripted_log: Path) -> None:
    [record] = jq('select(.event == "request done")', scripted_log)
    assert isinstance(record, dict)
    assert record["path"] == "engine_host"  # the child's own path, not the node's
    assert record["request_id"] == "r-1"
    assert record["level"] == "warning"
    assert record["timestamp"] == "2026-01-02T03:04:05.000000Z"  # the child's time
    assert record["child"] == "t/p"
    assert record["generation"] == 0
    # the node's pid of the child wins; the child's own field of that name is kept
    assert record["child_pid"] == 1
    [spawned] = jq('select(.event == "process spawned") | .pid', scripted_log)
    assert record["pid"] == spawned


def test_levels_are_parsed_from_the_formats_of_other_lines(scripted_log: Path) -> None:
    query = 'select(.child == "t/p" and .level != "info") | [.level, .event]'
    assert sorted(map(str, jq(query, scripted_log))) == sorted(
        map(
            str,
            [
                ["warning", "request done"],
                ["warning", "Slow consumer detected"],
                ["warning", "No CUDA runtime"],
                ["warning", "SGL_NODE_X is deprecated"],
                ["warning", "  warnings.warn("],
                ["error", "Traceback (most recent call last):"],
                ["error", '  File "x.py", line 1, in <module>'],
                ["error", "ValueError: bad value"],
                ["warning", "something odd"],
            ],
        )
    )
    [warning] = jq('select(.category == "UserWarning")', scripted_log)
    assert isinstance(warning, dict)
    assert warning["source"] == "/x/sglang/srt/environ.py:2302"
    assert warning["stream"] == "stdout"
    assert jq('select(.event == "Load weight end.") | .rank', scripted_log) == ["TP0"]
    assert jq('select(.event | startswith("Loading")) | .event', scripted_log) == ["Loading: 100%"]
    # an operator's everyday query: the errors, with where they came from
    errors = jq('select(.level == "error") | {child, stream}', scripted_log)
    assert errors == [{"child": "t/p", "stream": "stderr"}] * 3


def test_on_a_terminal_the_console_format_has_colour_and_one_line_per_event(
    repo_root_path: Path, tmp_path: Path
) -> None:
    main, terminal = pty.openpty()
    proc = run_scripted_tree(repo_root_path, "console", terminal)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 30

    def read_until(marker: bytes) -> None:
        nonlocal output
        while marker not in output and time.monotonic() < deadline:
            try:
                output += os.read(main, 65536)
            except OSError:  # the tree is gone
                break

    read_until(b"printer done")
    proc.send_signal(signal.SIGTERM)  # the tree stops the printer, its output read to the end
    read_until(b"process exited")
    assert proc.wait(20) == 0
    os.close(main)
    text = output.decode("utf-8", "replace")
    assert "\x1b[" in text  # colour
    child_lines = [
        line
        for line in text.splitlines()
        if "t/p" in line and "child" in line and "process spawned" not in line
    ]
    # every printed line is one console line (progress bars' carriage returns resolved)
    assert len(child_lines) == len(CHILD_LINES) + 1
    assert any("request done" in line and "request_id" in line for line in child_lines)


def test_a_sim_node_logs_its_engine_host_and_nats_server_as_events(tmp_path: Path) -> None:
    node = start_node(tmp_path)
    try:
        node.wait_ready(60)
    finally:
        assert node.stop() == 0
    log = node.log_path
    host = 'select(.child == "node/core/engine/engine_host")'
    assert jq(f'{host} | select(.event == "starting engine") | .backend', log) == ["sim"]
    assert jq(f'{host} | select(.event == "engine host ready") | .stream', log) == ["stdout"]
    nats = 'select(.child == "node/nats_server")'
    assert jq(f'{nats} | select(.event == "Server is ready") | .level', log) == ["info"]
    # each child event carries the pid of the incarnation that printed it
    pids = jq(f"[.[] | {host} | .pid] | unique", log, "-s")
    spawned = jq(
        '[.[] | select(.event == "process spawned" and (.path | endswith("engine_host"))) | .pid]',
        log,
        "-s",
    )
    assert pids == spawned
    assert len(spawned[0]) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "level", "event"),
    [
        ("[1] 2026/12/05 15:08:33.123456 [ERR] boom", logging.ERROR, "boom"),
        ("[1] 2026/12/05 15:08:33.123456 [FTL] gone", logging.CRITICAL, "gone"),
        ("E1205 15:09:00.671000 1 a.py:1] failed", logging.ERROR, "failed"),
        ("ERROR: could not bind", logging.ERROR, "could not bind"),
        ("[WARNING] low memory", logging.WARNING, "low memory"),
        ("KeyboardInterrupt", logging.ERROR, "KeyboardInterrupt"),
        ("", logging.INFO, ""),
        ("[1, 2]", logging.INFO, "[1, 2]"),  # JSON, but not a record
        ('{"msg": "hi", "severity": "notice"}', logging.INFO, "hi"),
    ],
)
def test_parse_line(line: str, level: int, event: str) -> None:
    parsed = parse_line(line, StreamState())
    assert (parsed.level, parsed.event) == (level, event)


def test_a_level_the_parser_does_not_know_is_kept_beside_info() -> None:
    parsed = parse_line('{"event": "x", "level": "loud"}', StreamState())
    assert parsed.level == logging.INFO
    assert parsed.fields == {"child_level": "loud"}
