"""Child specifications and supervisor flags, their defaults, and their validation.

Every default of the supervision library is in the first table below, so a reader
can check it against the README in one look (as OTP keeps `?default_flags` and
`?default_child_spec`). Specs are validated before anything starts; a bad field
raises `InvalidSpec` naming the field and the value, as OTP's `{invalid_shutdown, -10}`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "DEFAULTS",
    "ActorStart",
    "Backoff",
    "ChildSpec",
    "InvalidSpec",
    "ProcessStart",
    "ReadyImmediately",
    "ReadyOnFile",
    "ReadyOnLine",
    "ReadyOnPort",
    "ReadyProbe",
    "SupervisorFlags",
    "validate_child_spec",
    "validate_supervisor",
]

Restart: TypeAlias = Literal["permanent", "transient", "temporary"]
Strategy: TypeAlias = Literal["one_for_one", "one_for_all", "rest_for_one", "pool"]
AutoShutdown: TypeAlias = Literal["never", "any_significant", "all_significant"]
ShutdownSpec: TypeAlias = float | Literal["infinity", "brutal"]

# All defaults of the supervision library, in one place.
DEFAULTS: Mapping[str, Any] = {
    # supervisor flags (intensity / period as OTP)
    "strategy": "one_for_one",
    "intensity": 1,
    "period": 5.0,
    "auto_shutdown": "never",
    # backoff between restarts (OTP restarts at once; we wait, growing, then reset)
    "backoff_initial": 0.1,
    "backoff_max": 10.0,
    "backoff_multiplier": 2.0,
    "backoff_jitter": 0.1,
    "backoff_reset_after": 30.0,
    # child spec (OTP: permanent, 5000 ms for workers, infinity for supervisors)
    "restart": "permanent",
    "shutdown": 5.0,
    "supervisor_shutdown": "infinity",
    "significant": False,
    "start_timeout": 30.0,
}

RESTARTS = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one", "pool")
AUTO_SHUTDOWNS = ("never", "any_significant", "all_significant")
_ID = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")


class InvalidSpec(ValueError):
    """A child spec or supervisor flag is invalid: `field` and `value` say which and what."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"invalid {field}: {value!r} ({why})")
        self.field = field
        self.value = value
        self.why = why


# --- readiness probes for process children --------------------------------------------


@dataclass(frozen=True)
class ReadyImmediately:
    """The process is ready as soon as it is spawned."""


@dataclass(frozen=True)
class ReadyOnLine:
    """Ready when a line of its output matches `pattern` (a regular expression)."""

    pattern: str
    stream: Literal["stdout", "stderr", "any"] = "any"


@dataclass(frozen=True)
class ReadyOnPort:
    """Ready when `host:port` accepts a TCP connection."""

    port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ReadyOnFile:
    """Ready when `path` exists."""

    path: str


ReadyProbe: TypeAlias = ReadyImmediately | ReadyOnLine | ReadyOnPort | ReadyOnFile


# --- how a child is started ------------------------------------------------------------


