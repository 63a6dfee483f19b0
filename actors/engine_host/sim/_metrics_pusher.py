"""SGLang's scheduler metrics, byte for byte: a pickled `KvMetrics` on a PUSH socket.

SGLang sends `socket.send_pyobj(KvMetrics(...), protocol=pickle.HIGHEST_PROTOCOL)`. A
msgspec Struct pickles as `msgspec._utils.rebuild(cls, {field: value})`, and the class is
written by module and qualified name, so the bytes name
`sglang.srt.managers.scheduler_components.kv_events_publisher.KvMetrics`. The `KvMetrics`
of messages/metrics.py has the identical definition. Pickle would import its module to
check that name
(and `__import__` of a dotted name loads the top-level `sglang` package, slow and heavy),
so `_KvMetricsPickler` writes that one global by name instead, exactly as the standard
pickler writes a global at protocol 4+, and touches neither `sys.modules` nor sglang.
Everything else is the standard pickler's output (the tests compare the bytes with those
of sglang's own class, and load them with it).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Protocol

import zmq

from messages.metrics import KV_METRICS_MODULE, KvMetrics, SchedulerMetrics

__all__ = ["KV_METRICS_MODULE", "MetricsPusher", "kv_metrics_pickle"]

_LINGER_MS = 200  # let a last sample leave on close, but never wait long for a consumer


class _KvMetricsPickler(pickle._Pickler):
    """The pure-Python pickler, naming `KvMetrics` without importing its module."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is not KvMetrics:
            super().save_global(obj, name)  # type: ignore[misc]
            return
        # pickle.py's save_global for protocol >= 4, minus the import check.
        self.save(KV_METRICS_MODULE)  # type: ignore[attr-defined]
        self.save("KvMetrics")  # type: ignore[attr-defined]
        self.write(pickle.STACK_GLOBAL)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]


def kv_metrics_pickle(sample: SchedulerMetrics) -> bytes:
    """The exact bytes SGLang's scheduler would send for `sample`."""
    values = {f: getattr(sample, f) for f in sample.__struct_fields__}
    for name in ("gpu_cache_usage_perc", "gpu_prefix_cache_hit_rate"):
        values[name] = float(values[name])  # an int would pickle as another opcode
    out = io.BytesIO()
    _KvMetricsPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(KvMetrics(**values))
    return out.getvalue()


class MetricsSink(Protocol):
    """Where a rank's scheduler sends its metrics samples."""

    def send(self, sample: SchedulerMetrics) -> None: ...

    def close(self) -> None: ...


class MetricsPusher:
    """The scheduler's metrics PUSH socket of one DP rank (connects; the consumer binds).

    Used by one thread at a time: created by the caller of `SimEngine.start`, then
    owned by the rank's scheduler thread.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.endpoint = endpoint
        self._socket = ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # SGLang's config_socket: unbounded
        self._socket.setsockopt(zmq.LINGER, _LINGER_MS)
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise

    def send(self, sample: SchedulerMetrics) -> None:
        """Push one sample (what `send_pyobj` would put on the wire)."""
        if not self._socket.closed:
            self._socket.send(kv_metrics_pickle(sample))

    def send_raw(self, payload: bytes) -> None:
        """Push a sample already in SGLang's bytes (a follower's rank, via the leader)."""
        if not self._socket.closed:
            self._socket.send(payload)

    def close(self) -> None:
        """Close the socket (pending samples get `_LINGER_MS` to leave)."""
        self._socket.close()
