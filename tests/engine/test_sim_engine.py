"""SimEngine end to end (real threads, real ZMQ): streaming, validation, aborts, load,
timing, DP routing, control ops and close."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
import zmq

from actors.engine_host.sim import SimEngine, SimTokenizer, expected_output
from messages.engine import HostGenerate
from messages.request import ChatMessage, SamplingOptions, StopConditions
from supervisor.config import SimSection
from tests.engine.test_sim_harness import (
    WAIT,
    Collector,
    free_ports,
    running_sim,
    text_of,
    tokens_of,
)

tok = SimTokenizer()


def gen(
    rid: str, prompt: str = "tell me a story", max_tokens: int = 16, **kw: object
) -> HostGenerate:
    return HostGenerate(
        request_id=rid,
        prompt=prompt,
        stop=StopConditions(max_tokens=max_tokens),
        **kw,  # type: ignore[arg-type]
    )


# -- streaming ---------------------------------------------------------------------------


def test_the_stream_is_one_token_per_chunk_and_equals_expected_output() -> None:
    with running_sim() as (engine, out):
        engine.submit(gen("a", "hello there", max_tokens=12))
        chunks = out.wait_done("a")
    assert [len(c.token_ids) for c in chunks] == [1] * 12
    assert tokens_of(chunks) == expected_output(tok.encode("hello there"), 12)
    assert text_of(chunks) == tok.decode(expected_output(tok.encode("hello there"), 12))
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 12)


def test_token_ids_and_chat_messages_are_prompts_too() -> None:
    messages = [ChatMessage(role="user", content="hi")]
    templated = tok.encode("<|user|>\nhi\n<|assistant|>\n")
    with running_sim() as (engine, out):
        engine.submit(HostGenerate(request_id="ids", token_ids=[7, 8, 9, 10]))
        engine.submit(HostGenerate(request_id="chat", messages=messages))
        assert tokens_of(out.wait_done("ids")) == expected_output([7, 8, 9, 10], 128)
        chat = out.wait_done("chat")
    assert tokens_of(chat) == expected_output(templated, 128)
    assert chat[-1].usage is not None
    assert chat[-1].usage.prompt_tokens == len(templated)


def test_stop_strings_and_stop_tokens_end_the_stream_with_stop() -> None:
    prompt = "the quick brown fox"
    full = tok.decode(expected_output(tok.encode(prompt), 40))
    token = expected_output(tok.encode(prompt), 40)[7]
    with running_sim() as (engine, out):
        engine.submit(
            HostGenerate(
                request_id="s", prompt=prompt, stop=StopConditions(max_tokens=40, stop=[full[5:8]])
            )
        )
        engine.submit(
            HostGenerate(
                request_id="t",
                prompt=prompt,
                stop=StopConditions(max_tokens=40, stop_token_ids=[token]),
            )
        )
        by_string, by_token = out.wait_done("s"), out.wait_done("t")
    assert (text_of(by_string), by_string[-1].finish_reason) == (full[:5], "stop")
    assert (len(by_token), by_token[-1].finish_reason) == (8, "stop")


def test_a_repeated_prompt_reports_its_cached_tokens() -> None:
    prompt = "x" * 37
    with running_sim(page_size=4) as (engine, out):
        engine.submit(gen("first", prompt, max_tokens=2))
        first = out.wait_done("first")[-1].usage
        engine.submit(gen("again", prompt, max_tokens=2))
        again = out.wait_done("again")[-1].usage
        stats = engine.control("stats", {})[2]["ranks"][0]
    assert first is not None
    assert again is not None
    assert (first.cached_tokens, again.cached_tokens) == (0, 36)
    assert stats["last_hit_rate"] == pytest.approx(36 / 37)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "message"),
    [
        (HostGenerate(request_id="e"), "exactly one of token_ids, prompt, messages"),
        (HostGenerate(request_id="e", prompt="a", token_ids=[5]), "exactly one"),
        (HostGenerate(request_id="e", prompt=""), "prompt is empty"),
        (HostGenerate(request_id="e", messages=[]), "messages is empty"),
        (
            HostGenerate(request_id="e", token_ids=[5, 400]),
            "token id 400 is outside the vocabulary",
        ),
        (gen("e", "y" * 65), "the prompt has 65 tokens, over the context length 64"),
        (gen("e", "y" * 20, max_prompt_tokens=10), "over max_prompt_tokens 10"),
        (gen("e", "y" * 60, max_tokens=5), "plus max_tokens (5) exceeds the context length 64"),
        (
            gen("e", "y" * 10, max_tokens=40),
            "needs 13 KV pages, more than the cache's num_blocks 12",
        ),
        (gen("e", dp_rank=1), "dp_rank 1 is out of range (dp_size 1)"),
    ],
)
def test_an_invalid_request_gets_one_error_chunk_naming_the_limit(
    cmd: HostGenerate, message: str
) -> None:
    with running_sim(context_length=64, num_blocks=12, vocab_size=300) as (engine, out):
        engine.submit(cmd)
        [chunk] = out.wait_done("e")
    assert (chunk.finish_reason, chunk.error_code) == ("error", "invalid_request")
    assert message in chunk.error_message


def test_a_request_id_already_in_flight_is_refused() -> None:
    with running_sim(decode_time_per_step=0.01) as (engine, out):
        engine.submit(gen("dup", max_tokens=50))
        out.wait_for("dup", 1)
        engine.submit(gen("dup"))
        chunks = out.wait_for("dup", 2)
        assert chunks[-1].error_code == "invalid_request"
        assert "already running" in chunks[-1].error_message
        engine.abort("dup")


# -- aborts --------------------------------------------------------------------------------


def test_an_abort_mid_stream_ends_it_with_cancelled_promptly() -> None:
    with running_sim(decode_time_per_step=0.01) as (engine, out):
        engine.submit(gen("long", max_tokens=2000))
        out.wait_for("long", 3)
        engine.abort("long")
        chunks = out.wait_done("long", timeout=30.0)
        stats = engine.control("stats", {})[2]["ranks"][0]
    last = chunks[-1]
    assert (last.finish_reason, last.token_ids) == ("cancelled", [])
    assert last.usage is not None
    assert last.usage.completion_tokens == len(chunks) - 1 < 2000  # cut short by the abort
    assert (stats["running"], stats["used_blocks"], stats["aborted"]) == (0, 0, 1)


def test_aborting_the_only_request_as_a_step_begins_never_breaks_the_scheduler() -> None:
    # Regression: a step that found nothing left after reaping aborts crashed the rank.
    with running_sim(decode_time_per_step=0.0, context_length=100_000, num_blocks=20_000) as (
        engine,
        out,
    ):
        for i in range(100):
            engine.submit(gen(f"alone-{i}", max_tokens=3000))
            out.wait_for(f"alone-{i}", 2)
            engine.abort(f"alone-{i}")  # the only running request, aborted mid-decode
            assert out.wait_done(f"alone-{i}")[-1].finish_reason in ("cancelled", "length")
        engine.submit(gen("after", max_tokens=3))
        assert out.wait_done("after")[-1].finish_reason == "length"


def test_a_waiting_request_is_cancelled_at_once_and_unknown_ids_are_ignored() -> None:
    with running_sim(max_batch_size=1, decode_time_per_step=0.01) as (engine, out):
        engine.submit(gen("runs", max_tokens=2000))
        out.wait_for("runs", 1)
        engine.submit(gen("waits"))
        engine.abort("waits")
        engine.abort("nobody")
        [chunk] = out.wait_done("waits")
        assert chunk.finish_reason == "cancelled"
        assert chunk.usage is not None
        assert chunk.usage.completion_tokens == 0
        engine.abort("runs")
        assert out.wait_done("runs")[-1].finish_reason == "cancelled"


def test_higher_priority_waiting_requests_are_admitted_first() -> None:
    with running_sim(max_batch_size=1, decode_time_per_step=0.005) as (engine, out):
        engine.submit(gen("first", max_tokens=50))
        out.wait_for("first", 1)
        engine.submit(gen("low", max_tokens=2, priority=0))
        engine.submit(gen("high", max_tokens=2, priority=5))
        out.wait_done("low")
    assert out.order.index("high") < out.order.index("low")


# -- load and timing -------------------------------------------------------------------------


def test_fifty_concurrent_requests_all_finish_through_batch_and_cache_limits() -> None:
    ids = [f"r{i:02d}" for i in range(50)]
    with running_sim(max_batch_size=8, num_blocks=40, token_budget=64, dp_size=2) as (engine, out):
        threads = [
            threading.Thread(
                target=engine.submit, args=(gen(r, f"prompt number {i % 7}", max_tokens=20),)
            )
            for i, r in enumerate(ids)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {r: out.wait_done(r) for r in ids}
        ranks = engine.control("stats", {})[2]["ranks"]
    for i, r in enumerate(ids):
        assert results[r][-1].finish_reason == "length"
        assert tokens_of(results[r]) == expected_output(tok.encode(f"prompt number {i % 7}"), 20)
    assert sum(rank["finished"] for rank in ranks) == 50
    assert all(rank["finished"] > 0 and rank["used_blocks"] == 0 for rank in ranks)


def test_prefill_time_is_charged_per_uncached_token() -> None:
    with running_sim(prefill_time_per_token=0.001) as (engine, out):
        started = time.monotonic()
        engine.submit(gen("p", "z" * 200, max_tokens=1))
        out.wait_done("p")
        assert time.monotonic() - started >= 0.2


def test_the_slow_op_multiplies_the_timing_model() -> None:
    with running_sim(decode_time_per_step=0.01) as (engine, out):
        assert engine.control("slow", {"factor": 0})[0] is False
        ok, _, data = engine.control("slow", {"factor": 5.0})
        assert ok
        assert data == {"factor": 5.0}
        started = time.monotonic()
        engine.submit(gen("slow", max_tokens=11))  # 10 decode steps of 0.05 s
        out.wait_done("slow")
        assert time.monotonic() - started >= 0.5


# -- DP routing -------------------------------------------------------------------------------


def test_requests_go_to_the_pinned_rank_or_the_least_loaded_one() -> None:
    with running_sim(dp_size=2, decode_time_per_step=0.01) as (engine, out):
        engine.submit(gen("pinned", max_tokens=500, dp_rank=1))
        out.wait_for("pinned", 1)
        engine.submit(gen("free", max_tokens=500))
        out.wait_for("free", 1)
        ranks = engine.control("stats", {})[2]["ranks"]
        assert [r["running"] for r in ranks] == [1, 1]
        engine.abort("pinned")
        engine.abort("free")
        out.wait_done("pinned")
        out.wait_done("free")


# -- control ops and life cycle -----------------------------------------------------------------


def test_release_memory_refuses_work_until_resume_and_needs_an_idle_engine() -> None:
    with running_sim(decode_time_per_step=0.01) as (engine, out):
        engine.submit(gen("busy", max_tokens=500))
        out.wait_for("busy", 1)
        ok, message, _ = engine.control("release_memory", {})
        assert not ok
        assert "not idle" in message
        engine.abort("busy")
        out.wait_done("busy")
        assert engine.control("release_memory", {})[0]
        engine.submit(gen("refused"))
        [chunk] = out.wait_done("refused")
        assert (chunk.error_code, chunk.finish_reason) == ("engine_error", "error")
        assert engine.control("stats", {})[2]["ranks"][0]["cached_blocks"] == 0
        assert engine.control("resume_memory", {})[0]
        engine.submit(gen("accepted", max_tokens=2))
        assert out.wait_done("accepted")[-1].finish_reason == "length"


def test_unknown_ops_and_bad_arguments_are_refused() -> None:
    with running_sim(dp_size=2) as (engine, _):
        assert engine.control("bogus", {}) == (False, "unknown op 'bogus' for the sim backend", {})
        assert engine.control("reset_sequence", {"dp_rank": 2})[0] is False
        ok, _, info = engine.control("info", {})
        assert ok
        assert info["backend"] == "sim"
        assert info["dp_size"] == 2


def test_info_describes_the_engine_and_its_endpoints() -> None:
    with running_sim(dp_size=2, num_blocks=99) as (engine, _):
        info = engine.info()
    assert info.backend == "sim"
    assert info.total_kv_blocks == 99
    assert info.page_size == 4
    port = int(info.kv_event_endpoints[0].rsplit(":", 1)[1])
    assert info.kv_event_endpoints == [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"]
    assert len(info.metrics_endpoints) == 2
    assert info.eos_token_ids == [2]


def test_close_ends_in_flight_requests_with_an_error_and_does_not_hang() -> None:
    with running_sim(decode_time_per_step=0.05, max_batch_size=1) as (engine, out):
        engine.submit(gen("running", max_tokens=1000))
        engine.submit(gen("waiting"))
        out.wait_for("running", 1)
        serving = threading.Thread(target=engine.serve)
        serving.start()
        closing = threading.Thread(target=engine.close)
        closing.start()
        closing.join(WAIT)
        assert not closing.is_alive(), "close hangs"
        serving.join(WAIT)
        assert not serving.is_alive()
        for rid in ("running", "waiting"):
            last = out.wait_done(rid)[-1]
            assert (last.finish_reason, last.error_code) == ("error", "engine_restarting")
        engine.submit(gen("late"))
        assert out.wait_done("late")[-1].error_code == "engine_error"
        engine.close()  # idempotent


def test_constructor_arguments_are_checked_up_front() -> None:
    def make(**kw: object) -> SimEngine:
        args: dict[str, object] = {
            "dp_size": 2,
            "page_size": 4,
            "kv_events_port": 5557,
            "kv_topic": "",
            "metrics_endpoints": [],
            "emit": Collector(),
        }
        args.update(kw)
        return SimEngine(SimSection(), **args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="overlap"):
        make(replay_port=5558)
    with pytest.raises(ValueError, match="expected 2"):
        make(metrics_endpoints=["ipc:///tmp/x"])
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        SimEngine(
            SimSection(vocab_size=100),
            dp_size=1,
            page_size=1,
            kv_events_port=1,
            kv_topic="",
            metrics_endpoints=[],
            emit=Collector(),
        )


def test_a_port_in_use_fails_start_and_leaves_no_thread_behind() -> None:
    base = free_ports(2)
    blocker: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    blocker.setsockopt(zmq.LINGER, 0)
    blocker.bind(f"tcp://127.0.0.1:{base + 1}")  # DP rank 1's port
    before = threading.active_count()
    engine = SimEngine(
        SimSection(),
        dp_size=2,
        page_size=4,
        kv_events_port=base,
        kv_topic="",
        metrics_endpoints=[],
        emit=Collector(),
    )
    try:
        with pytest.raises(zmq.ZMQError, match="in use"):
            engine.start()
        assert threading.active_count() == before
        with pytest.raises(RuntimeError, match="closed"):
            engine.start()
        engine.close()
        engine.serve()  # returns at once: the engine is closed
    finally:
        blocker.close()


# -- guided decoding ------------------------------------------------------------------------

TOOL_CALLS_SCHEMA = {  # what the frontend asks for with tool_choice "required"
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "anyOf": [
            {
                "properties": {
                    "name": {"type": "string", "enum": ["get_weather"]},
                    "parameters": {"$ref": "#/$defs/place"},
                },
                "required": ["name", "parameters"],
            }
        ],
    },
    "$defs": {
        "place": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
            },
            "required": ["city"],
        }
    },
}


def test_a_json_schema_request_gets_a_document_valid_against_it_then_eos() -> None:
    schema = json.dumps(TOOL_CALLS_SCHEMA)
    with running_sim() as (engine, out):
        for rid, prompt in (("a", "weather in Paris?"), ("b", "and in Rome?")):
            engine.submit(
                gen(rid, prompt, max_tokens=200, sampling=SamplingOptions(json_schema=schema))
            )
        first, second = out.wait_done("a"), out.wait_done("b")
    for chunks in (first, second):
        document = json.loads(text_of(chunks))
        jsonschema.validate(document, TOOL_CALLS_SCHEMA)
        assert document[0]["name"] == "get_weather"
        assert chunks[-1].finish_reason == "stop"
        assert tokens_of(chunks)[-1] == 2  # EOS: streamed and counted, its text left out
    assert text_of(first) != text_of(second)  # a function of the prompt, as the answers are


def test_a_json_schema_document_is_cut_at_max_tokens() -> None:
    schema = '{"type": "object", "properties": {"a": {"type": "string"}}}'
    with running_sim() as (engine, out):
        engine.submit(gen("a", max_tokens=4, sampling=SamplingOptions(json_schema=schema)))
        chunks = out.wait_done("a")
    assert chunks[-1].finish_reason == "length"
    assert text_of(chunks) == '{"a"'
