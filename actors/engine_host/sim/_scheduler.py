"""The scheduler of one DP rank: a thread that runs SGLang's loop in simulated time.

Each step is a prefill batch or a decode batch, as in SGLang without mixed chunks:
- prefill, when waiting requests can be admitted: in order (higher `priority` first,
  as SGLang's default, then arrival; nothing overtakes a head that does not fit),
  while the batch is below `max_batch_size`, the step's `token_budget` covers their
  uncached prompt tokens (the first request of a step is admitted whatever its size:
  there is no chunked prefill) and the KV cache can reserve their worst case. It costs
  `prefill_time_per_token` per uncached token and yields each new request's first token;
- decode, otherwise: costs `decode_time_per_step` and gives every running request one
  token.
Times are multiplied by the engine's slow factor. The step's work is decided and
applied under the rank's lock; the simulated time passes outside it. Aborts take effect
at step boundaries. Each step that produced KV events flushes them as one batch.
Metrics go out after each prefill batch and every 40 decode steps (as SGLang), at most
a second apart while busy, and once when the rank goes idle (a sim addition: SGLang
sends nothing while idle).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from actors.engine_host.sim._kv_cache import PagedKvCache
from actors.engine_host.sim._kv_publisher import KvEventPublisher
from actors.engine_host.sim._metrics_pusher import MetricsSink
from actors.engine_host.sim._report import RankCounters, load_sample, rank_stats
from actors.engine_host.sim._request import SimRequest
from messages.engine import HostChunk, HostOutput

if TYPE_CHECKING:
    from supervisor.config import SimSection

__all__ = ["DECODE_LOG_INTERVAL", "RankScheduler"]

DECODE_LOG_INTERVAL = 40  # SGLang's decode_log_interval: decode steps between samples
BUSY_SAMPLE_PERIOD = 1.0  # seconds: the longest gap between samples while busy
log = structlog.get_logger(__name__)


@dataclass
class _Step:
    admitted: list[SimRequest] = field(default_factory=list)
    uncached_tokens: int = 0


class RankScheduler:
    """Waiting queue, running batch and KV cache of one DP rank, and the thread that runs
    them. Public methods are thread-safe; `emit` is called outside the rank's lock."""

    def __init__(
        self,
        dp_rank: int,
        sim: SimSection,
        page_size: int,
        publisher: KvEventPublisher,
        metrics: MetricsSink | None,
        emit: Callable[[HostOutput | list[HostChunk]], None],
        slow_factor: Callable[[], float],
        forget: Callable[[str], None],
    ) -> None:
        self.dp_rank = dp_rank
        self.cache = PagedKvCache(sim.num_blocks, page_size)
        self._sim = sim
        self._publisher = publisher
        self._metrics = metrics
        self._emit = emit
        self._slow_factor = slow_factor
        self._forget = forget  # called before a request's last chunk is emitted
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._waiting: list[SimRequest] = []
        self._running: list[SimRequest] = []
        self._counters = RankCounters()
        self._last_sample = 0.0
        self._idle_sampled = True
        self._thread = threading.Thread(target=self._run, name=f"sim-scheduler-{dp_rank}")
        self._thread.daemon = True
        self.failure = ""  # why the thread died, if it did

    # -- called from other threads ---------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread.start()

    def enqueue(self, req: SimRequest) -> None:
        """Queue a validated request."""
        with self._cond:
            bisect.insort(self._waiting, req, key=lambda r: (-r.priority, r.arrival))
            self._cond.notify()

    def abort(self, request_id: str) -> bool:
        """Cancel the request if it is here: at once when waiting, at the next step
        boundary when running. False if this rank does not have it."""
        with self._cond:
            for i, req in enumerate(self._waiting):
                if req.request_id == request_id:
                    del self._waiting[i]
                    self._counters.aborted += 1
                    chunk = req.end("cancelled")
                    break
            else:
                for req in self._running:
                    if req.request_id == request_id:
                        req.aborted = True
                        return True
                return False
        self._deliver([chunk], [request_id])
        return True

    def load(self) -> int:
        """Running plus waiting requests."""
        with self._cond:
            return len(self._running) + len(self._waiting)

    def flush_cache(self) -> bool:
        """Empty the cache (AllBlocksCleared) if the rank is idle; False if it is not."""
        with self._cond:
            if self._running or self._waiting:
                return False
            self.cache.reset()
            self._publisher.publish(self.cache.events.take())
            return True

    def republish(self) -> None:
        """After a publisher restart, announce the whole cache again (seq 0 is a snapshot)."""
        with self._cond:
            self.cache.snapshot()
            self._publisher.publish(self.cache.events.take())

    def kv_view(self) -> list[int]:
        """The block ids this rank's cache holds now."""
        with self._cond:
            return self.cache.block_ids()

    def stats(self) -> dict[str, Any]:
        """What the `stats` control op reports for this rank."""
        with self._cond:
            stats = rank_stats(
                self.dp_rank,
                self.cache,
                self._counters,
                len(self._running),
                len(self._waiting),
            )
        stats["next_kv_event_seq"] = self._publisher.next_seq
        stats["alive"] = self._thread.is_alive()
        stats["failure"] = self.failure
        return stats

    def stop(self, timeout: float) -> bool:
        """Stop the thread (in-flight requests end in error); False if it did not stop."""
        with self._cond:
            self._halt.set()
            self._cond.notify_all()
        if self._thread.ident is None:  # never started: nothing owns the socket yet
            if self._metrics is not None:
                self._metrics.close()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        reason = "engine_restarting", "the sim engine shut down"
        try:
            while self._step():
                pass
        except Exception as exc:
            log.exception("sim scheduler failed", dp_rank=self.dp_rank)
            self.failure = f"{type(exc).__name__}: {exc}"
            reason = "engine_error", f"the sim scheduler of DP rank {self.dp_rank} failed"
        finally:
            with self._cond:
                lost = self._waiting + self._running
                self._waiting, self._running = [], []
            errors = [r.fail(*reason) for r in lost]
            self._deliver(errors, [r.request_id for r in lost])
            if self._metrics is not None:
                self._metrics.close()

    def _step(self) -> bool:
        with self._cond:
            while not self._halt.is_set() and not self._waiting and not self._running:
                if not self._idle_sampled:
                    self._idle_sampled = True
                    self._sample()
                self._cond.wait()
            if self._halt.is_set():
                return False
            self._idle_sampled = False
            out, gone = self._reap_aborted()
            step = self._admit()
            if step.admitted:
                cost = self._sim.prefill_time_per_token * step.uncached_tokens
            elif self._running:
                cost = self._sim.decode_time_per_step
            elif self._waiting:  # only if a request slipped past validation: never spin on it
                out.append(self._refuse_head())
                gone.append(out[-1].request_id)
                cost = 0.0
            else:  # everything was aborted since the wait: nothing to do this step
                cost = 0.0
            self._publisher.publish(self.cache.events.take())
        self._deliver(out, gone)
        if cost > 0 and self._halt.wait(cost * self._slow_factor()):
            return False
        more: list[HostChunk] = []
        done: list[str] = []
        with self._cond:
            out, gone = self._reap_aborted()
            if step.admitted:
                more, done = self._prefill(step)
            elif self._running:  # (unless all of it was aborted meanwhile)
                more, done = self._decode()
            self._publisher.publish(self.cache.events.take())
            if time.monotonic() - self._last_sample >= BUSY_SAMPLE_PERIOD:
                self._sample()
        self._deliver(out + more, gone + done)
        return True

    def _admit(self) -> _Step:
        step = _Step()
        budget = self._sim.token_budget
        while self._waiting and len(self._running) < self._sim.max_batch_size:
            req = self._waiting[0]
            hits = len(self.cache.match_prefix(req.prompt))
            uncached = len(req.prompt) - hits * self.cache.page_size
            if step.admitted and uncached > budget:
                break
            kv = self.cache.admit(req.prompt, req.reserve_tokens)
            if kv is None:
                break  # strict order: the head waits for room, nothing overtakes it
            budget -= uncached
            req.kv, req.cached_tokens = kv, hits * self.cache.page_size
            self._waiting.pop(0)
            self._running.append(req)
            step.admitted.append(req)
            step.uncached_tokens += uncached
        return step

    def _refuse_head(self) -> HostChunk:
        req = self._waiting.pop(0)
        return req.fail(
            "invalid_request",
            f"the request needs {req.reserve_tokens} tokens of KV cache, "
            f"more than DP rank {self.dp_rank} can ever hold",
        )

    def _prefill(self, step: _Step) -> tuple[list[HostChunk], list[str]]:
        out: list[HostChunk] = []
        done: list[str] = []
        batch = [r for r in step.admitted if r in self._running]
        for req in batch:
            assert req.kv is not None
            self.cache.commit(req.kv, req.prompt)  # cache_unfinished_req
            out.append(self._advance(req, done))
        prompt = sum(len(r.prompt) for r in batch)
        self._counters.prefilled(prompt, sum(r.cached_tokens for r in batch))
        self._sample()
        return out, done

    def _decode(self) -> tuple[list[HostChunk], list[str]]:
        out: list[HostChunk] = []
        done: list[str] = []
        for req in list(self._running):
            assert req.kv is not None
            self.cache.grow(req.kv, len(req.prompt) + len(req.output_ids))
            out.append(self._advance(req, done))
        self._counters.decode_steps += 1
        if self._counters.decode_steps % DECODE_LOG_INTERVAL == 0:
            self._sample()
        return out, done

    def _advance(self, req: SimRequest, done: list[str]) -> HostChunk:
        chunk = req.advance()
        self._counters.generated_tokens += 1
        if chunk.finish_reason is not None:
            self._retire(req, req.kv_tokens)
            self._counters.finished += 1
            done.append(req.request_id)
        return chunk

    def _retire(self, req: SimRequest, kv_tokens: list[int]) -> None:
        assert req.kv is not None
        self.cache.release(req.kv, kv_tokens)  # cache_finished_req
        self._running.remove(req)

    def _reap_aborted(self) -> tuple[list[HostChunk], list[str]]:
        out: list[HostChunk] = []
        for req in [r for r in self._running if r.aborted]:
            # A request aborted before its prefill ran has no KV beyond its cache hits.
            self._retire(req, req.kv_tokens if req.output_ids else [])
            self._counters.aborted += 1
            out.append(req.end("cancelled"))
        return out, [c.request_id for c in out]

    def _sample(self) -> None:
        self._last_sample = time.monotonic()
        if self._metrics is None:
            return
        sample = load_sample(
            self.dp_rank,
            self.cache,
            self._counters,
            len(self._running),
            len(self._waiting),
            self._sim.max_batch_size,
        )
        self._metrics.send(sample)

    def _deliver(self, chunks: list[HostChunk], finished: list[str]) -> None:
        for request_id in finished:
            self._forget(request_id)
        if not chunks:
            return
        try:
            self._emit(chunks)  # one message per step
        except Exception:  # the host's problem: it must not stop this rank
            log.exception("sim: emit failed", chunks=len(chunks))
