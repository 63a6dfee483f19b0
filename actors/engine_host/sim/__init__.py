"""The sim backend: a simulated SGLang engine for fault injection, scale tests, benchmarks.

It is a simulation and says so (`EngineInfo.backend == "sim"`): a byte-level tokenizer,
a deterministic "model" (`expected_output`), fake logprobs, and simulated time. What it
exercises is real: a paged KV cache with SGLang's chained prefix hashes and LRU
eviction, a scheduler per DP rank (waiting queue, batch limit, token budget, timing
model, aborts at step boundaries), and SGLang's wire formats on the same ZMQ sockets —
KV events on a PUB per rank (with replay) and pickled `KvMetrics` on a PUSH per rank —
so the relays cannot tell it from the real engine. Its DP ranks can be spread over
several nodes (`_multinode`), the leader forwarding requests to its followers.
"""

from actors.engine_host.sim._engine import SIM_VERSION, MultiNode, SimEngine
from actors.engine_host.sim._kv_cache import KvSequence, PagedKvCache
from actors.engine_host.sim._kv_publisher import END_SEQ, KvEventPublisher
from actors.engine_host.sim._metrics_pusher import KV_METRICS_MODULE, kv_metrics_pickle
from actors.engine_host.sim._model import ALPHABET, expected_output
from actors.engine_host.sim._tokenizer import SimTokenizer, StreamDecoder

__all__ = [
    "ALPHABET",
    "END_SEQ",
    "KV_METRICS_MODULE",
    "SIM_VERSION",
    "KvEventPublisher",
    "KvSequence",
    "MultiNode",
    "PagedKvCache",
    "SimEngine",
    "SimTokenizer",
    "StreamDecoder",
    "expected_output",
    "kv_metrics_pickle",
]
