"""The HandlerActor's pure core: the stream table, without NATS, threads or a clock."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.streams.table import StreamTable
from messages.engine import HostChunk
from messages.request import (
    Continuation,
    EmbedRequest,
    GenerateRequest,
    StopConditions,
    Usage,
)


def table(window: float = 30.0, budget: int = 1 << 20) -> StreamTable:
    return StreamTable(default_deadline=300.0, resume_window=window, resume_bytes=budget)


def request(rid: str = "r1", timeout: float | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid, token_ids=[1, 2, 3], stop=StopConditions(max_tokens=8), timeout=timeout
    )


def opened(t: StreamTable, rid: str = "r1", timeout: float | None = None) -> str:
    """Open a generate stream and submit its first attempt; the attempt's engine id."""
    t.open(request(rid, timeout), "inbox", 0.0)
    return t.submit(rid).engine_id


def decoded(data: bytes) -> dict[str, object]:
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def test_a_streams_deadline_runs_from_receipt_with_its_timeout_or_the_default() -> None:
    t = table()
    assert t.open(request("a", timeout=5.0), "inbox", received_at=100.0).deadline_at == 105.0
    assert t.open(request("b"), "inbox", received_at=100.0).deadline_at == 400.0


def test_outputs_become_chunks_with_consecutive_indices_and_the_last_ends_the_stream() -> None:
    t = table()
    opened(t)
    first = t.output(HostChunk("r1 1", token_ids=[7], text="a"), now=0.5)
    second = t.output(HostChunk("r1 1", token_ids=[8], text="b"), now=0.75)
    usage = Usage(prompt_tokens=3, completion_tokens=3)
    last = t.output(HostChunk("r1 1", token_ids=[9], finish_reason="length", usage=usage), now=1.0)
    assert first is not None
    assert second is not None
    assert last is not None
    assert [p.chunk.index for p in (first, second, last)] == [0, 1, 2]
    assert (first.ttft, first.itl) == (0.5, None)
    assert (second.ttft, second.itl) == (None, 0.25)
    assert first.ended is None
    assert second.ended is None
    assert last.ended is not None
    assert last.ended.outcome == "length"
    assert last.ended.seconds == 1.0
    assert last.ended.usage == usage
    assert "r1" not in t
    assert t.output(HostChunk("r1 1", token_ids=[10]), now=2.0) is None  # a late chunk


def test_a_cancelled_stream_ends_cancelled_and_is_aborted_once() -> None:
    t = table()
    opened(t)
    assert t.stopping("r1", "cancelled") == "abort"
    assert t.stopping("r1", "cancelled") == "none"  # already ending: no second abort
    assert t.stopping("nope", "cancelled") == "none"
    out = t.output(HostChunk("r1 1", finish_reason="cancelled"), now=1.0)
    assert out is not None
    assert out.chunk.finish_reason == "cancelled"
    assert out.chunk.error is None


def test_an_engine_cancel_after_a_deadline_is_reported_as_deadline_exceeded() -> None:
    t = table()
    opened(t, timeout=2.0)
    assert t.stopping("r1", "deadline_exceeded") == "abort"
    out = t.output(HostChunk("r1 1", finish_reason="cancelled"), now=2.1)
    assert out is not None
    assert out.chunk.finish_reason == "error"
    assert out.chunk.error is not None
    assert out.chunk.error.code == "deadline_exceeded"
    assert "2s" in out.chunk.error.message
    assert out.chunk.error.retryable is False


def test_a_stream_the_engine_does_not_end_after_its_deadline_is_ended_by_the_table() -> None:
    t = table()
    opened(t)
    t.output(HostChunk("r1 1", token_ids=[7]), now=0.1)
    late = t.stopped_chunk("r1")
    assert late is not None
    assert late.index == 1
    assert late.error is not None
    assert late.error.code == "deadline_exceeded"
    t.end("r1", late, now=301.0)
    assert t.stopped_chunk("r1") is None


