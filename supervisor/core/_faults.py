"""Fault hooks: make a supervised actor hang or crash, on purpose.

In the spirit of OTP's `sys:suspend/1` and `exit(Pid, kill)`: generic operations on any
actor of a tree, found by its path, so an application's fault injection needs no
message of its own in every actor. Both go through the actor's inbox (they act between
two of its messages, as a real hang or crash of its code would).
"""

from __future__ import annotations

from dataclasses import dataclass

import pykka

from supervisor.core._names import whereis

__all__ = ["InjectCrash", "Suspend", "crash", "suspend"]


@dataclass(frozen=True)
class Suspend:
    """Block the receiving actor's thread for `seconds` (it answers nothing meanwhile)."""

    seconds: float


@dataclass(frozen=True)
class InjectCrash:
    """Raise `InjectedFaultError(detail)` inside the receiving actor."""

    detail: str


def _tell(path: str, message: object) -> bool:
    ref = whereis(path)
    if ref is None:
        return False
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


def suspend(path: str, seconds: float) -> bool:
    """Suspend the actor at `path` for `seconds`; False if nothing runs there."""
    return _tell(path, Suspend(seconds))


def crash(path: str, detail: str = "injected crash") -> bool:
    """Crash the actor at `path` (its supervisor sees a `crash` exit); False if nothing
    runs there."""
    return _tell(path, InjectCrash(detail))
