"""The sim's ZMQ outputs read by SGLang 0.5.23's own code, in a subprocess (so this test
process never imports sglang or torch): KV event payloads decode as `KVEventBatch` and
re-encode to the same bytes, block hashes equal SGLang's `get_hash_str` chains, live
frames equal replayed ones, and the metrics pickle loads as SGLang's `KvMetrics` and
re-pickles to the same bytes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from messages.engine import HostGenerate
from messages.request import StopConditions
from tests.engine.test_sim_harness import running_sim

REPO = Path(__file__).resolve().parents[2]

SGLANG_SIDE = textwrap.dedent(
    r"""
    import json, pickle, sys, types

    import msgspec, zmq

    stub = types.ModuleType("sgl_kernel")  # the CUDA kernels are not needed to read wires
    stub.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") else (lambda *a, **k: None)
    sys.modules["sgl_kernel"] = stub

    from sglang.srt.disaggregation.kv_events import (
        AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch,
    )
    from sglang.srt.managers.scheduler_components.kv_events_publisher import KvMetrics
    from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64

    pub_endpoint, replay_endpoint, metrics_endpoint, topic = sys.argv[1:5]
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub_endpoint)
    print("subscribed", flush=True)
    assert sub.poll(30_000), "no live batch"
    live = sub.recv_multipart()
    print("live", flush=True)

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay_endpoint)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    replayed = []
    while True:
        assert dealer.poll(10_000), "replay stalled"
        frames = dealer.recv_multipart()
        if frames[2] == b"\xff" * 8:
            assert frames == [b"", b"", b"\xff" * 8, b""], frames
            break
        assert frames[0] == b"" and frames[1] == topic.encode(), frames[:2]
        replayed.append((int.from_bytes(frames[2], "big"), frames[3]))

    encoder = msgspec.msgpack.Encoder()
    digests = {}  # int64 block hash -> SGLang's hex digest
    counts = {"BlockStored": 0, "BlockRemoved": 0, "AllBlocksCleared": 0, "pages": 0,
              "chained": 0, "coalesced": 0}
    for seq, payload in replayed:
        batch = msgspec.msgpack.decode(payload, type=KVEventBatch)
        assert encoder.encode(batch) == payload, f"seq {seq} re-encodes differently"
        assert batch.attn_dp_rank == 0
        for event in batch.events:
            counts[type(event).__name__] += 1
            if isinstance(event, BlockStored):
                assert event.medium == "GPU" and event.lora_id is None
                prior = None if event.parent_block_hash is None else digests[event.parent_block_hash]
                hexes = get_hash_str(event.token_ids, prior_hash=prior, page_size=event.block_size)
                hexes = [hexes] if isinstance(hexes, str) else hexes
                assert [hash_str_to_int64(h) for h in hexes] == event.block_hashes, seq
                digests.update(zip(event.block_hashes, hexes))
                counts["pages"] += len(hexes)
                counts["chained"] += event.parent_block_hash is not None
                counts["coalesced"] += len(hexes) > 1
            elif isinstance(event, BlockRemoved):
                assert event.medium == "GPU"
                assert all(h in digests for h in event.block_hashes)
    by_seq = dict(replayed)
    live_seq = int.from_bytes(live[1], "big")
    assert live[0] == topic.encode() and by_seq[live_seq] == live[2]

    pull = ctx.socket(zmq.PULL)
    pull.bind(metrics_endpoint)
    assert pull.poll(10_000), "no metrics sample"
    raw = pull.recv()
    sample = pickle.loads(raw)
    assert type(sample) is KvMetrics, type(sample)
    assert pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL) == raw
    fields = {f: getattr(sample, f) for f in KvMetrics.__struct_fields__}
    print(json.dumps({"counts": counts, "batches": len(replayed), "metrics": fields}))
    """
)


def test_sglang_decodes_the_sims_events_hashes_and_metrics_exactly(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr"
    with (
        stderr_path.open("w") as stderr_file,
        running_sim(page_size=4, num_blocks=10, topic="wire") as (engine, out),
    ):
        info = engine.info()
        host, port = info.kv_event_endpoints[0].rsplit(":", 1)

        def run(rid: str, prompt: str, max_tokens: int = 6) -> None:
            engine.submit(
                HostGenerate(
                    request_id=rid, prompt=prompt, stop=StopConditions(max_tokens=max_tokens)
                )
            )
            out.wait_done(rid)

        run("base", "shared prefix, then more")  # stored: prompt pages, then output pages
        run("branch", "shared prefix, another tail")  # chained on the shared pages
        run("evicts", "a completely different prompt")  # 10 pages: evictions
        assert engine.control("flush_cache", {})[0]
        run("after", "shared prefix, then more")

        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SGLANG_SIDE,
                info.kv_event_endpoints[0],
                f"{host}:{int(port) + 1}",
                info.metrics_endpoints[0],
                "wire",
            ],
            env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()

        def read_lines() -> None:
            for line in proc.stdout or []:
                lines.put(line)

        reader = threading.Thread(target=read_lines)
        reader.start()
        try:
            try:
                first = lines.get(timeout=120)
            except queue.Empty:
                pytest.fail("the sglang side did not start")
            assert first.strip() == "subscribed", first
            for i in range(200):  # PUB drops batches sent before the SUB joined: keep going
                run(f"live{i}", f"{i:04d} live traffic", max_tokens=1)  # new pages: events
                try:
                    if lines.get(timeout=0.05).strip() == "live":
                        break
                except queue.Empty:
                    continue
            proc.wait(timeout=60)
        finally:
            proc.kill()
            reader.join(10)
        assert proc.returncode == 0, stderr_path.read_text()[-3000:]
        result = json.loads(lines.get(timeout=1))
    counts = result["counts"]
    assert counts["BlockStored"] >= 4
    assert counts["BlockRemoved"] >= 1
    assert counts["chained"] >= 2
    assert counts["coalesced"] >= 2
    assert counts["AllBlocksCleared"] == 2  # at start and on flush
    metrics = result["metrics"]
    assert metrics["kv_total_blocks"] == 40
    assert metrics["data_parallel_rank"] == 0
