"""`coalesce`: a request's chunks that reached the node together become one."""

from __future__ import annotations

from actors.streams.coalesce import coalesce
from messages.engine import HostChunk
from messages.request import TokenLogprob, Usage


def _tok(rid: str, t: int, **kw: object) -> HostChunk:
    return HostChunk(request_id=rid, token_ids=[t], text=chr(97 + t % 26), **kw)  # type: ignore[arg-type]


def test_one_chunk_per_request_is_left_as_it_is() -> None:
    chunks = [_tok("a", 1), _tok("b", 2)]
    assert coalesce(chunks) is chunks


def test_several_steps_of_two_requests_become_one_chunk_each_in_order() -> None:
    steps = [_tok("a", 1), _tok("b", 5), _tok("a", 2), _tok("b", 6), _tok("a", 3)]
    a, b = coalesce(steps)
    assert (a.request_id, a.token_ids, a.text) == ("a", [1, 2, 3], "bcd")
    assert (b.request_id, b.token_ids, b.text) == ("b", [5, 6], "fg")


def test_the_last_chunks_finish_reason_and_usage_stand() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=2)
    (merged,) = coalesce([_tok("a", 1), _tok("a", 2, finish_reason="length", usage=usage)])
    assert (merged.token_ids, merged.finish_reason, merged.usage) == ([1, 2], "length", usage)


def test_logprobs_are_concatenated() -> None:
    lp = [TokenLogprob(token_id=1, logprob=-0.1)], [TokenLogprob(token_id=2, logprob=-0.2)]
    (merged,) = coalesce([_tok("a", 1, logprobs=lp[0]), _tok("a", 2, logprobs=lp[1])])
    assert merged.logprobs == [*lp[0], *lp[1]]


def test_an_error_chunk_is_never_merged_and_nothing_follows_a_finished_run() -> None:
    error = HostChunk(request_id="a", finish_reason="error", error_code="engine_restarting")
    out = coalesce([_tok("a", 1), _tok("a", 2), error, _tok("b", 3)])
    assert [(c.request_id, c.token_ids, c.finish_reason) for c in out] == [
        ("a", [1, 2], None),
        ("a", [], "error"),
        ("b", [3], None),
    ]
    done = _tok("a", 1, finish_reason="stop")
    late = _tok("a", 2)  # (never sent by an engine; kept apart if it were)
    assert [c.token_ids for c in coalesce([done, late])] == [[1], [2]]
