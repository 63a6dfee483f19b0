"""Guided decoding across a seam: the constraint on the rest of a continued stream.

A stream under a `regex` or a `json_schema` that continues on another engine (or the
restarted one) has streamed a prefix of a valid document; the continuation must generate
only strings `s` such that prefix + `s` is still valid. SGLang's grammar always starts at
the beginning of the output, so the host gives it the *derivative* of the constraint by
the prefix, as an EBNF grammar (SGLang's `ebnf` sampling parameter, compiled by
xgrammar):

1. the constraint as a regex: `regex` itself, or for `json_schema` the regex outlines
   builds from the schema (whitespace as xgrammar's JSON grammar allows it);
2. its DFA (interegular), advanced by the prefix's characters;
3. the DFA from that state, as a right-linear grammar: one rule per live state, one
   alternative per character class leading to a live state, `""` where the state accepts.
   The grammar is linear in the DFA's size (no blow-up, unlike a regex by state
   elimination). Character classes are written as positive code-point ranges: xgrammar
   clamps a negated class's non-ASCII members.

The continuation's language is the derivative of the regex's. For `json_schema` that regex
is stricter than xgrammar's JSON grammar (outlines allows only `\\"` and `\\\\` escapes in
strings, for one): a prefix the regex does not accept cannot be continued, and says so
(`CannotContinue`), never with output the schema rejects.
"""

from __future__ import annotations

from typing import Any

import interegular
from interegular.fsm import anything_else

__all__ = ["CannotContinue", "rest_grammar"]

# xgrammar's JSON grammar allows any run of these between tokens (any_whitespace, SGLang's
# default)
JSON_WHITESPACE = r"[ \n\r\t]*"
_MAX_CODE_POINT = 0x10FFFF


class CannotContinue(Exception):
    """The guided stream cannot continue: why, for the client's error message."""


def rest_grammar(regex: str | None, json_schema: str | None, prefix: str) -> str:
    """An EBNF grammar of the strings `s` with prefix + `s` valid under the constraint
    (exactly one of `regex`, `json_schema`); raises `CannotContinue`."""
    pattern = regex if regex is not None else _schema_regex(json_schema or "")
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as exc:  # noqa: BLE001 - interegular's errors have no common base
        why = f"its regex is beyond what the continuation can follow ({type(exc).__name__})"
        raise CannotContinue(why) from None
    state = _advance(fsm, prefix)
    live = _live_states(fsm)
    if state is None or state not in live:
        why = "the text streamed so far is not a prefix the constraint's regex accepts"
        raise CannotContinue(why)
    return _grammar(fsm, state, live)


def _schema_regex(schema: str) -> str:
    from outlines_core.fsm.outlines_core_rs import build_regex_from_schema

    try:
        return str(build_regex_from_schema(schema, JSON_WHITESPACE))
    except Exception as exc:  # noqa: BLE001 - the Rust extension raises several kinds
        why = f"its json_schema has no regex form ({exc})"
        raise CannotContinue(why) from None


def _advance(fsm: Any, text: str) -> int | None:
    state: int | None = fsm.initial
    for char in text:
        state = fsm.map.get(state, {}).get(fsm.alphabet[char])
        if state is None:
            return None
    return state


def _live_states(fsm: Any) -> set[int]:
    """States from which an accepting state can be reached."""
    before: dict[int, set[int]] = {}
    for state, moves in fsm.map.items():
        for target in moves.values():
            before.setdefault(target, set()).add(state)
    live: set[int] = set(fsm.finals)
    todo = list(live)
    while todo:
        for state in before.get(todo.pop(), ()):
            if state not in live:
                live.add(state)
                todo.append(state)
    return live


def _grammar(fsm: Any, start: int, live: set[int]) -> str:
    chars_of: dict[int, list[object]] = {}
    for char, symbol in fsm.alphabet._symbol_mapping.items():
        chars_of.setdefault(symbol, []).append(char)
    explicit = {ord(c) for c in fsm.alphabet._symbol_mapping if isinstance(c, str)}
    rules = [f"root ::= s{start}"]
    todo, seen = [start], {start}
    while todo:
        state = todo.pop()
        into: dict[int, set[object]] = {}
        for symbol, target in fsm.map.get(state, {}).items():
            if target in live:
                into.setdefault(target, set()).update(chars_of.get(symbol, ()))
        alternatives = []
        for target, chars in sorted(into.items()):
            points = {ord(c) for c in chars if isinstance(c, str)}
            if anything_else in chars:  # every character the regex does not name, too
                ranges = _complement(explicit - points)
            else:
                ranges = _ranges(points)
            alternatives.append(f"{_char_class(ranges)} s{target}")
            if target not in seen:
                seen.add(target)
                todo.append(target)
        if state in fsm.finals:
            alternatives.append('""')
        rules.append(f"s{state} ::= " + " | ".join(alternatives))
    return "\n".join(rules) + "\n"


def _ranges(points: set[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for point in sorted(points):
        if out and point == out[-1][1] + 1:
            out[-1][1] = point
        else:
            out.append([point, point])
    return [(low, high) for low, high in out]


def _complement(excluded: set[int]) -> list[tuple[int, int]]:
    out, low = [], 0
    for first, last in _ranges(excluded):
        if first > low:
            out.append((low, first - 1))
        low = last + 1
    if low <= _MAX_CODE_POINT:
        out.append((low, _MAX_CODE_POINT))
    return out


def _char_class(ranges: list[tuple[int, int]]) -> str:
    parts = [
        _escape(low) if low == high else f"{_escape(low)}-{_escape(high)}" for low, high in ranges
    ]
    return "[" + "".join(parts) + "]"


def _escape(point: int) -> str:
    return f"\\u{point:04x}" if point <= 0xFFFF else f"\\U{point:08x}"
