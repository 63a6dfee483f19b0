"""The sim's ZMQ outputs as a relay sees them: KV event frames, sequence numbers, replay,
per-rank ports, and pickled scheduler metrics read without sglang."""

from __future__ import annotations

import sys

from actors.engine_host.sim import END_SEQ, SimTokenizer, kv_metrics_pickle
from messages.engine import HostGenerate
from messages.kv import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    block_hashes,
    decode_sglang_batch,
)
from messages.metrics import SchedulerMetrics, decode_scheduler_metrics
from messages.request import StopConditions
from tests.engine.test_sim_harness import (
    KvSubscriber,
    MetricsSink,
    load_kv_metrics,
    replay,
    replay_batches,
    running_sim,
)

tok = SimTokenizer()


def gen(rid: str, prompt: str, max_tokens: int = 1, **kw: object) -> HostGenerate:
    return HostGenerate(
        request_id=rid,
        prompt=prompt,
        stop=StopConditions(max_tokens=max_tokens),
        **kw,  # type: ignore[arg-type]
    )


def replay_endpoint(kv_endpoint: str, dp_size: int) -> str:
    host, port = kv_endpoint.rsplit(":", 1)
    return f"{host}:{int(port) + dp_size}"


def test_live_batches_are_three_frames_with_topic_and_consecutive_sequence_numbers() -> None:
    with running_sim(topic="kv-topic") as (engine, out):
        sub = KvSubscriber(engine.info().kv_event_endpoints[0])
        try:
            sub.sync(engine)
            prompt = "abcdefghij" * 2  # 20 tokens: 5 pages of 4
            engine.submit(gen("a", prompt, max_tokens=1))
            out.wait_done("a")
            frames = sub.recv()
            engine.control("flush_cache", {})
            cleared = sub.recv()
        finally:
            sub.close()
    topic, seq, payload = frames
    assert topic == b"kv-topic"
    assert len(seq) == 8
    batch = decode_sglang_batch(payload)
    assert batch.dp_rank == 0
    ids = tok.encode(prompt)
    assert batch.events == [
        BlockStored(
            block_hashes=[h for h, _ in block_hashes(ids, 4)],
            parent_block_hash=None,
            token_ids=ids,
            block_size=4,
            lora_id=None,
            medium="GPU",
        )
    ]
    assert int.from_bytes(cleared[1], "big") == int.from_bytes(seq, "big") + 1
    assert decode_sglang_batch(cleared[2]).events == [AllBlocksCleared()]


def test_replay_returns_buffered_batches_from_a_sequence_number_then_the_end_marker() -> None:
    with running_sim(num_blocks=8) as (engine, out):
        endpoint = replay_endpoint(engine.info().kv_event_endpoints[0], 1)
        for i in range(4):  # 4 distinct 16-token prompts in 8 pages: evictions
            engine.submit(gen(f"r{i}", chr(97 + i) * 16))
            out.wait_done(f"r{i}")
        everything = replay_batches(endpoint, 0)
        tail = replay(endpoint, 3)
        beyond = replay(endpoint, 1000)
    seqs = [seq for seq, _ in everything]
    assert seqs == list(range(len(seqs)))
    assert everything[0][1].events == [AllBlocksCleared()]  # published at start
    kinds = {type(e) for _, b in everything for e in b.events}
    assert kinds == {AllBlocksCleared, BlockStored, BlockRemoved}
    assert [int.from_bytes(f[2], "big") for f in tail[:-1]] == seqs[3:]
    assert all(f[0] == b"" and f[1] == b"kv" for f in tail[:-1])
    assert tail[-1] == [b"", b"", END_SEQ, b""] == beyond[-1]
    assert len(beyond) == 1


def test_a_malformed_replay_request_is_ignored_and_the_service_goes_on() -> None:
    import zmq

    with running_sim() as (engine, _):
        endpoint = replay_endpoint(engine.info().kv_event_endpoints[0], 1)
        dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint)
            dealer.send_multipart([b"", b"\x00" * 8, b"extra"])
            assert dealer.poll(300) == 0
        finally:
            dealer.close()
        assert replay(endpoint, 0)[-1][2] == END_SEQ


def test_each_dp_rank_has_its_own_port_cache_and_sequence() -> None:
    with running_sim(dp_size=2) as (engine, out):
        info = engine.info()
        replay0 = replay_endpoint(info.kv_event_endpoints[0], 2)
        replay1 = replay_endpoint(info.kv_event_endpoints[1], 2)
        engine.submit(gen("one", "q" * 12, dp_rank=1))
        out.wait_done("one")
        engine.submit(gen("zero", "q" * 12, dp_rank=0))
        assert out.wait_done("zero")[-1].usage.cached_tokens == 0  # type: ignore[union-attr]
        engine.submit(gen("one-again", "q" * 12, dp_rank=1))
        assert out.wait_done("one-again")[-1].usage.cached_tokens == 8  # type: ignore[union-attr]
        rank0, rank1 = replay_batches(replay0), replay_batches(replay1)
    assert [s for s, _ in rank0] == [0, 1]
    assert [s for s, _ in rank1] == [0, 1]
    assert {b.dp_rank for _, b in rank0} == {0}
    assert {b.dp_rank for _, b in rank1} == {1}


