"""The node's stop signals (SIGTERM, SIGINT), caught from the first moment of
`python -m supervisor` until the tree has stopped.

Python kills a process on SIGTERM until a handler is installed, and the node's imports
and configuration take a few tenths of a second before `serve()` runs: a signal in that
window used to end the node with -15 instead of an ordered stop. So this module, imported
first by `supervisor/__init__`, starts catching them on import when the process is the
node (`python -m supervisor`); `serve()` takes over the signals recorded so far.

The handler only records the signal (it runs between two bytecodes of the main thread,
maybe inside a lock that thread holds) and wakes whoever polls `received` (`on_signal`);
the first one is acted on by that poller. A second signal cannot wait: it runs the
brutal stop set by `on_second` (kill every process group the node started) and exits with
128 + the signal at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

__all__ = ["catch", "catch_early", "on_second", "on_signal", "received"]

received: list[int] = []  # the stop signals received so far, in order
_brutal_stop: list[Callable[[], None]] = []
_wake: list[Callable[[], None]] = []


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    received.append(signum)
    for wake in _wake:
        wake()
    if len(received) > 1:
        note = f"sgl-node: second signal ({signal.Signals(signum).name}): brutal stop\n"
        os.write(2, note.encode())
        for stop in _brutal_stop:
            stop()
        os._exit(128 + signum)


def catch() -> list[int]:
    """Record SIGTERM and SIGINT in `received` from now on (idempotent); returns it."""
    if signal.getsignal(signal.SIGTERM) is not _on_signal:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    return received


def on_signal(wake: Callable[[], None]) -> None:
    """What every signal runs after recording itself, to wake whoever polls `received`
    (it must be safe to run inside a signal handler: e.g. `queue.SimpleQueue.put`)."""
    _wake[:] = [wake]


def on_second(brutal_stop: Callable[[], None]) -> None:
    """What a second signal runs before the process exits (only async-signal-safe work)."""
    _brutal_stop[:] = [brutal_stop]


def _running_as_the_node() -> bool:
    """True while Python locates the module of `python -m supervisor` (and not of
    `python -m supervisor.client` or another module of the package): `sys.argv[0]` is
    "-m" only then, and `sys.orig_argv` holds the interpreter's own command line."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = sys.orig_argv
    return any(
        (flag == "-m" and module == "supervisor") or flag == "-msupervisor"
        for flag, module in zip(argv, [*argv[1:], ""], strict=True)
    )


def catch_early() -> None:
    """`catch()` if this process is the node being started by `python -m supervisor`."""
    if _running_as_the_node():
        catch()


catch_early()  # on import: see the module docstring
