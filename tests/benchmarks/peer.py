"""sgl-node against NVIDIA Dynamo on this machine: frontend + two workers each.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.peer [--quick]

sgl-node: its frontend (KV routing) and two sim nodes on one nats-server. Dynamo 1.6.1:
`dynamo.frontend --router-mode kv --migration-limit 3` and two `dynamo.mocker` workers
(file discovery, TCP request plane), from an environment of its own (peer_env.py). The
sim's timing is matched to the mocker's (5.7 ms per decode step, 0.0152 ms per uncached
prompt token; the mocker also pays ~17 ms per prefill step, the sim does not); zero-cost
engines: the sim at 0, the mocker at speedup 1000.

One load generator for both (_peer_load.py: plain asyncio HTTP/1.1 keep-alive, minimal
SSE parsing), chat completions of ~530 tokens (each system's own tokenizer: bytes for the
sim, SmolLM2's for the mocker) in 8 groups sharing a ~480-token system prompt, 64 output
tokens (ignore_eos), streamed. Concurrency 1, 16, 64; runs alternate A B A B; medians.
CPU from /proc/PID/stat of each process tree, per 1k output tokens: frontend, framework
(sgl-node: nodes + nats-server; Dynamo: the mocker workers, runtime and engine emulation
in one process) and engine (the sim hosts). Idle CPU over 10 s; a fault round: 16 long
streams, SIGKILL of one worker, counted completed / errors / hung. `--quick`: one run of
3 s per cell, no fault round (a few minutes); a full run is ~10 minutes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks import _peer_report as report
from tests.benchmarks._common import ROOT, percentile, python
from tests.benchmarks._peer_systems import (
    TOKENIZER_MODEL,
    Dynamo,
    SglNode,
    cpu_seconds,
    machine_busy_seconds,
)

CONCURRENCY = (1, 16, 64)
MAX_TOKENS = 64
GROUPS, PER_GROUP = 8, 8
SYSTEM_TOKENS, USER_TOKENS = 480, 50
FAULT_STREAMS, FAULT_TOKENS = 16, 512
System = SglNode | Dynamo


def _counter(system: System) -> Any:
    if isinstance(system, SglNode):
        return lambda text: len(text.encode())
    from tokenizers import Tokenizer

    from actors.engine_host.builtin_model import resolve_model_path

    tok = Tokenizer.from_file(str(resolve_model_path(TOKENIZER_MODEL) / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _text(count: Any, rng: random.Random, head: str, tokens: int) -> str:
    words = ["cache", "node", "route", "stream", "token", "prefix", "engine", "shard", "batch"]
    text = head
    while count(text) < tokens:
        text += " " + " ".join(f"{rng.choice(words)}{rng.randrange(100)}" for _ in range(8))
    return text


def prompts(system: System, tag: str) -> Path:
    """A JSON file of chat message lists: GROUPS shared system prompts × PER_GROUP users."""
    count, rng = _counter(system), random.Random(tag)
    heads = [_text(count, rng, f"[{tag} {g}] You are a helpful assistant.", SYSTEM_TOKENS)
             for g in range(GROUPS)]  # fmt: skip
    chats = [
        [{"role": "system", "content": heads[g]},
         {"role": "user", "content": _text(count, rng, f"Question {u}:", USER_TOKENS)}]
        for u in range(PER_GROUP) for g in range(GROUPS)
    ]  # fmt: skip
    path = Path(system.tmp) / f"prompts-{tag}.json"
    path.write_text(json.dumps(chats))
    return path


def run_load(system: System, conc: int, seconds: float, tag: str) -> dict[str, Any]:
    """One run: the load generator for `seconds` at `conc`; figures of that run."""
    file = prompts(system, tag)
    groups = system.groups()
    before = {k: cpu_seconds(v) for k, v in groups.items()}
    hits0, busy0 = system.hit_counts(), machine_busy_seconds()
    args = ["load", "127.0.0.1", str(system.port), system.model, str(conc), str(seconds)]
    gen = python("-m", "tests.benchmarks._peer_load", *args, str(MAX_TOKENS), str(file),
                 stdout=subprocess.PIPE)  # fmt: skip
    out, _ = gen.communicate(timeout=seconds + 300)
    load_cpu = _child_cpu()
    cpu = {k: cpu_seconds(groups[k]) - before[k] for k in groups}
    busy = machine_busy_seconds() - busy0
    result = json.loads(out.decode().strip().splitlines()[-1])
    tokens, elapsed = max(1, result["tokens"]), result["elapsed"]
    hits1 = system.hit_counts()
    if hits0 is not None and hits1 is not None:
        hit = (hits1[0] - hits0[0]) / max(1.0, hits1[1] - hits0[1])
    else:
        hit = result["cached_tokens"] / max(1, result["prompt_tokens"])
    return {
        "rps": result["requests"] / elapsed,
        "tps": result["tokens"] / elapsed,
        "errors": result["error_count"],
        "error_sample": result["errors"][:1],
        "ttft_p50": percentile(result["ttft"], 50) * 1000,
        "ttft_p99": percentile(result["ttft"], 99) * 1000,
        "itl_p50": percentile(result["itl"], 50) * 1000,
        "itl_p99": percentile(result["itl"], 99) * 1000,
        **{f"cpu_{k}": v / tokens * 1000 for k, v in cpu.items()},
        "hit_rate": hit,
        "others_cores": max(0.0, busy - sum(cpu.values()) - load_cpu) / elapsed,
    }


_reaped = [0.0]


def _child_cpu() -> float:
    """CPU of the load generators reaped since the last call."""
    total = os.times().children_user + os.times().children_system
    spent, _reaped[0] = total - _reaped[0], total
    return spent


def idle(system: System, seconds: float) -> float:
    """Percent of one core all of the system's processes use while nothing is asked."""
    pids = [p for v in system.groups().values() for p in v]
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds * 100