def test_reset_sequence_restarts_one_rank_at_zero_with_an_empty_buffer() -> None:
    with running_sim(dp_size=2) as (engine, out):
        info = engine.info()
        sub = KvSubscriber(info.kv_event_endpoints[1])
        try:
            sub.sync(engine)
            assert engine.control("reset_sequence", {"dp_rank": 1})[0]
            engine.submit(gen("x", "w" * 8, dp_rank=1))
            out.wait_done("x")
            frames = sub.recv()
        finally:
            sub.close()
        assert int.from_bytes(frames[1], "big") == 0
        [(seq0, snapshot), (seq1, batch)] = replay_batches(
            replay_endpoint(info.kv_event_endpoints[1], 2)
        )
        assert (seq0, seq1) == (0, 1)
        assert snapshot.events == [
            AllBlocksCleared()
        ]  # a restarted publisher announces its (empty) cache
        assert isinstance(batch.events[0], BlockStored)
        rank0 = replay_batches(replay_endpoint(info.kv_event_endpoints[0], 2))
        assert [s for s, _ in rank0][-1] > 0  # the other rank carries on


def test_a_restarted_publisher_announces_every_cached_page_parents_first() -> None:
    with running_sim() as (engine, out):
        endpoint = replay_endpoint(engine.info().kv_event_endpoints[0], 1)
        for rid, prompt in (("a", "p" * 12 + "a" * 8), ("b", "p" * 12 + "b" * 8)):
            engine.submit(gen(rid, prompt, max_tokens=1))
            out.wait_done(rid)
        held = set(engine.control("kv_view", {})[2]["ranks"][0])
        assert engine.control("reset_sequence", {"dp_rank": 0})[0]
        [(seq, snapshot)] = replay_batches(endpoint)
    assert seq == 0
    assert snapshot.events[0] == AllBlocksCleared()
    stored = [e for e in snapshot.events[1:] if isinstance(e, BlockStored)]
    announced = [h for e in stored for h in e.block_hashes]
    assert set(announced) == held
    seen: set[int] = set()
    for event in stored:  # every chain starts at the root or at a page announced before
        assert event.parent_block_hash is None or event.parent_block_hash in seen
        seen.update(event.block_hashes)


def test_flush_cache_emits_all_blocks_cleared_and_is_refused_while_busy() -> None:
    with running_sim(decode_time_per_step=0.01) as (engine, out):
        endpoint = replay_endpoint(engine.info().kv_event_endpoints[0], 1)
        engine.submit(gen("busy", "v" * 9, max_tokens=500))
        out.wait_for("busy", 1)
        ok, message, _ = engine.control("flush_cache", {})
        assert not ok
        assert "not idle" in message
        engine.abort("busy")
        out.wait_done("busy")
        assert engine.control("flush_cache", {})[0]
        batches = replay_batches(endpoint)
    assert batches[-1][1].events == [AllBlocksCleared()]
    assert engine.control("stats", {})[2]["ranks"][0]["cached_blocks"] == 0


def test_scheduler_metrics_load_with_a_restricted_unpickler_and_count_tokens() -> None:
    imported_before = "sglang" in sys.modules  # another test of this process may have
    with running_sim(num_blocks=50, page_size=4, max_batch_size=7) as (engine, out):
        sink = MetricsSink(engine.info().metrics_endpoints[0])
        try:
            samples = []
            for rid in ("m1", "m2"):
                engine.submit(gen(rid, "u" * 21, max_tokens=3))
                out.wait_done(rid)
                samples.append(load_kv_metrics(sink.recv()))
                while samples[-1].request_active_slots:  # until the rank reports idle
                    samples.append(load_kv_metrics(sink.recv()))
        finally:
            sink.close()
    assert imported_before or "sglang" not in sys.modules  # the sim never imports it
    assert all(s.kv_total_blocks == 200 and s.request_total_slots == 7 for s in samples)
    assert all(s.data_parallel_rank == 0 for s in samples)
    prefill_1, idle_1, prefill_2, idle_2 = samples
    assert prefill_1.request_active_slots == 1
    assert prefill_1.gpu_prefix_cache_hit_rate == 0.0
    assert prefill_1.gpu_cache_usage_perc == 0.12  # 6 of 50 pages, rounded as SGLang does
    assert prefill_1.kv_active_blocks == 24  # tokens
    assert prefill_2.gpu_prefix_cache_hit_rate == 20 / 21
    assert (idle_2.request_active_slots, idle_2.kv_active_blocks, idle_2.gpu_cache_usage_perc) == (
        0,
        0,
        0.0,
    )
    assert idle_1.gpu_prefix_cache_hit_rate == 0.0
    assert idle_2.gpu_prefix_cache_hit_rate == 20 / 21


def test_metric_floats_are_pickled_as_floats_even_when_given_ints() -> None:
    sample = load_kv_metrics(kv_metrics_pickle(SchedulerMetrics(gpu_cache_usage_perc=1)))
    assert isinstance(sample.gpu_cache_usage_perc, float)


def test_the_nodes_own_metrics_decoder_reads_the_sims_samples() -> None:
    sample = SchedulerMetrics(
        request_active_slots=3,
        kv_active_blocks=4096,
        gpu_cache_usage_perc=0.25,
        gpu_prefix_cache_hit_rate=0.5,
        data_parallel_rank=1,
    )
    assert decode_scheduler_metrics(kv_metrics_pickle(sample)) == sample


def test_metrics_follow_sglangs_cadence_plus_one_sample_when_idle() -> None:
    with running_sim() as (engine, out):
        sink = MetricsSink(engine.info().metrics_endpoints[0])
        try:
            engine.submit(gen("c", "t" * 5, max_tokens=100))  # 1 prefill + 99 decode steps
            out.wait_done("c")
            samples = [load_kv_metrics(sink.recv())]
            while samples[-1].request_active_slots:
                samples.append(load_kv_metrics(sink.recv()))
        finally:
            sink.close()
    # after the prefill batch, after decode steps 40 and 80, and once idle
    assert [s.request_active_slots for s in samples] == [1, 1, 1, 0]
