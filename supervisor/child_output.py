"""Process children's output as log events a pipeline can read.

The supervision library hands every line a process child prints to one handler
(`supervisor.set_output_handler`); this module is the node's handler:

- a line that is a JSON object (the engine host logs JSON lines) becomes an event of
  its own: the child's fields as they are (its ``event``, ``level``, ``timestamp``,
  ``path``...), plus ``child`` (the child's path in the node's tree), ``generation`` and
  ``pid`` from the node;
- any other line becomes an event whose ``event`` is the line's message and whose
  ``level`` is parsed from the formats met here (nats-server's ``[INF]``, torch/glog's
  ``W1205 ...]``, Python warnings, tracebacks, ``LEVEL:logger:`` lines...), ``info`` when
  the format carries none; with ``stream`` (stdout or stderr), ``child``, ``generation``
  and ``pid``.

One line in, one event out: nothing is dropped, merged or split here (a child's line is
subject to the node's ``logging.level`` like every event). Pure parsing lives in
`parse_line`; `log_child_line` only routes its result.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["ParsedLine", "StreamState", "log_child_line", "parse_line"]

# The node's fields, which win over a child's fields of the same name (kept as child_<name>).
_NODE_FIELDS = ("child", "generation", "pid", "stream")

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "dbg": logging.DEBUG,
    "trc": logging.DEBUG,
    "info": logging.INFO,
    "inf": logging.INFO,
    "notice": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "wrn": logging.WARNING,
    "error": logging.ERROR,
    "err": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "ftl": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
_GLOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}

# nats-server: "[1234] 2026/12/05 15:08:33.123456 [INF] Server is ready"
_NATS = re.compile(r"^\[\d+\] \d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+ \[([A-Z]{3})\] (.*)$")
# glog (torch, absl): "[rank0]:W1205 15:09:00.671000 19865 torch/utils/x.py:183] message"
_GLOG = re.compile(
    r"^(?:\[(?P<rank>rank\d+)\]:)?(?P<lvl>[IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ "
    r"(?P<source>[^ \]]+:\d+)\] (?P<msg>.*)$"
)
# Python warnings: "/path/file.py:2302: UserWarning: message"
_WARNING = re.compile(r"^(?P<source>\S+\.py:\d+): (?P<category>\w*Warning): (?P<msg>.*)$")
# Python's default logging format: "WARNING:sglang.srt.x:message"
_STDLIB = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):(?P<logger>[\w.]+):(?P<msg>.*)$")
# SGLang's own format: "[2026-12-05 15:08:33 TP0] message" (no level in it)
_SGLANG = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: (?P<rank>[A-Z]{2}\d+(?: [A-Z]{2}\d+)*))?\] "
    r"(?P<msg>.*)$"
)
# "ERROR: message", "[WARNING] message", "level=warn msg=..." and the like
_LEADING_LEVEL = re.compile(
    r"^\[?(?P<lvl>DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\]?(?::|\s)\s*(?P<msg>.*)$"
)
# The last line of a traceback: "ValueError: bad" / "sglang.x.SomeError: bad" / "KeyboardInterrupt"
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b")


@dataclass
class StreamState:
    """What one output stream of one child was in the middle of (a traceback, or a
    multi-line message whose indented lines continue it)."""

    in_traceback: bool = False
    last_level: int = logging.INFO


@dataclass(frozen=True)
class ParsedLine:
    """One output line as an event: its level, its ``event`` text and extra fields."""

    level: int
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    structured: bool = False  # a JSON object line: its fields are the child's own


def _level_of(name: object) -> int | None:
    return _LEVELS.get(str(name).lower()) if name is not None else None


def _parse_json(line: str) -> ParsedLine | None:
    if not line.startswith("{"):
        return None
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    event = next((fields.pop(k) for k in ("event", "message", "msg") if k in fields), "")
    levels = ("level", "levelname", "severity")
    raw_level = next((fields.pop(k) for k in levels if k in fields), None)
    level = _level_of(raw_level)
    if level is None:
        level = logging.INFO
        if raw_level is not None:
            fields["child_level"] = raw_level  # kept, not understood
    return ParsedLine(level, str(event), fields, structured=True)


def _parse_text(line: str, state: StreamState) -> ParsedLine:
    """A line that is not JSON: its level and message where the format tells them."""
    text = line.rsplit("\r", 1)[-1] if "\r" in line else line  # a progress bar: its last state
    if match := _NATS.match(text):
        return ParsedLine(_LEVELS.get(match[1].lower(), logging.INFO), match[2])
    if match := _GLOG.match(text):
        fields = {"source": match["source"]}
        if match["rank"]:
            fields["rank"] = match["rank"]
        return ParsedLine(_GLOG_LEVELS[match["lvl"]], match["msg"], fields)
    if match := _WARNING.match(text):
        fields = {"source": match["source"], "category": match["category"]}
        return ParsedLine(logging.WARNING, match["msg"], fields)
    if match := _STDLIB.match(text):
        return ParsedLine(_LEVELS[match[1].lower()], match["msg"], {"logger": match["logger"]})
    if match := _SGLANG.match(text):
        rank = {"rank": match["rank"]} if match["rank"] else {}
        return ParsedLine(logging.INFO, match["msg"], rank)
    if text.startswith("Traceback (most recent call last):"):
        state.in_traceback = True
        return ParsedLine(logging.ERROR, text)
    if text[:1] in (" ", "\t") and text.strip():
        # An indented line continues the one before it (a traceback frame, a warning's
        # source line): same level.
        return ParsedLine(logging.ERROR if state.in_traceback else state.last_level, text)
    if state.in_traceback:
        state.in_traceback = False  # the exception line ends the traceback
        return ParsedLine(logging.ERROR, text)
    if _EXCEPTION.match(text):
        return ParsedLine(logging.ERROR, text)
    if match := _LEADING_LEVEL.match(text):
        return ParsedLine(_LEVELS[match["lvl"].lower()], match["msg"])
    return ParsedLine(logging.INFO, text)


def parse_line(line: str, state: StreamState) -> ParsedLine:
    """Parse one output line of a child (``state`` is that stream's, updated here)."""
    parsed = _parse_json(line)
    if parsed is None:
        parsed = _parse_text(line, state)
    else:
        state.in_traceback = False
    state.last_level = parsed.level
    return parsed


class _States:
    """Per (pid, stream) parse state; bounded, since children come and go for months."""

    def __init__(self, limit: int = 256) -> None:
        self._states: OrderedDict[tuple[object, str], StreamState] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key: tuple[object, str]) -> StreamState:
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = StreamState()
                while len(self._states) > self._limit:
                    self._states.popitem(last=False)
            return state


_STATES = _States()


def log_child_line(log: Any, stream: str, line: str) -> None:
    """The node's output handler: one event per line (see the module docstring).

    ``log`` is bound by the supervision library with the child's ``path``,
    ``generation`` and ``pid``.
    """
    bound = structlog.get_context(log)
    node = {
        "child": bound.get("path"),
        "generation": bound.get("generation"),
        "pid": bound.get("pid"),
    }
    parsed = parse_line(line, _STATES.get((node["pid"], stream)))
    fields = dict(parsed.fields)
    if not parsed.structured:
        node["stream"] = stream
    for key, value in node.items():
        if key in fields and fields[key] != value:
            fields[f"child_{key}"] = fields.pop(key)
        fields[key] = value
    # A logger of its own: the child's fields (its `path` among them), not the node's bound
    # ones. (Not `log.new()`: that clears the library's logger's context in place.)
    structlog.get_logger().log(parsed.level, parsed.event, **fields)
