"""Registered names: the current `ActorRef` of each supervised actor, by its tree path.

Refs change with every restart, so actors find each other by path at the moment they
send (as Erlang's registered names), never by a ref kept from an earlier incarnation.
"""

from __future__ import annotations

import threading
from typing import Any

import pykka

__all__ = ["ask", "register", "unregister", "whereis"]

_lock = threading.Lock()
_names: dict[str, pykka.ActorRef[Any]] = {}


def register(path: str, ref: pykka.ActorRef[Any]) -> None:
    """Bind `path` to `ref` (replacing an earlier incarnation)."""
    with _lock:
        _names[path] = ref


def unregister(path: str) -> None:
    """Forget `path` (idempotent)."""
    with _lock:
        _names.pop(path, None)


def whereis(path: str) -> pykka.ActorRef[Any] | None:
    """The live ref registered at `path`, or None."""
    with _lock:
        ref = _names.get(path)
    if ref is not None and not ref.is_alive():
        return None
    return ref


def ask(path: str, message: object, timeout: float) -> Any:
    """Ask the actor registered at `path` and wait up to `timeout` for the answer.

    Raises LookupError when nothing runs there (e.g. it is restarting).
    """
    ref = whereis(path)
    if ref is None:
        msg = f"no actor is running at {path}"
        raise LookupError(msg)
    return ref.ask(message, timeout=timeout)
