"""`WakeablePoller`: a reader thread waits on its ZMQ sockets with no timeout and still
stops at once.

A thread that polls with a timeout only to look at a halt flag now and then wakes ten
times a second for as long as the node runs; an idle node had three such threads, the
engine host one more. Here the poll also watches a pipe: `wake()` writes a byte to it, so
the thread sleeps until data comes or its owner stops it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import zmq

__all__ = ["WakeablePoller"]


class WakeablePoller:
    """A `zmq.Poller` over `sockets` plus a wake-up pipe (see the module docstring)."""

    def __init__(self, *sockets: zmq.Socket[Any]) -> None:
        self._poller = zmq.Poller()
        for sock in sockets:
            self._poller.register(sock, zmq.POLLIN)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._poller.register(self._read_fd, zmq.POLLIN)
        self._lock = threading.Lock()  # a wake never writes to a closed (reused) descriptor
        self._closed = False

    def poll(self, timeout: float | None = None) -> set[zmq.Socket[Any]]:
        """The sockets with something to read, after at most `timeout` seconds (None:
        until something comes or `wake()`); empty after a wake or a timeout."""
        events = self._poller.poll(None if timeout is None else int(timeout * 1000))
        ready = set()
        for sock, _ in events:
            if sock == self._read_fd:
                with contextlib.suppress(OSError):  # drained: several wakes are one
                    os.read(self._read_fd, 4096)
            else:
                ready.add(sock)
        return ready

    def wake(self) -> None:
        """Make the current or next `poll()` return (from any thread; after `close()`, a
        no-op)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # the pipe is full: awake anyway
                    os.write(self._write_fd, b"w")

    def close(self) -> None:
        """Close the pipe (once the polling thread is done with it)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read_fd)
                os.close(self._write_fd)