@dataclass(frozen=True)
class ActorStart:
    """Start a `SupervisedActor` subclass; it receives a `ChildContext` then `args`/`kwargs`."""

    actor_class: type[Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessStart:
    """Start an OS process in its own process group."""

    command: Sequence[str]
    env: Mapping[str, str] | None = None  # added to (or, with inherit_env=False, replacing) ours
    inherit_env: bool = True
    cwd: str | None = None
    ready: ReadyProbe = ReadyImmediately()


@dataclass(frozen=True)
class ChildSpec:
    """What a supervisor needs to know to start, restart and stop one child."""

    id: str
    start: ActorStart | ProcessStart
    restart: Restart = DEFAULTS["restart"]
    shutdown: ShutdownSpec | None = None  # None: 5 s for workers, infinity for supervisors
    significant: bool = DEFAULTS["significant"]
    start_timeout: float = DEFAULTS["start_timeout"]

    @property
    def kind(self) -> str:
        """`process`, `supervisor` or `actor`."""
        if isinstance(self.start, ProcessStart):
            return "process"
        return "supervisor" if getattr(self.start.actor_class, "is_supervisor", False) else "actor"

    @property
    def effective_shutdown(self) -> ShutdownSpec:
        """The shutdown spec with the OTP default filled in."""
        if self.shutdown is not None:
            return self.shutdown
        default: ShutdownSpec = (
            DEFAULTS["supervisor_shutdown"] if self.kind == "supervisor" else DEFAULTS["shutdown"]
        )
        return default


@dataclass(frozen=True)
class Backoff:
    """Delay before a restart: initial × multiplier^n, capped, ± jitter; n resets when quiet."""

    initial: float = DEFAULTS["backoff_initial"]
    max: float = DEFAULTS["backoff_max"]
    multiplier: float = DEFAULTS["backoff_multiplier"]
    jitter: float = DEFAULTS["backoff_jitter"]
    reset_after: float = DEFAULTS["backoff_reset_after"]


@dataclass(frozen=True)
class SupervisorFlags:
    """How a supervisor restarts its children and when it gives up."""

    strategy: Strategy = DEFAULTS["strategy"]
    intensity: int = DEFAULTS["intensity"]
    period: float = DEFAULTS["period"]
    backoff: Backoff = Backoff()
    auto_shutdown: AutoShutdown = DEFAULTS["auto_shutdown"]


# --- validation ---------------------------------------------------------------------------


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_probe(probe: object) -> None:
    if isinstance(probe, ReadyOnLine):
        try:
            re.compile(probe.pattern)
        except re.error as exc:
            raise InvalidSpec("ready.pattern", probe.pattern, str(exc)) from None
        if probe.stream not in ("stdout", "stderr", "any"):
            raise InvalidSpec("ready.stream", probe.stream, "expected stdout, stderr or any")
    elif isinstance(probe, ReadyOnPort):
        if not isinstance(probe.port, int) or not 0 < probe.port < 65536:
            raise InvalidSpec("ready.port", probe.port, "expected a TCP port 1..65535")
    elif isinstance(probe, ReadyOnFile):
        if not probe.path:
            raise InvalidSpec("ready.path", probe.path, "expected a path")
    elif not isinstance(probe, ReadyImmediately):
        raise InvalidSpec("ready", probe, "expected a readiness probe")


def validate_child_spec(spec: ChildSpec) -> None:
    """Raise `InvalidSpec` for the first invalid field of `spec`."""
    if not isinstance(spec.id, str) or not _ID.match(spec.id):
        raise InvalidSpec("id", spec.id, "expected a non-empty name of letters, digits, _.-[]")
    if isinstance(spec.start, ActorStart):
        from supervisor.core._actor import SupervisedActor

        cls = spec.start.actor_class
        if not (isinstance(cls, type) and issubclass(cls, SupervisedActor)):
            raise InvalidSpec("start", cls, "expected a SupervisedActor subclass")
    elif isinstance(spec.start, ProcessStart):
        cmd = spec.start.command
        if isinstance(cmd, str) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise InvalidSpec("start.command", cmd, "expected a non-empty list of strings")
        _validate_probe(spec.start.ready)
    else:
        raise InvalidSpec("start", spec.start, "expected ActorStart or ProcessStart")
    if spec.restart not in RESTARTS:
        raise InvalidSpec("restart", spec.restart, "expected permanent, transient or temporary")
    shutdown = spec.shutdown
    if shutdown not in (None, "infinity", "brutal") and (
        not _number(shutdown) or shutdown < 0  # type: ignore[operator]
    ):
        raise InvalidSpec("shutdown", shutdown, "expected seconds >= 0, infinity or brutal")
    if not isinstance(spec.significant, bool):
        raise InvalidSpec("significant", spec.significant, "expected a bool")
    if spec.significant and spec.restart == "permanent":
        # OTP: {bad_combination, [{restart, permanent}, {significant, true}]}
        raise InvalidSpec("significant", True, "a permanent child cannot be significant")
    if not _number(spec.start_timeout) or spec.start_timeout <= 0:
        raise InvalidSpec("start_timeout", spec.start_timeout, "expected seconds > 0")


def validate_flags(flags: SupervisorFlags) -> None:
    """Raise `InvalidSpec` for the first invalid supervisor flag."""
    if flags.strategy not in STRATEGIES:
        raise InvalidSpec("strategy", flags.strategy, f"expected one of {', '.join(STRATEGIES)}")
    if not isinstance(flags.intensity, int) or isinstance(flags.intensity, bool):
        raise InvalidSpec("intensity", flags.intensity, "expected an integer >= 0")
    if flags.intensity < 0:
        raise InvalidSpec("intensity", flags.intensity, "expected an integer >= 0")
    if not _number(flags.period) or flags.period <= 0:
        raise InvalidSpec("period", flags.period, "expected seconds > 0")
    if flags.auto_shutdown not in AUTO_SHUTDOWNS:
        raise InvalidSpec(
            "auto_shutdown", flags.auto_shutdown, f"expected one of {', '.join(AUTO_SHUTDOWNS)}"
        )
    b = flags.backoff
    for name in ("initial", "max", "jitter", "reset_after"):
        value = getattr(b, name)
        if not _number(value) or value < 0:
            raise InvalidSpec(f"backoff.{name}", value, "expected a number >= 0")
    if not _number(b.multiplier) or b.multiplier < 1:
        raise InvalidSpec("backoff.multiplier", b.multiplier, "expected a number >= 1")
    if b.jitter > 1:
        raise InvalidSpec("backoff.jitter", b.jitter, "expected a fraction 0..1")
    if b.max < b.initial:
        raise InvalidSpec("backoff.max", b.max, f"must be >= backoff.initial ({b.initial})")


def validate_supervisor(flags: SupervisorFlags, children: Sequence[ChildSpec]) -> None:
    """Validate the flags, every child spec, and how they combine."""
    validate_flags(flags)
    seen: set[str] = set()
    for spec in children:
        if not isinstance(spec, ChildSpec):
            raise InvalidSpec("child", spec, "expected a ChildSpec")
        validate_child_spec(spec)
        if spec.id in seen:
            raise InvalidSpec("id", spec.id, "duplicate child id")
        seen.add(spec.id)
        if spec.significant and flags.auto_shutdown == "never":
            # OTP refuses significant children under auto_shutdown = never.
            raise InvalidSpec("significant", True, "auto_shutdown is never")
    if flags.strategy == "pool" and len(children) != 1:
        raise InvalidSpec("children", len(children), "a pool supervisor takes exactly one spec")
