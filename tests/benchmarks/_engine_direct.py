"""Contender (a): `sgl.Engine.async_generate` in this very process, no transport at all.

    python -m tests.benchmarks._engine_direct MODEL_DIR

Reads `run CONCURRENCY` lines on stdin, answers each with one JSON line of results.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator

os.environ["SGLNODE_SGLANG_CPU"] = "1"

from actors.engine_host.sglang_args import CPU_DEFAULTS
from actors.engine_host.sglang_children import prepare_cpu_process, route_children

prepare_cpu_process()

from tests.benchmarks import _workload  # noqa: E402


def main(model_dir: str) -> None:
    from sglang.srt.entrypoints import engine as engine_module

    engine = route_children(engine_module)(
        model_path=model_dir,
        page_size=16,
        log_level="warning",
        enable_metrics=True,
        incremental_streaming_output=True,
        skip_server_warmup=True,
        **CPU_DEFAULTS,
    )
    loop = engine.loop
    params = {"max_new_tokens": _workload.MAX_TOKENS, "ignore_eos": True, "temperature": 0.0}

    async def stream() -> AsyncIterator[int]:
        generator = await engine.async_generate(
            prompt=_workload.PROMPT, sampling_params=params, stream=True
        )
        async for item in generator:
            yield len(item.get("output_ids") or [])

    print("ready", flush=True)
    for line in sys.stdin:
        concurrency = int(line.split()[1])
        result = loop.run_until_complete(_workload.run(stream, concurrency))
        print(json.dumps(result), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
