"""The chaos runner's verdict: how every request ended, and which fault each failure followed.

A request ends in one of five states, counted apart because each means something else:

- **completed**: a final chunk with `stop` or `length`;
- **error** (by code): the node, or the node it continued on, ended the accepted stream
  with an error chunk;
- **stream_lost**: the client library's own verdict: no node held the stream for
  `lost_after` seconds and none took it on (the node dropped it);
- **refused** (by code): never accepted, after the client library's own retries: nobody
  served the subject (`no_responders`, the node away from NATS), or the node refused it
  before its first chunk (`engine_restarting`, `overloaded`, `not_ready`);
- **lost**: the stream never ended: no final chunk, no error (a bug, always).

Every state but completed is also counted on the fault injected last before the request
ended (`faults[i]["ends"]`, or `before_faults`), so a test can assert per fault what it
may cost.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["REFUSALS", "Verdict", "end_state", "print_verdict"]

# Error codes that, as the only chunk of a stream, mean the node never accepted it (the
# ones the client library sends again before giving up).
REFUSALS = frozenset({"engine_restarting", "overloaded", "not_ready"})


def end_state(code: str, chunks: int) -> str:
    """The end state of a stream whose last chunk ended it with `code` after `chunks`
    chunks in all: a refusal when that chunk was the only one, else an error."""
    if code == "stream_lost":
        return "stream_lost"
    return f"refused:{code}" if chunks == 1 and code in REFUSALS else f"error:{code}"


class Verdict(msgspec.Struct):
    """What a run measured (see the module docstring)."""

    scenario: str
    sent: int = 0
    completed: int = 0
    migrated: int = 0  # completed streams continued on another engine or node on the way
    errors: dict[str, int] = {}
    stream_lost: int = 0
    refused: dict[str, int] = {}
    lost: int = 0
    lost_detail: list[dict[str, Any]] = []  # when each lost request started and how it ended
    faults: list[dict[str, Any]] = []  # each: fault, target, injected_at, ok, detail, ends, ...
    before_faults: dict[str, int] = {}  # ends other than completed before the first fault
    restarts: dict[str, int] = {}
    kv_view_equal: bool | None = None
    kv_detail: str = ""
    recovered: bool = True

    @property
    def passed(self) -> bool:
        """Nothing lost, the tree recovered, and the KV views agree."""
        return self.lost == 0 and self.recovered and self.kv_view_equal is not False

    def count(self, state: str, at: float) -> None:
        """Count one request that ended in `state` ("completed", "error:CODE",
        "stream_lost", "refused:CODE" or "lost") `at` seconds after the load started."""
        kind, _, code = state.partition(":")
        if kind == "completed":
            self.completed += 1
            return
        if kind == "error":
            self.errors[code] = self.errors.get(code, 0) + 1
        elif kind == "refused":
            self.refused[code] = self.refused.get(code, 0) + 1
        elif kind == "stream_lost":
            self.stream_lost += 1
        elif kind == "lost":
            self.lost += 1
        else:
            msg = f"unknown end state {state!r}"
            raise ValueError(msg)
        before = [f for f in self.faults if f["injected_at"] <= at]
        ends = before[-1].setdefault("ends", {}) if before else self.before_faults
        ends[state] = ends.get(state, 0) + 1

    def ends_per_fault(self) -> dict[str, dict[str, int]]:
        """Each fault's ends other than completed, keyed `fault` (or `fault@target`)."""
        out: dict[str, dict[str, int]] = {}
        for fault in self.faults:
            key = fault["fault"] + (f"@{fault['target']}" if fault.get("target") else "")
            merged = out.setdefault(key, {})
            for state, n in fault.get("ends", {}).items():
                merged[state] = merged.get(state, 0) + n
        return out


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "0"


def print_verdict(verdict: Verdict) -> None:
    """The verdict as a table."""
    rows = [
        ("scenario", verdict.scenario),
        ("requests sent", verdict.sent),
        ("completed", verdict.completed),
        ("  of which migrated", verdict.migrated),
        ("ended with an error", _counts(verdict.errors)),
        ("stream_lost (client)", verdict.stream_lost),
        ("refused (never accepted)", _counts(verdict.refused)),
        ("LOST", verdict.lost),
        *(
            (
                f"  lost {d['request_id'][:8]}",
                f"sent at {d['sent_at']} s, {d['chunks']} chunks, {d['why']}",
            )
            for d in verdict.lost_detail
        ),
        ("restarts", _counts(verdict.restarts) if verdict.restarts else "none"),
        ("KV view equal", f"{verdict.kv_view_equal} ({verdict.kv_detail})"),
    ]
    if verdict.before_faults:
        rows.append(("before the first fault", _counts(verdict.before_faults)))
    for fault in verdict.faults:
        state = "ok" if fault.get("ok") else "FAILED"
        # a whole node's fault: when discovery was exact again (and a new node listed)
        fabric = "".join(
            f"{label} after {fault[key]} s; "
            for key, label in (
                ("discovery_exact_after", "discovery exact"),
                ("restarted_after", "replaced"),
            )
            if key in fault
        )
        rows.append(
            (
                f"fault {fault['fault']}",
                f"{state} at {fault['injected_at']} s; recovered after "
                f"{fault.get('recovered_after')} s; {fabric}"
                f"ends: {_counts(fault.get('ends', {}))}; {fault.get('detail', '')}",
            )
        )
    rows.append(("verdict", "PASS" if verdict.passed else "FAIL"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
