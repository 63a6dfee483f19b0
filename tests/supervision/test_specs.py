"""Child spec and supervisor flag validation: every bad field is refused with its name."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from supervisor.core import (
    ActorStart,
    Backoff,
    ChildSpec,
    InvalidSpec,
    ProcessStart,
    ReadyOnLine,
    ReadyOnPort,
    Root,
    StartFailed,
    SupervisorFlags,
    validate_child_spec,
    validate_flags,
    validate_supervisor,
)
from tests.supervision.children import Script, Scripted

GOOD = ActorStart(Scripted, (Script(),))
PROC = ProcessStart([sys.executable, "-c", "pass"])


def test_a_valid_spec_and_flags_pass() -> None:
    validate_supervisor(SupervisorFlags(), [ChildSpec("a", GOOD), ChildSpec("p", PROC)])


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [
        (ChildSpec("", GOOD), "id", ""),
        (ChildSpec("a b", GOOD), "id", "a b"),
        (ChildSpec("a", ActorStart(dict)), "start", dict),
        (ChildSpec("a", ProcessStart("echo hi")), "start.command", "echo hi"),
        (ChildSpec("a", ProcessStart([])), "start.command", []),
        (ChildSpec("a", GOOD, restart="sometimes"), "restart", "sometimes"),  # type: ignore[arg-type]
        (ChildSpec("a", GOOD, shutdown=-10), "shutdown", -10),
        (ChildSpec("a", GOOD, shutdown="never"), "shutdown", "never"),  # type: ignore[arg-type]
        (ChildSpec("a", GOOD, shutdown=float("nan")), "shutdown", None),
        (ChildSpec("a", GOOD, significant=True), "significant", True),
        (ChildSpec("a", GOOD, start_timeout=0), "start_timeout", 0),
        (ChildSpec("a", ProcessStart(["x"], ready=ReadyOnPort(70000))), "ready.port", 70000),
        (ChildSpec("a", ProcessStart(["x"], ready=ReadyOnLine("("))), "ready.pattern", "("),
    ],
)
def test_an_invalid_child_spec_is_refused_naming_the_field(
    spec: ChildSpec, field: str, value: Any
) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_child_spec(spec)
    assert info.value.field == field
    if value is not None:
        assert info.value.value == value


def test_the_shutdown_error_reads_like_otps() -> None:
    with pytest.raises(
        InvalidSpec, match=r"invalid shutdown: -10 \(expected seconds >= 0, infinity or brutal\)"
    ):
        validate_child_spec(ChildSpec("a", GOOD, shutdown=-10))


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (SupervisorFlags(strategy="simple_one_for_one"), "strategy"),  # type: ignore[arg-type]
        (SupervisorFlags(intensity=-1), "intensity"),
        (SupervisorFlags(intensity=1.5), "intensity"),  # type: ignore[arg-type]
        (SupervisorFlags(intensity=True), "intensity"),
        (SupervisorFlags(period=0), "period"),
        (SupervisorFlags(auto_shutdown="sometimes"), "auto_shutdown"),  # type: ignore[arg-type]
        (SupervisorFlags(backoff=Backoff(multiplier=0.5)), "backoff.multiplier"),
        (SupervisorFlags(backoff=Backoff(jitter=2)), "backoff.jitter"),
        (SupervisorFlags(backoff=Backoff(initial=5, max=1)), "backoff.max"),
        (SupervisorFlags(backoff=Backoff(initial=-1)), "backoff.initial"),
    ],
)
def test_invalid_flags_are_refused_naming_the_flag(flags: SupervisorFlags, field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_flags(flags)
    assert info.value.field == field


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="duplicate child id"):
        validate_supervisor(SupervisorFlags(), [ChildSpec("a", GOOD), ChildSpec("a", PROC)])


def test_significant_children_need_auto_shutdown() -> None:
    spec = ChildSpec("a", GOOD, restart="transient", significant=True)
    with pytest.raises(InvalidSpec, match="auto_shutdown is never"):
        validate_supervisor(SupervisorFlags(), [spec])
    validate_supervisor(SupervisorFlags(auto_shutdown="any_significant"), [spec])


def test_a_pool_takes_exactly_one_spec() -> None:
    with pytest.raises(InvalidSpec, match="exactly one spec"):
        validate_supervisor(
            SupervisorFlags(strategy="pool"), [ChildSpec("a", GOOD), ChildSpec("b", GOOD)]
        )


def test_a_supervisor_with_a_bad_spec_fails_to_start_and_starts_nothing() -> None:
    script = Script()
    root = Root(
        "root",
        SupervisorFlags(),
        [ChildSpec("a", ActorStart(Scripted, (script,))), ChildSpec("b", PROC, shutdown=-1)],
    )
    reason = root.wait_exit(5)
    assert isinstance(reason, StartFailed)
    assert "invalid shutdown: -1" in reason.cause
    assert script.seen("start") == []