def test_an_engine_cancel_during_a_drain_is_shutdown() -> None:
    t = table()
    opened(t)
    t.stopping("r1", "shutdown")
    out = t.output(HostChunk("r1 1", finish_reason="cancelled"), now=1.0)
    assert out is not None
    assert out.chunk.finish_reason == "shutdown"


def test_engine_errors_keep_a_known_code_and_map_the_rest_to_engine_error() -> None:
    t = table()
    for rid, code, expected in (
        ("a", "deadline_exceeded", "deadline_exceeded"),
        ("b", "no_such_code", "engine_error"),
        ("c", "", "engine_error"),
    ):
        opened(t, rid)
        out = t.output(HostChunk(f"{rid} 1", finish_reason="error", error_code=code), now=1.0)
        assert out is not None
        assert out.chunk.error is not None
        assert out.chunk.error.code == expected
        assert out.ended is not None
        assert out.ended.outcome == expected


def test_closing_chunks_end_every_stream_with_shutdown_or_the_given_error() -> None:
    t = table()
    opened(t, "a")
    opened(t, "b")
    t.output(HostChunk("b 1", token_ids=[5]), now=0.1)
    shutdown = t.closing_chunks()
    assert [(c.request_id, c.index, c.finish_reason) for c in shutdown] == [
        ("a", 0, "shutdown"),
        ("b", 1, "shutdown"),
    ]
    failed = t.closing_chunks(("internal", "handler failed"))
    assert {c.error.code for c in failed if c.error} == {"internal"}


def test_an_embedding_ends_with_one_answer_carrying_its_vectors() -> None:
    t = table()
    t.open(EmbedRequest(request_id="e", input="hi"), "inbox", 0.0)
    out = t.output(HostChunk("e", embeddings=[[0.5, 0.5]], usage=Usage(2, 0)), now=0.2)
    assert out is not None
    assert out.ended is not None
    answer = decoded(out.data)
    assert answer["embeddings"] == [[0.5, 0.5]]
    assert "error" not in answer


def test_an_embedding_ended_by_a_shutdown_says_not_ready() -> None:
    t = table()
    t.open(EmbedRequest(request_id="e", input="hi"), "inbox", 0.0)
    [chunk] = t.closing_chunks()
    answer = decoded(t.end("e", chunk, now=1.0).data)
    assert answer["error"] == {
        "code": "not_ready",
        "message": "the request ended: shutdown",
        "retryable": True,
    }


def test_resume_gives_a_running_or_ended_streams_chunks_from_an_index() -> None:
    t = table()
    opened(t)
    for token in (7, 8, 9):
        t.output(HostChunk("r1 1", token_ids=[token]), now=0.1)
    chunks, ended = t.resume("r1", 1, now=0.2)
    assert [decoded(c)["index"] for c in chunks] == [1, 2]
    assert ended is False
    t.output(HostChunk("r1 1", finish_reason="stop"), now=0.3)
    chunks, ended = t.resume("r1", 2, now=0.4)
    assert [decoded(c)["index"] for c in chunks] == [2, 3]
    assert ended is True


def test_ended_streams_are_forgotten_after_the_window() -> None:
    t = table(window=10.0)
    opened(t)
    t.output(HostChunk("r1 1", finish_reason="stop"), now=1.0)
    assert t.resume("r1", 0, now=11.0)[1] is True
    with pytest.raises(KeyError):
        t.resume("r1", 0, now=11.5)


