"""Load metrics: SGLang's scheduler metrics (as it sends them) and ours on NATS."""

from __future__ import annotations

import io
import pickle
from typing import Any

import msgspec

from messages.codec import DecodeError

__all__ = [
    "KV_METRICS_MODULE",
    "KvMetrics",
    "LoadMetrics",
    "SchedulerMetrics",
    "decode_scheduler_metrics",
]


class SchedulerMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """SGLang's `KvMetrics` (kv_events_publisher.py): KV figures are in tokens, not pages."""

    request_active_slots: int = 0
    request_total_slots: int = 0
    kv_active_blocks: int = 0
    kv_total_blocks: int = 0
    num_requests_waiting: int = 0
    gpu_cache_usage_perc: float = 0.0  # a fraction 0..1
    gpu_prefix_cache_hit_rate: float = 0.0
    data_parallel_rank: int = 0


class LoadMetrics(msgspec.Struct, frozen=True):
    """Published on `{namespace}.{component}.load_metrics` every interval, per DP rank."""

    instance_id: str
    dp_rank: int
    request_active_slots: int
    request_total_slots: int
    kv_active_blocks: int  # pages
    kv_total_blocks: int  # pages
    num_requests_waiting: int
    cache_usage: float  # 0..1
    prefix_hit_rate: float  # 0..1
    ts: float
    stale: bool = False  # no scheduler sample since the last interval


# SGLang pickles `KvMetrics` (a msgspec Struct) over its metrics socket, named by its
# module. We never unpickle arbitrary classes: only msgspec's rebuild helper and that one
# class, mapped to `KvMetrics` below, are allowed; anything else is refused.
KV_METRICS_MODULE = "sglang.srt.managers.scheduler_components.kv_events_publisher"


class KvMetrics(msgspec.Struct, tag=True, kw_only=True, array_like=True):
    """SGLang 0.5.23's `KvMetrics` (kv_events_publisher.py:31), field for field and with
    its struct options: what the scheduler pickles (the sim sends exactly this)."""

    request_active_slots: int = 0
    request_total_slots: int = 0
    kv_active_blocks: int = 0
    kv_total_blocks: int = 0
    num_requests_waiting: int = 0
    gpu_cache_usage_perc: float = 0.0
    gpu_prefix_cache_hit_rate: float = 0.0
    data_parallel_rank: int = 0


KvMetrics.__module__ = KV_METRICS_MODULE


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (KV_METRICS_MODULE, "KvMetrics"):
            return KvMetrics
        if (module, name) == ("msgspec._utils", "rebuild"):
            from msgspec import _utils

            return _utils.rebuild  # type: ignore[attr-defined]
        msg = f"refusing to unpickle {module}.{name}"
        raise pickle.UnpicklingError(msg)


def decode_scheduler_metrics(data: bytes) -> SchedulerMetrics:
    """Decode one scheduler metrics message (pickle, or msgpack when SGLang's pickle IPC is
    off); raises `DecodeError` for anything else."""
    try:
        if data[:1] == b"\x80":  # a pickle protocol marker
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
            if not isinstance(obj, KvMetrics):
                raise DecodeError("KvMetrics", "", f"unexpected object {type(obj).__name__}")
            return msgspec.convert(msgspec.structs.asdict(obj), SchedulerMetrics)
        raw = msgspec.msgpack.decode(data)
        if isinstance(raw, list) and raw and raw[0] == "KvMetrics":
            names = [f.name for f in msgspec.structs.fields(SchedulerMetrics)]
            return msgspec.convert(dict(zip(names, raw[1:], strict=False)), SchedulerMetrics)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        msgspec.DecodeError,
    ) as exc:
        raise DecodeError("KvMetrics", "", f"{type(exc).__name__}: {exc}") from None
    raise DecodeError("KvMetrics", "", "neither a pickled nor a msgpack KvMetrics")
