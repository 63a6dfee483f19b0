"""Control operations of the sglang backend: each runs on the Engine's loop and answers
(ok, message, data); none may take the scheduler down.

| op | what it does |
| --- | --- |
| probe | the loop answers (cheap liveness; a dead SGLang child kills the host anyway) |
| stats | each DP rank's scheduler state (runtime part of `get_internal_state`), in flight |
| flush_cache | empties the prefix cache; SGLang refuses unless idle |
| release_memory / resume_memory | GPU only (torch_memory_saver); refused on CPU or busy |
| update_weights | `model_path` (a directory or `builtin:` name), optional `load_format` |
| start_profile / stop_profile | SGLang's torch profiler (`output_dir`, `num_steps`...) |
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from actors.engine_host import sglang_compat as compat
from actors.engine_host.builtin_model import ModelPathError, resolve_model_path
from actors.engine_host.sglang_args import is_cpu
from actors.engine_host.spec import HostSpec

__all__ = ["TIMEOUTS", "ControlOps"]

Reply = tuple[bool, str, dict[str, Any]]

# Seconds the command thread waits for each op's answer.
TIMEOUTS: dict[str, float] = {
    "probe": 5.0,
    "stats": 10.0,
    "flush_cache": 30.0,
    "release_memory": 120.0,
    "resume_memory": 120.0,
    "update_weights": 600.0,
    "start_profile": 60.0,
    "stop_profile": 300.0,
}
_CPU_MEMORY = (
    "{op} is not supported on the CPU: SGLang releases and resumes GPU memory through "
    "torch_memory_saver, which has nothing to act on here (and its scheduler asserts that "
    "it is idle, a failed assertion there would take the engine down)"
)


class EngineAccess(Protocol):
    """What the control operations need of the backend that runs them."""

    spec: HostSpec
    engine: Any  # SGLang's Engine

    @property
    def inflight(self) -> int:
        """Requests in flight."""

    def run_on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Await `coro` on the Engine's loop from another thread."""


class ControlOps:
    """The control operations of one sglang backend."""

    def __init__(self, backend: EngineAccess) -> None:
        self.backend = backend
        self._ops: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Reply]]] = {
            "probe": self.probe,
            "stats": self.stats,
            "flush_cache": self.flush_cache,
            "release_memory": self.release_memory,
            "resume_memory": self.resume_memory,
            "update_weights": self.update_weights,
            "start_profile": self.start_profile,
            "stop_profile": self.stop_profile,
        }

    def run(self, op: str, args: dict[str, Any]) -> Reply:
        """Run `op` on the loop and wait for its answer (from the command thread)."""
        handler = self._ops.get(op)
        if handler is None:
            return False, f"control op {op!r} is not supported by the sglang backend", {}
        timeout = TIMEOUTS[op]
        try:
            reply: Reply = self.backend.run_on_loop(handler(args), timeout)
        except TimeoutError:
            return False, f"{op} got no answer from the engine within {timeout:g} s", {}
        except RuntimeError as exc:
            return False, f"{op}: {exc}", {}
        return reply

    @property
    def _tm(self) -> Any:
        return self.backend.engine.tokenizer_manager

    def _busy(self, op: str) -> str | None:
        inflight = self.backend.inflight
        if inflight:
            return f"{op} needs an idle engine; {inflight} requests are in flight"
        return None

    async def probe(self, _args: dict[str, Any]) -> Reply:
        """The loop answered: the engine host is alive."""
        return True, "", {"inflight": self.backend.inflight}

    async def stats(self, _args: dict[str, Any]) -> Reply:
        """Each rank's scheduler state (its runtime part, not the ServerArgs again)."""
        states = await compat.internal_states(self._tm)
        ranks = [
            {k: compat.plain(state[k]) for k in compat.STATE_KEYS if k in state} for state in states
        ]
        return True, "", {"inflight": self.backend.inflight, "ranks": ranks}

    async def flush_cache(self, _args: dict[str, Any]) -> Reply:
        """Empty the prefix cache (AllBlocksCleared follows on the KV-event stream)."""
        if busy := self._busy("flush_cache"):
            return False, busy, {}
        ok, message = await compat.flush_cache(self._tm)
        return ok, message, {}

    async def release_memory(self, args: dict[str, Any]) -> Reply:
        """Release GPU memory (weights, KV cache) while idle."""
        return await self._memory("release_memory", args, resume=False)

    async def resume_memory(self, args: dict[str, Any]) -> Reply:
        """Take back what `release_memory` released."""
        return await self._memory("resume_memory", args, resume=True)

    async def _memory(self, op: str, args: dict[str, Any], resume: bool) -> Reply:
        if is_cpu(self.backend.spec):
            return False, _CPU_MEMORY.format(op=op), {}
        if busy := self._busy(op):
            return False, busy, {}
        tags = args.get("tags")
        if tags is not None and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        ):
            return False, f"{op}: tags must be a list of strings", {}
        await compat.release_memory(self._tm, tags, resume)
        return True, "", {}

    async def update_weights(self, args: dict[str, Any]) -> Reply:
        """Load weights from `model_path` (waits until in-flight requests finish)."""
        model_path = args.get("model_path")
        if not isinstance(model_path, str) or not model_path:
            return False, "update_weights needs args.model_path", {}
        try:
            directory = resolve_model_path(model_path, self.backend.spec.model_cache_dir or None)
        except ModelPathError as exc:
            return False, str(exc), {}
        return await compat.update_weights(self._tm, str(directory), args.get("load_format"))

    async def start_profile(self, args: dict[str, Any]) -> Reply:
        """Start SGLang's profiler; on the CPU only the CPU activity is recorded."""
        unknown = sorted(set(args) - compat.PROFILE_ARGS)
        if unknown:
            allowed = ", ".join(sorted(compat.PROFILE_ARGS))
            return False, f"start_profile: unknown args {unknown} (allowed: {allowed})", {}
        args = dict(args)
        if is_cpu(self.backend.spec):
            activities = args.setdefault("activities", ["CPU"])
            if activities != ["CPU"]:
                return False, "start_profile: only activities ['CPU'] exist on the CPU", {}
        try:
            message = await compat.start_profile(self._tm, args)
        except RuntimeError as exc:
            return False, f"start_profile: {exc}", {}
        return True, message, {}

    async def stop_profile(self, _args: dict[str, Any]) -> Reply:
        """Stop the profiler and write its traces."""
        try:
            message = await compat.stop_profile(self._tm)
        except RuntimeError as exc:
            return False, f"stop_profile: {exc}", {}
        return True, message, {}
