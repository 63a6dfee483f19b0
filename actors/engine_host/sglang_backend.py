"""The sglang backend: a real `sgl.Engine` inside the engine host.

Threads: `start` and `serve` run on the host's main thread, which creates the Engine (so
SGLang's signal handlers are installed and its children's PDEATHSIG is tied to a thread
that lives as long as the host) and then runs the Engine's asyncio loop until `close`.
`submit`, `abort` and `control` come from the command thread and only hand work to that
loop; every SGLang call runs on it (its ZMQ sockets are not thread-safe). The requests
themselves are `sglang_requests.Requests`; the control operations `sglang_control`.

Stopping: `close` (from the host's SIGTERM handler or a shutdown command) wakes `serve`,
which ends every in-flight request (`engine_restarting`), cancels SGLang's tasks on the
loop and calls `Engine.shutdown()`: SIGKILL of every descendant of the host, reaped. If
the host is SIGKILLed instead, PDEATHSIG takes SGLang's children down with it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from actors.engine_host import sglang_compat as compat
from actors.engine_host.builtin_model import resolve_model_path
from actors.engine_host.sglang_args import (
    SglangArgsError,
    cpu_threads_bind,
    engine_kwargs,
    is_cpu,
    local_engine_ranks,
)
from actors.engine_host.sglang_children import (
    CPU_ENV,
    METRICS_ENV,
    prepare_cpu_process,
    route_children,
    start_forkserver,
)
from actors.engine_host.sglang_control import ControlOps
from actors.engine_host.sglang_requests import STOPPING, EngineFacts, Requests
from actors.engine_host.spec import HostSpec
from messages.engine import EngineInfo, HostChunk, HostControlReply, HostEmbed, HostGenerate
from messages.request import Usage

__all__ = ["SglangBackend"]

Emit = Callable[[HostChunk | HostControlReply], None]

# An NCCL library path that does not exist (see `start`).
NO_NCCL = "/nonexistent/sgl-node/no-nccl-on-the-cpu/libnccl.so.2"
FOLLOWER_REFUSAL = (
    "this node runs a follower rank of a multi-node engine: requests go to the leader "
    "(node_rank 0), which registers the instance"
)


def _refused(request_id: str) -> HostChunk:
    return HostChunk(
        request_id,
        finish_reason="error",
        error_code="invalid_request",
        error_message=FOLLOWER_REFUSAL,
    )


class SglangBackend:
    """SGLang as an engine host backend (see the module docstring)."""

    def __init__(self, spec: HostSpec, emit: Emit) -> None:
        self.spec = spec
        self._emit = emit
        self.log = structlog.get_logger().bind(path="engine_host.sglang")
        self.engine: Any = None  # the sgl.Engine, once started
        self.facts: EngineFacts | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()  # set on the loop by close()
        self._requests: Requests | None = None
        self.model_dir: Path | None = None
        self._closing = threading.Event()
        self._serving = threading.Event()
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._control = ControlOps(self)

    # --- life cycle (main thread) ----------------------------------------------------------

    def _prepare_environment(self) -> None:
        """What SGLang (and the children it spawns) must find in the environment."""
        spec = self.spec
        if is_cpu(spec):
            os.environ[CPU_ENV] = "1"  # inherited by SGLang's children
            # torch's CUDA wheels bring libnccl along; SGLang then builds NCCL communicators
            # for CPU tensor-parallel groups and fails ("Expected a cuda device"). Pointing
            # its NCCL loader at nothing disables them; the groups use gloo.
            os.environ.setdefault("SGLANG_NCCL_SO_PATH", NO_NCCL)
            prepare_cpu_process()
            if "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
                # without it, more ranks than NUMA nodes assert on the CPU
                bind = cpu_threads_bind(local_engine_ranks(spec), always=spec.nnodes > 1)
                if bind is not None:
                    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = bind
        if self.follower:
            # SGLang's Engine blocks forever on a non-zero node rank unless told not to; it
            # then returns with the schedulers running and no tokenizer manager.
            os.environ["SGLANG_BLOCK_NONZERO_RANK_CHILDREN"] = "0"
        os.environ[METRICS_ENV] = json.dumps(spec.metrics_endpoints[: spec.dp_size])

    def start(self) -> None:
        """Resolve the model, start the Engine and read its facts; raises
        `SglangArgsError` for a bad `engine.sglang` table."""
        spec = self.spec
        self._prepare_environment()
        forkserver = is_cpu(spec)
        if forkserver:  # it imports SGLang while this process does the same
            start_forkserver()
        cache_dir = spec.model_cache_dir or None
        model_dir = resolve_model_path(spec.model_path, cache_dir, progress=self.log.info)
        self.model_dir = model_dir
        model_name = spec.served_model_name or model_dir.name
        kwargs = engine_kwargs(spec, model_dir, model_name)

        import sglang
        from sglang.srt.entrypoints import engine as engine_module

        started = time.monotonic()
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            self.engine = route_children(engine_module, forkserver)(**kwargs)
        except TypeError as exc:
            key = compat.unexpected_keyword(exc)
            if key is None:
                raise
            msg = f"engine.sglang.{key}: not a field of SGLang's ServerArgs"
            raise SglangArgsError(msg) from None
        self._loop = loop = self.engine.loop
        if self.follower:
            self._start_follower(model_name, started, previous_sigterm)
            return
        tm = self.engine.tokenizer_manager
        states = loop.run_until_complete(compat.internal_states(tm))  # the first SGLang call
        self._keep_sigterm(loop, previous_sigterm)
        info = compat.scheduler_info(self.engine)
        max_input = int(info.get("max_req_input_len") or tm.context_len)
        self.facts = EngineFacts(
            model_name=model_name,
            context_length=int(tm.context_len),
            max_prompt_tokens=min(max_input, int(tm.context_len)) - 1,
            kv_tokens=int(info.get("max_total_num_tokens") or 0),
            max_batch_size=compat.max_running_requests(states, kwargs.get("max_running_requests")),
            eos_token_ids=compat.eos_token_ids(tm),
            version=str(sglang.__version__),
            incremental=bool(getattr(tm, compat.STREAMING_FIELD, False)),
            parsers=compat.detected_parsers(tm.tokenizer, kwargs),
        )
        self._requests = Requests(self.engine, self.facts, self._emit, self._tokenizing)
        self._watch_children()
        self.log.info(
            "sglang engine started",
            seconds=round(time.monotonic() - started, 1),
            model=model_name,
            kv_tokens=self.facts.kv_tokens,
            dp_size=spec.dp_size,
        )

    def _start_follower(self, model_name: str, started: float, previous_sigterm: Any) -> None:
        """A follower's engine: SGLang's schedulers for this node's ranks, joined to the
        leader's; requests reach them only through the leader's engine."""
        import sglang

        assert self.engine is not None
        assert self._loop is not None
        self._keep_sigterm(self._loop, previous_sigterm)
        info = compat.scheduler_info(self.engine)
        context = int(info.get("max_req_input_len") or 0) + 1
        self.facts = EngineFacts(
            model_name=model_name,
            context_length=context,
            max_prompt_tokens=max(0, context - 1),
            kv_tokens=int(info.get("max_total_num_tokens") or 0),
            max_batch_size=int(info.get("max_running_requests") or 0),
            eos_token_ids=[],
            version=str(sglang.__version__),
            incremental=True,
        )
        self._watch_children()
        self.log.info(
            "sglang engine started as a follower",
            seconds=round(time.monotonic() - started, 1),
            node_rank=self.spec.node_rank,
            nnodes=self.spec.nnodes,
            dist_init_addr=self.spec.dist_init_addr,
        )

    def _watch_children(self) -> None:
        """End the host within ~0.1 s of an SGLang child's death.

        SGLang's own watchdog notices a dead scheduler only after seconds (then SIGQUITs
        the host anyway); the node wants in-flight requests failed at once, so the host
        kills its process group as soon as a child is gone, and the supervisor restarts
        the engine.
        """
        children = multiprocessing.active_children()

        def watch() -> None:
            while not self._closing.wait(0.1):
                dead = [p for p in children if not p.is_alive()]
                if dead and not self._closing.is_set():
                    names = ", ".join(f"{p.name} (pid {p.pid}, exit {p.exitcode})" for p in dead)
                    self.log.error(
                        "an SGLang child process died; ending the engine host", children=names
                    )
                    os.killpg(os.getpgrp(), signal.SIGKILL)

        threading.Thread(target=watch, name="sglang-children-watch", daemon=True).start()

    def _keep_sigterm(self, loop: asyncio.AbstractEventLoop, previous: Any) -> None:
        """SGLang's first call on the main thread installs its own SIGTERM handler on the
        loop (drain, then `sys.exit`). The host decides how it stops: SIGTERM goes back to
        the handler the host had installed, called from the loop."""
        if callable(previous):
            loop.add_signal_handler(signal.SIGTERM, previous, signal.SIGTERM, None)
        else:
            loop.add_signal_handler(signal.SIGTERM, self.close)

    def serve(self) -> None:
        """Run the Engine's loop until `close`; then end in-flight requests and shut the
        engine down."""
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._serving.clear()
            self._shutdown()

    async def _serve(self) -> None:
        self._serving.set()
        if not self._closing.is_set():
            await self._stopping.wait()
        if self._requests is not None:  # a follower has none
            await asyncio.gather(*self._requests.stop_all(), return_exceptions=True)
        current = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not current]
        for task in others:  # SGLang's output loop and watchdogs on this loop
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _shutdown(self) -> None:
        engine, self.engine = self.engine, None
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        if engine is not None:
            engine.shutdown()  # SIGKILLs and reaps every descendant of this process
            self.log.info("sglang engine stopped")

    def close(self) -> None:
        """Stop serving (from any thread, any number of times); `serve` returns."""
        self._closing.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    # --- facts -------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        """Facts for registration, the relays and the metrics actor."""
        facts = self.facts
        if facts is None:
            msg = "the engine has not started"
            raise RuntimeError(msg)
        spec = self.spec
        ranks = range(spec.dp_size)
        return EngineInfo(
            backend="sglang",
            model_name=facts.model_name,
            context_length=facts.context_length,
            page_size=spec.page_size,
            total_kv_blocks=facts.kv_tokens // spec.page_size,  # per DP rank
            max_batch_size=facts.max_batch_size,
            dp_size=spec.dp_size,
            kv_event_endpoints=[f"tcp://127.0.0.1:{spec.kv_events_port + r}" for r in ranks],
            kv_event_topic=spec.kv_topic,
            metrics_endpoints=list(spec.metrics_endpoints[: spec.dp_size]),
            eos_token_ids=facts.eos_token_ids,
            version=facts.version,
            tokenizer=str(self.model_dir) if self.model_dir is not None else "",
            parsers=dict(facts.parsers),
            prometheus_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR", spec.prometheus_dir),
            accepts_requests=not self.follower,
            kv_replay_endpoints=(
                [f"tcp://127.0.0.1:{spec.replay_port + r}" for r in ranks]
                if spec.replay_port is not None
                else []
            ),
        )

    @property
    def inflight(self) -> int:
        """Requests in flight (exact on the loop's thread)."""
        return len(self._requests) if self._requests is not None else 0

    # --- from the command thread ---------------------------------------------------------------

    def submit(self, cmd: HostGenerate) -> None:
        """Start a streaming generation on the loop."""
        if self.follower:
            self._emit(_refused(cmd.request_id))
            return
        requests = self._requests
        if requests is None or not self._call_soon(requests.start, cmd):
            self._emit(
                HostChunk(
                    cmd.request_id,
                    finish_reason="error",
                    error_code="engine_restarting",
                    error_message=STOPPING,
                )
            )

    def embed(self, cmd: HostEmbed) -> None:
        """Embed texts or token ids (the engine must run an embedding model)."""
        if self.follower:
            self._emit(_refused(cmd.request_id))
            return
        if not self._call_soon(self._start_embed, cmd):
            failed = HostChunk(
                cmd.request_id,
                finish_reason="error",
                error_code="engine_restarting",
                error_message=STOPPING,
            )
            self._emit(failed)

    @property
    def follower(self) -> bool:
        """Whether this host runs a non-zero node rank of a multi-node engine."""
        return self.spec.nnodes > 1 and self.spec.node_rank > 0

    def _start_embed(self, cmd: HostEmbed) -> None:
        assert self._loop is not None
        self._loop.create_task(self._embed(cmd))

    async def _embed(self, cmd: HostEmbed) -> None:
        assert self.engine is not None
        try:
            from sglang.srt.managers.io_struct import EmbeddingReqInput

            obj = (
                EmbeddingReqInput(text=cmd.texts)
                if cmd.texts
                else EmbeddingReqInput(input_ids=cmd.token_ids)
            )
            result = await self.engine.tokenizer_manager.generate_request(obj, None).__anext__()
            results = result if isinstance(result, list) else [result]
            vectors = [[float(v) for v in r["embedding"]] for r in results]
            tokens = sum(int(r["meta_info"].get("prompt_tokens", 0)) for r in results)
            chunk = HostChunk(
                cmd.request_id,
                finish_reason="stop",
                embeddings=vectors,
                usage=Usage(prompt_tokens=tokens, completion_tokens=0),
            )
        except ValueError as exc:  # SGLang's own input checks
            chunk = HostChunk(
                cmd.request_id,
                finish_reason="error",
                error_code="invalid_request",
                error_message=str(exc),
                error_field="input",
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            chunk = HostChunk(
                cmd.request_id,
                finish_reason="error",
                error_code="engine_error",
                error_message=f"{type(exc).__name__}: {exc}",
            )
        self._emit(chunk)

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends `cancelled`."""
        if self._requests is not None:
            self._call_soon(self._requests.abort, request_id)

    def control(self, op: str, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """A control operation, run on the loop: (ok, message, data)."""
        if self.follower:
            return False, f"{op}: {FOLLOWER_REFUSAL}", {}
        return self._control.run(op, args)

    def run_on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Await `coro` on the loop from another thread; raises TimeoutError, or
        RuntimeError when the engine is not serving."""
        loop = self._loop
        if loop is None or not self._serving.is_set() or self._closing.is_set():
            coro.close()
            msg = "the engine is not serving"
            raise RuntimeError(msg)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        if loop is None or self._closing.is_set() or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True
