"""Recovery and stop: engine-host kill → first successful request after the restart (real
and sim engines); actor crash → restarted; SIGTERM with 16 streams in flight → exit (all 16
end with tokens or `shutdown`).

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.recovery
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats

from messages.chaos import AdminRequest
from messages.codec import encode_json
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.benchmarks._common import median, table, write_section
from tests.node.harness import NodeProcess, start_node

RUNS = int(os.environ.get("SGL_NODE_BENCH_RUNS", "5"))
TOKEN = "bench-" + uuid.uuid4().hex


def _request(max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt="Say hello.", stop=StopConditions(max_tokens=max_tokens)
    )


async def _first_success_after(node: NodeProcess, trigger: Any) -> float:
    async with NodeClient(node.url) as client:
        trigger()
        started = time.monotonic()
        while True:
            try:
                chunks = [c async for c in client.generate(_request(), idle_timeout=120)]
                if chunks[-1].finish_reason in ("stop", "length"):
                    return time.monotonic() - started
            except Exception:  # noqa: BLE001 - no responders while deregistered, etc.
                pass
            await asyncio.sleep(0.02)


def _host_pid(node: NodeProcess) -> int:
    _, body = node.http("/tree")
    core = {r["id"]: r for r in json.loads(body)["children"]}["core"]
    engine = {r["id"]: r for r in core["children"]}["engine"]
    return int({r["id"]: r for r in engine["children"]}["engine_host"]["pid"])


def _crash(node: NodeProcess, target: str) -> None:
    async def go() -> None:
        nc = await nats.connect(node.url)
        request = AdminRequest(
            token=TOKEN, op="chaos", args={"fault": "crash_actor", "target": target}
        )
        await nc.request(
            f"dynamo.backend.admin.{node.instance_id}", encode_json(request), timeout=10
        )
        await nc.close()

    asyncio.run(go())


def _row(node: NodeProcess, target: str) -> dict[str, Any] | None:
    _, body = node.http("/tree")
    return _find(json.loads(body)["children"], target.split("/"))


def _restarted_after(node: NodeProcess, target: str) -> float:
    before = (_row(node, target) or {"restarts": 0})["restarts"]
    started = time.monotonic()
    _crash(node, target)
    while True:
        row = _row(node, target)
        if row and row["state"] == "running" and row["restarts"] > before:
            return time.monotonic() - started
        time.sleep(0.005)


def _find(rows: list[dict[str, Any]], parts: list[str]) -> dict[str, Any] | None:
    for row in rows:
        if row["id"] == parts[0]:
            return row if len(parts) == 1 else _find(row.get("children", []), parts[1:])
    return None


def _sigterm_with_streams(node: NodeProcess) -> tuple[float, dict[str, int]]:
    async def go() -> tuple[float, dict[str, int]]:
        async with NodeClient(node.url) as client:
            started_events = [asyncio.Event() for _ in range(16)]

            async def stream(event: asyncio.Event) -> StreamChunk:
                last = None
                async for chunk in client.generate(_request(max_tokens=400), idle_timeout=60):
                    event.set()
                    last = chunk
                assert last is not None
                return last

            tasks = [asyncio.create_task(stream(e)) for e in started_events]
            await asyncio.gather(*(e.wait() for e in started_events))
            t0 = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            finals = await asyncio.gather(*tasks)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, node.proc.wait, 60)
            took = time.monotonic() - t0
            outcomes: dict[str, int] = {}
            for final in finals:
                outcomes[str(final.finish_reason)] = outcomes.get(str(final.finish_reason), 0) + 1
            return took, outcomes

    return asyncio.run(go())


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    os.environ["SGL_NODE_ADMIN_TOKEN"] = TOKEN
    rows: list[tuple[Any, ...]] = []
    for backend, runs in (("sim", RUNS), ("sglang", max(2, RUNS // 2))):
        node = start_node(
            tmp,
            backend=backend,
            name=backend,
            admin={"enabled": True},
            chaos={"enabled": True},
            engine__sim={"decode_time_per_step": 0.005},
            shutdown={"drain_timeout": 2.0},
            # Measure the mechanism, not the backoff policy (restart at once, as OTP does).
            supervision={"backoff_initial": 0.0, "intensity": 100},
        )
        try:
            node.wait_ready(600)
            kill_times = []
            for _ in range(runs):
                pid = _host_pid(node)
                kill_times.append(
                    asyncio.run(
                        _first_success_after(node, lambda p=pid: os.kill(p, signal.SIGKILL))
                    )
                )
                node.wait_ready(600)
            rows.append(
                (
                    f"engine host kill -9 → first successful request ({backend})",
                    median(kill_times),
                    runs,
                )
            )
            crash_times = []
            for _ in range(runs):
                crash_times.append(_restarted_after(node, "core/handlers/handler-1"))
            rows.append(
                (
                    f"handler actor crash → restarted and running ({backend})",
                    median(crash_times),
                    runs,
                )
            )
            if backend == "sim":
                took, outcomes = _sigterm_with_streams(node)
                rows.append(
                    (
                        f"SIGTERM with 16 streams → exit {node.proc.returncode}; streams end {outcomes} ({backend})",
                        took,
                        1,
                    )
                )
        finally:
            node.kill()
    body = (
        "Sim engine: 5 ms decode steps. Real engine: SmolLM2-135M-Instruct on the CPU (an SGLang start is ~25 s). "
        "Backoff between restarts is off (`supervision.backoff_initial = 0`), so the figures measure the "
        "mechanism; with the default policy (0.5 s, doubling) repeated restarts wait longer by design. "
        "Times in seconds: the median over the runs in the last column (1: that one run's time); "
        "absolute figures, with no baseline run beside them.\n\n"
        + table(["what", "seconds", "runs"], rows)
    )
    write_section("recovery", "Recovery and stop", body)


if __name__ == "__main__":
    main()