def test_a_refusal_is_kept_for_resume_but_never_replaces_a_stream_in_flight() -> None:
    t = table()
    t.refused("x", b'{"request_id":"x","index":0}', now=0.0)
    assert t.resume("x", 0, now=0.1) == ([b'{"request_id":"x","index":0}'], True)
    t.open(request("r1"), "inbox", 0.0)
    t.refused("r1", b"duplicate", now=0.2)
    assert t.resume("r1", 0, now=0.3) == ([], False)
    t.refused("", b"no id", now=0.4)
    assert not t.known("")


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
    budget=st.integers(min_value=50, max_value=2000),
)
def test_the_resume_buffer_stays_within_its_byte_budget_dropping_the_oldest(
    sizes: list[int], budget: int
) -> None:
    t = table(budget=budget)
    for i, size in enumerate(sizes):
        t.refused(f"r{i}", b"x" * size, now=float(i))
        assert t.kept_bytes <= budget
    # what is kept is a suffix of what was refused: the newest ones
    kept = [i for i in range(len(sizes)) if t.known(f"r{i}")]
    assert kept == list(range(len(sizes) - len(kept), len(sizes)))


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.lists(st.integers(0, 1000), max_size=3), max_size=20),
    finish=st.sampled_from(["stop", "length", "cancelled", "error"]),
    from_index=st.integers(0, 25),
)
def test_every_stream_sends_consecutive_indices_and_resume_replays_them_exactly(
    tokens: list[list[int]], finish: str, from_index: int
) -> None:
    t = table()
    opened(t)
    published = []
    for step, ids in enumerate(tokens):
        out = t.output(HostChunk("r1 1", token_ids=ids), now=step * 0.01)
        assert out is not None
        published.append(out.data)
    last = t.output(HostChunk("r1 1", finish_reason=finish), now=1.0)
    assert last is not None
    assert last.ended is not None
    published.append(last.data)
    assert [decoded(d)["index"] for d in published] == list(range(len(published)))
    assert t.resume("r1", from_index, now=1.0) == (published[from_index:], True)


# --- continuation: a stream survives its engine -------------------------------------------


def lost(engine_id: str) -> HostChunk:
    return HostChunk(engine_id, finish_reason="error", error_code="engine_restarting")


def test_a_stream_whose_engine_went_away_waits_and_continues_from_what_its_client_has() -> None:
    t = table()
    first = opened(t)
    t.output(HostChunk(first, token_ids=[7], text="a"), now=0.1)
    t.output(HostChunk(first, token_ids=[8], text="b"), now=0.2)
    pause = t.output(lost(first), now=0.3)
    assert pause is not None
    assert pause.waits
    assert pause.ended is None
    assert pause.data == b""  # nothing for the client: it only sees a pause
    assert t.waiting() == ["r1"]
    again = t.submit("r1")
    assert again.engine_id == "r1 2"
    assert again.continuation_ids == [7, 8]
    assert again.request.stop.max_tokens == 6  # 8 asked, 2 had
    assert t.waiting() == []
    assert t.output(HostChunk(first, token_ids=[99]), now=0.4) is None  # the old attempt
    usage = Usage(prompt_tokens=3 + 2, completion_tokens=1, cached_tokens=4)
    out = t.output(HostChunk("r1 2", token_ids=[9], finish_reason="stop", usage=usage), now=0.5)
    assert out is not None
    assert out.chunk.index == 2  # the indices go on
    assert out.chunk.migrations == 1
    # usage over both attempts: the prompt as the client sent it, every completion token
    assert out.chunk.usage == Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=3)


def test_past_the_migration_limit_a_lost_engine_ends_the_stream_with_its_error() -> None:
    t = StreamTable(300.0, 30.0, 1 << 20, migration_limit=1)
    engine_id = opened(t)
    t.output(HostChunk(engine_id, token_ids=[7]), now=0.05)
    first = t.output(lost(engine_id), now=0.1)
    assert first is not None
    assert first.waits
    assert first.seam
    again = t.submit("r1").engine_id
    t.output(HostChunk(again, token_ids=[8]), now=0.15)
    second = t.output(lost(again), now=0.2)
    assert second is not None
    assert second.ended is not None
    assert second.ended.outcome == "engine_restarting"


def test_an_attempt_that_streamed_nothing_is_no_seam_and_costs_no_migration() -> None:
    t = StreamTable(300.0, 30.0, 1 << 20, migration_limit=0)
    for _ in range(3):  # e.g. a dying engine actor that answers what it never ran
        pause = t.output(lost(t.submit("r1").engine_id if "r1" in t else opened(t)), now=0.1)
        assert pause is not None
        assert pause.waits
        assert not pause.seam
    assert t.streams["r1"].migrations == 0