def fault_round(system: System) -> dict[str, Any]:
    """16 long streams; SIGKILL one worker once all have begun; their outcomes."""
    file = prompts(system, "fault")
    args = ["fault", "127.0.0.1", str(system.port), system.model, str(FAULT_STREAMS)]
    gen = python("-m", "tests.benchmarks._peer_load", *args, str(FAULT_TOKENS), str(file),
                 stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert gen.stdout is not None
    line = gen.stdout.readline().strip()
    if line == "streaming":
        time.sleep(0.5)
        system.kill_worker()
    out, _ = gen.communicate(timeout=300)
    result: dict[str, Any] = json.loads((line + "\n" + out).strip().splitlines()[-1])
    return result


def measure(zero_cost: bool, quick: bool, tmp: Path) -> dict[str, Any]:
    """Both systems with one engine timing: warm-up, idle, the runs, the fault round."""
    seconds, reps = (3.0, 1) if quick else (6.0, 3)
    systems: list[System] = []
    found: dict[str, Any] = {"runs": {}, "idle": {}, "fault": {}}
    try:
        systems = [
            SglNode(tmp / f"sgl-{zero_cost}", zero_cost),
            Dynamo(tmp / f"dyn-{zero_cost}", zero_cost),
        ]
        for system in systems:
            run_load(system, 16, 2.0, "warmup")
            if not zero_cost:
                found["idle"][system.name] = idle(system, 5.0 if quick else 10.0)
        for rep in range(reps):
            for conc in CONCURRENCY:
                for system in systems:  # A B A B
                    figures = run_load(system, conc, seconds, f"{rep}-{conc}")
                    print(system.name, "zero" if zero_cost else "timed", conc, figures, flush=True)
                    found["runs"].setdefault((system.name, conc), []).append(figures)
        if not zero_cost and not quick:
            for system in systems:
                found["fault"][system.name] = fault_round(system)
                print(system.name, "fault", found["fault"][system.name], flush=True)
    finally:
        for system in systems:
            system.stop()
    return found


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    tmp = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    for d in ("sgl-False", "sgl-True", "dyn-False", "dyn-True"):
        (tmp / d).mkdir()
    results = {mode: measure(mode == "zero", quick, tmp) for mode in ("timed", "zero")}
    report.write(results, quick, str(ROOT))


if __name__ == "__main__":
    main()