def test_a_waiting_stream_that_is_cancelled_ends_at_once_without_its_engine() -> None:
    t = table()
    t.output(lost(opened(t)), now=0.1)
    assert t.stopping("r1", "cancelled") == "end"
    chunk = t.stopped_chunk("r1")
    assert chunk is not None
    assert chunk.finish_reason == "cancelled"
    assert t.waiting() == []  # an ending stream is not submitted again


def test_a_continuation_request_starts_where_its_client_is() -> None:
    t = table()
    cont = Continuation(token_ids=[7, 8, 9], next_index=4, migrations=2, prompt_tokens=3)
    t.open(msgspec.structs.replace(request(), continuation=cont), "inbox", 0.0)
    sub = t.submit("r1")
    assert sub.continuation_ids == [7, 8, 9]
    assert sub.request.continuation is None  # the engine gets a plain request
    assert sub.request.stop.max_tokens == 5
    usage = Usage(prompt_tokens=6, completion_tokens=1, cached_tokens=6)
    out = t.output(
        HostChunk(sub.engine_id, token_ids=[10], finish_reason="length", usage=usage), 1.0
    )
    assert out is not None
    assert (out.chunk.index, out.chunk.migrations) == (4, 2)
    assert out.chunk.usage == Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=0)
    assert t.resume("r1", 3, now=1.0)[0][0] == out.data  # resume counts from the client's index


def test_a_continuation_with_every_token_already_is_complete() -> None:
    t = table()
    cont = Continuation(token_ids=list(range(3, 11)), next_index=8)
    t.open(msgspec.structs.replace(request(), continuation=cont), "inbox", 0.0)
    assert t.complete("r1")


def test_a_handed_over_stream_leaves_with_a_continuation_and_keeps_its_chunks() -> None:
    t = table()
    engine_id = opened(t)
    t.output(HostChunk(engine_id, token_ids=[7]), now=0.1)
    moved = t.handover_request("r1")
    assert moved.continuation == Continuation(
        token_ids=[7], next_index=1, migrations=1, reply_to="inbox"
    )
    assert t.handed_over("r1", now=0.2) == engine_id
    assert "r1" not in t
    chunks, ended = t.resume("r1", 0, now=0.3)
    assert len(chunks) == 1
    assert ended is True


def test_a_stream_adopted_after_a_crash_is_suspended_and_resubmitted() -> None:
    t = table()
    engine_id = opened(t)
    assert t.suspend("r1") == engine_id
    assert t.waiting() == ["r1"]
    assert t.streams["r1"].migrations == 1
    assert t.submit("r1").engine_id == "r1 2"


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=8),
)
def test_whatever_the_engine_losses_the_client_gets_every_token_once_in_order(
    plan: list[tuple[int, bool]],
) -> None:
    # Each step: the engine streams some tokens, then (maybe) goes away; the stream is
    # submitted again from what its client has. The client's tokens are the engine's own.
    t = StreamTable(300.0, 30.0, 1 << 20, migration_limit=100)
    t.open(request(), "inbox", 0.0)
    model = list(range(100, 200))  # the "model": token k of the answer is 100 + k
    client: list[int] = []
    indices: list[int] = []
    for produce, dies in plan:
        sub = t.submit("r1")
        start = len(sub.continuation_ids)
        assert sub.continuation_ids == model[:start]
        for k in range(start, min(start + produce, 8)):
            out = t.output(HostChunk(sub.engine_id, token_ids=[model[k]]), now=0.1)
            assert out is not None
            client += out.chunk.token_ids
            indices.append(out.chunk.index)
        if dies:
            t.output(lost(sub.engine_id), now=0.2)
        else:
            break
    assert client == model[: len(client)]
    assert indices == list(range(len(indices)))
